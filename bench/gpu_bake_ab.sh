#!/usr/bin/env bash
# Issue 11: two bake-time settings against each other, host mode, one GPU machine: a bake of the
# same model under each arm's environment, then their warm restores alternated. From the repo
# root, after `source .devkit/remote.sh` (the device kit):
#
#   bash bench/gpu_bake_ab.sh NAME_A[:ENV...] NAME_B[:ENV...] [ROUNDS]   # results, logs under $OUT
#   bash bench/gpu_bake_ab.sh vllm:FV_GRAPH_POOL=vllm sleep:FV_GRAPH_POOL=sleep 1   # .ci/gpu-run graphs
#
# ENV: NAME=VALUE pairs, comma-separated. ~8 minutes at 3B with one round (two bakes of ~4 min
# with their restores): one device call. Both homes are removed at the end (FV_AB_KEEP=1 keeps
# them: ~20 GB of a 64 GB disk).
#
# Each bake: bench/gpu_startup.py bake (3 warm restores and a cold one after it); each round:
# bench/gpu_startup.py restore of each (3 warm, 1 cold). The manifests' trim records say what
# the sleeping engine kept on the GPU (gpu_used_bytes, torch_pools, graph_pool_allocations,
# context_limits).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/fv-bake-ab}; mkdir -p "$OUT"
[ $# -ge 2 ] || { echo "usage: $0 NAME_A[:ENV,...] NAME_B[:ENV,...] [ROUNDS]" >&2; exit 2; }
ARM_A=$1 ARM_B=$2 ROUNDS=${3:-2}
NAME_A=${ARM_A%%:*} NAME_B=${ARM_B%%:*}
ENV_A=$([ "$ARM_A" = "$NAME_A" ] || echo "${ARM_A#*:}" | tr ',' ' ')
ENV_B=$([ "$ARM_B" = "$NAME_B" ] || echo "${ARM_B#*:}" | tr ',' ' ')
[ "$NAME_A" != "$NAME_B" ] || { echo "$0: the two arms need two names" >&2; exit 2; }
export FV_BENCH_MODEL=${FV_BENCH_MODEL:-synthetic:llama-3.2-3b} FV_BENCH_VARIANTS=none
export FV_BENCH_COMMIT=${FV_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
A=/root/fv-ab-$NAME_A B=/root/fv-ab-$NAME_B
leftovers() {  # a phase cut off by its timeout leaves its server up (port 8000, GPU memory)
  pkill -9 -f 'fvboot (serve|bake)' 2>/dev/null; pkill -9 -f 'vllm.entrypoints' 2>/dev/null
  pkill -9 -f 'VLLM::' 2>/dev/null; sleep 2
}
run() {  # NAME HOME PHASE [ENV...]; a bake phase is the model, the bake and 4 restores (~4 min at 3B)
  local name=$1 home=$2 phase=$3; shift 3
  local limit=${FV_AB_RESTORE_TIMEOUT:-150}
  [ "$phase" = bake ] && limit=${FV_AB_BAKE_TIMEOUT:-420}
  env "$@" FV_BENCH_HOME="$home" OUT="$OUT" timeout "$limit" \
      python3 gpu_startup.py "$phase" > "$OUT/$name.log" 2>&1
  local rc=$?
  leftovers
  # a phase cut off by its timeout writes no JSON and no log archive: keep fvboot's own logs
  # (why a restore fell back) before the next phase overwrites them
  [ "$rc" = 0 ] || (cd /tmp/fvbench 2>/dev/null && find . -name '*.log' -print0 |
      tar -czf "$OUT/$name-logs.tar.gz" --null -T - 2>/dev/null)
  echo "$name: exit $rc $(grep -E 'first correct token|baked in|failed|fell back' "$OUT/$name.log" | tr '\n' ' ')"
  mv -f "$OUT/gpu_startup_$phase.json" "$OUT/$name.json" 2>/dev/null
  [ "$rc" != 0 ] || mv -f "$OUT/logs_$phase.tar.gz" "$OUT/$name-logs.tar.gz" 2>/dev/null
}
# shellcheck disable=SC2086  # ENV_A / ENV_B: NAME=VALUE words
run "$NAME_A-bake" "$A" bake $ENV_A
mkdir -p "$B" && [ -e "$B/model" ] || cp -al "$A/model" "$B/model"   # the same model, no second make
# shellcheck disable=SC2086
run "$NAME_B-bake" "$B" bake $ENV_B
for r in $(seq "$ROUNDS"); do
  run "$NAME_A-restore-$r" "$A" restore
  run "$NAME_B-restore-$r" "$B" restore
done
python3 - "$OUT" "$NAME_A" "$NAME_B" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
STEPS = ("criu: memory restored", "criu: CUDA resumed", "memory adopted", "weight memory mapped",
         "weights in place", "staged copy taken", "engine awake", "answers checked")
for name in sys.argv[2:4]:
    warm, fell, steps, trim = [], 0, {}, {}
    for f in sorted(out.glob(f"{name}-*.json")):
        d = json.loads(f.read_text())
        trim = (d.get("trim") or [trim])[0] or trim
        if d.get("checkpoint_bytes"):
            trim["checkpoint_bytes"] = d["checkpoint_bytes"]
        for k, v in d.items():
            if not (k.startswith("restore_warm") and isinstance(v, dict)):
                continue
            if v.get("fallback"):
                fell += 1
                continue
            warm.append(v["first_token_s"])
            t = {e["event"]: e["t"] for e in v.get("timeline", [])}
            prev = t.get("restore issued")
            for s in STEPS:
                if s in t and prev is not None:
                    steps.setdefault(s, []).append(t[s] - prev)
                    prev = t[s]
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    print(f"{name}: warm median {med(warm)} s of {len(warm)} ({sorted(warm)}), fell back {fell}")
    print(f"  steps (median s): " + ", ".join(f"{s} {med(v)}" for s, v in steps.items()))
    heap = trim.get('heap') or {}
    print(f"  bake: gpu kept {trim.get('gpu_used_bytes')}, graph allocations {trim.get('graph_pool_allocations')}, "
          f"saved buffers {trim.get('saved_buffers')}, context limits {trim.get('context_limits')}, "
          f"checkpoint {trim.get('checkpoint_bytes')}, "
          f"heap elf {heap.get('elf_images')}")
    print(f"  heap: malloc {heap.get('malloc')}, python top {(heap.get('python') or {}).get('top')}")
    if "graph_pool_allocations" in trim and not trim["graph_pool_allocations"]:
        print("  NOT A MEASUREMENT: the sleep bake put no graph allocation in memory that sleeps "
              "(its bake log says why); both arms restore the same kind of checkpoint")
PY
# the two homes hold ~20 GB (the model, two weight dumps, two checkpoints): gone unless
# FV_AB_KEEP=1, so that a build in the same device session has the 64 GB disk it needs (one
# filled it on 2026-12-04: bench/results/gpu_image_3b_h200_2026-12-04b/build-disk-full.log)
[ "${FV_AB_KEEP:-0}" = 1 ] || rm -rf "$A" "$B"
