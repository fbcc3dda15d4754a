#!/bin/bash
# Rebuild the device kit's CRIU (../shared/device/build-kit.sh) with this repo's criu-patches/
# series, as the images get it: the GPU benchmarks then measure the CRIU that ships.
# Usage (CPU machine, after build-kit.sh): bench/devkit-criu.sh
#   -> .devkit/criu/{criu,cuda_plugin.so,cuda-checkpoint-client}
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${FV_KIT_CACHE:-$HOME/.cache/fv-devkit}
tarball=$(ls "$CACHE"/criu-src/criu_*.orig.tar.* 2>/dev/null | head -1)
[ -n "$tarball" ] || { echo "no CRIU source in $CACHE/criu-src: run ../shared/device/build-kit.sh first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$tarball"
src=$(find "$work" -maxdepth 1 -mindepth 1 -type d | head -1)
grep -v '^\s*\(#\|$\)' "$REPO/criu-patches/series" | while read -r p; do
  patch -d "$src" -p1 --forward --batch --silent < "$REPO/criu-patches/$p" || { echo "patch $p does not apply" >&2; exit 1; }
done
make -C "$src" -j"$(nproc)" criu cuda_plugin >/dev/null
install -m 0755 "$src/criu/criu" "$REPO/.devkit/criu/criu"
install -m 0755 "$src/plugins/cuda/cuda_plugin.so" "$REPO/.devkit/criu/cuda_plugin.so"
LD_LIBRARY_PATH="$REPO/.devkit/criu/lib" "$REPO/.devkit/criu/criu" --version
# the C cuda-checkpoint client images install (entrypoint/cuda_checkpoint_client.c)
gcc -O2 -Wall -Wextra -Werror -o "$REPO/.devkit/criu/cuda-checkpoint-client" "$REPO/entrypoint/cuda_checkpoint_client.c"
# vmtouch, for the prefetch comparison (the GPU machine has none)
cp "$(command -v vmtouch)" "$REPO/.devkit/criu/vmtouch" 2>/dev/null || true
