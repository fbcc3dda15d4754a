#!/bin/bash
# Issue 11, "fewer bytes": would vLLM's engine forked from its API server (instead of spawned), with
# a CRIU that stores the pages a child still shares with its parent once
# (bench/experiments/criu-dump-cow-pages-once.patch, CRIU_DUMP_COW=1), make the checkpoint smaller
# without making the restore slower? Measured on the CPU image; not adopted (docs/speed.md, "Measured, not adopted").
#
#   bench/cpu_fork_cow.sh IMAGE     # a baked CPU image of synthetic:tiny (the README's main job)
#
# Builds that CRIU on this host (CRIU's build dependencies, as the CPU images' Dockerfile lists
# them), checks it on a forked tree (tests/e2e/zero_pages_tree.py, every process's memory the same
# after the restore), bakes IMAGE again twice with it -- vLLM's engine forked and spawned (vLLM's
# CPU platform forces spawn; the experiment lifts that one line) -- and times `docker run` to the
# first answer of each (`fvbuild bench --runs 5 --cold --no-normal`). Writes $OUT (or /tmp/fv-fork-cow).
set -euo pipefail
IMAGE=${1:?usage: bench/cpu_fork_cow.sh IMAGE}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fv-fork-cow}
mkdir -p "$OUT"
src_tar=$(ls "$REPO"/.fv-work/criu_*.orig.tar.* | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$src_tar" --strip-components=1
grep -v '^\s*\(#\|$\)' "$REPO/criu-patches/series" | while read -r p; do
  patch -d "$work" -p1 --batch --silent < "$REPO/criu-patches/$p"
done
patch -d "$work" -p1 --batch --silent < "$REPO/bench/experiments/criu-dump-cow-pages-once.patch"
make -C "$work" -j"$(nproc)" criu > "$OUT/criu-build.log" 2>&1
cp "$work/criu/criu" "$OUT/criu"
FLAGS=$(cd "$REPO" && python3 -m fvbuild.cli run-flags --device cpu)

echo "== the forked tree, its pages stored once, restored mapped and read"
for mapped in 1 0; do
  docker run --rm $FLAGS --network host -e CRIU_DUMP_COW=1 -e CRIU_RESTORE_MAP_PAGES=$mapped \
    -v "$OUT/criu:/usr/local/sbin/criu:ro" \
    -v "$REPO/tests/e2e/zero_pages_tree.py:/fv-test/zero_pages_tree.py:ro" \
    --entrypoint python3 "$IMAGE" /fv-test/zero_pages_tree.py run /tmp/fv-test | tail -1 > "$OUT/tree-mapped$mapped.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['before'] == d['after'], d; print('same memory after the restore; bytes stored:', d['stored_bytes'])" "$OUT/tree-mapped$mapped.json"
done

LIFT='s/os.environ\["VLLM_WORKER_MULTIPROC_METHOD"\] = "spawn"/os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")/'
for method in fork spawn; do
  name=fv-fork-cow-$method
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker run --name "$name" --network host $FLAGS -e CRIU_DUMP_COW=1 -e VLLM_WORKER_MULTIPROC_METHOD=$method \
    -v "$OUT/criu:/fv-criu:ro" --entrypoint bash "$IMAGE" -c "cp /fv-criu /usr/local/sbin/criu &&
      sed -i '$LIFT' /opt/venv/lib/python3.11/site-packages/vllm/platforms/cpu.py &&
      exec fvboot bake --model synthetic:tiny --port 8000 -- --max-model-len=512 --kv-cache-memory-bytes=67108864" \
    > "$OUT/bake-$method.log" 2>&1
  docker commit --change 'ENTRYPOINT ["fvboot"]' "$name" "fv-test/fork-cow-$method:cpu" >/dev/null
  docker rm "$name" >/dev/null
  grep "now .* GB" "$OUT/bake-$method.log" || true
  (cd "$REPO" && python3 -m fvbuild.cli bench "fv-test/fork-cow-$method:cpu" --runs 5 --cold --no-normal \
    --json "$OUT/bench-$method.json") | tee "$OUT/bench-$method.txt"
done
