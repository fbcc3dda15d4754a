#!/usr/bin/env bash
# The newcomer's first command: build and bake the CPU image of synthetic:tiny (no GPU, no
# credentials, no registry), then restore it once and print the start-up timeline.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
bash "$REPO/.ci/setup-cpu-host.sh"
WORK=${FV_WORK:-$REPO/.fv-work}
TAG=${FV_TAG:-fast-vllm/synthetic-tiny:cpu}
flags=(--device cpu --model synthetic:tiny --tag "$TAG" --network host
       --base-image "${FV_BASE_IMAGE:-fv-local/debian:bookworm}" --criu-src "$(cat "$WORK/criu-src.path")"
       --vllm-arg=--max-model-len=512 --vllm-arg=--kv-cache-memory-bytes=67108864)
[ -d /opt/wheels ] && flags+=(--wheels /opt/wheels)              # local torch CPU wheel, if any
[ -f /etc/ssl/certs/ca-certificates.crt ] && flags+=(--ca-cert /etc/ssl/certs/ca-certificates.crt)
fvbuild image "${flags[@]}"
echo "baked $TAG; restoring it once:"
fvbuild bench "$TAG" --runs 1 --no-normal
