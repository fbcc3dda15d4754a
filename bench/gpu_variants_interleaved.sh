#!/usr/bin/env bash
# Restores of one baked image with several runtime settings, interleaved round by round, so a
# machine's drift (other tenants, thermal, page-cache state) falls on every setting alike.
# Runs on the GPU machine after `.ci/gpu-run build` (the image is there). Each sample is one
# `fvbuild bench --runs 1` (an untimed restore to fill the page cache, then the timed one).
# Usage: FV_AB_ROUNDS=4 bash bench/gpu_variants_interleaved.sh "default" "FV_RESTORE_MAP_PAGES=1" ...
#   FV_AB_FLAGS adds `fvbuild bench` options to every sample (--cold: a cold restore after the warm one)
#   a variant is "default" or space-separated KEY=VALUE settings and `fvbuild bench` options of its
#   own ("--settle=5 FV_WAKE_MEMORY=helper"); results: /root/fv-gpu-ci/interleaved/, with the image's
#   manifest, packed into $OUT/interleaved.tgz (the device tool returns at most 8 files)
set -uo pipefail
cd "$(dirname "$0")/.."
source .devkit/remote.sh >/dev/null 2>&1
export PATH=/tmp/fv-site/bin:/root/dockroot/bin:$PATH PYTHONPATH=/tmp/fv-site${PYTHONPATH:+:$PYTHONPATH}
TAG=${FV_GPU_TAG:-fast-vllm/llama-3.2-3b:cuda}
D=/root/fv-gpu-ci/interleaved; mkdir -p "$D"   # outlives the call; packed into $OUT at the end
python3 -m fvbuild.cli inspect "$TAG" > "$D/manifest.json" 2>&1   # trim (GPU memory kept, context limits), timeline
for r in $(seq "${FV_AB_ROUNDS:-4}"); do
  k=0
  for v in "$@"; do
    k=$((k + 1)); envs=()
    [ "$v" = default ] || for kv in $v; do
      case "$kv" in --*) envs+=("$kv") ;; *) envs+=(--env "$kv") ;; esac
    done
    python3 -m fvbuild.cli bench "$TAG" --gpu-access devices --nvidia-driver-dir /usr/local/nvidia \
        --runs 1 --no-normal ${FV_AB_FLAGS:-} "${envs[@]}" --json "$D/v$k-r$r.json" > "$D/v$k-r$r.log" 2>&1
    echo "round $r variant $k ($v): $(grep -o 'restore\(, page cache dropped\)\? 1/1: .*' "$D/v$k-r$r.log" | tr '\n' ' ')"
  done
done
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/interleaved.tgz" -C "$(dirname "$D")" interleaved; fi
