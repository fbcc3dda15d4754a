#!/usr/bin/env bash
# The device kit repacked for fewer device calls (README "GPU CI"): the vLLM site of the shared
# kit's gzip chunks (SRC: folders c0..c3 holding site.part*, as ../shared/device/build-kit.sh
# leaves them) as xz in .devkit/k0, k1 (56 MB each) and k2, with .devkit/site-xz.sha256 (what
# .devkit/remote.sh checks on the GPU machine); and .devkit/docker/dock.txz recompressed with
# xz -9e. A call carries at most 64 MiB with the repo (~5 MB): three calls for k0, k1 and k2, and
# the setup call carries the Docker kit, CRIU, the prebuilt CRIU and .whl. ~6 min on 2 cores.
#   bash .ci/gpu-kit-pack.sh SRC
set -euo pipefail
SRC=${1:?usage: .ci/gpu-kit-pack.sh FOLDER_WITH_c0..c3}
cd "$(dirname "$0")/.."
K=.devkit; T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
cat "$SRC"/c*/site.part* | gzip -dc | xz -9e -T0 > "$T/site.txz"
rm -rf "$K"/k0 "$K"/k1 "$K"/k2; mkdir -p "$K"/k0 "$K"/k1 "$K"/k2
split -b 56000000 -d -a 1 "$T/site.txz" "$T/site.txz.part"
for i in 0 1 2; do mv "$T/site.txz.part$i" "$K/k$i/"; done
[ ! -e "$T/site.txz.part3" ] || { echo "the kit no longer fits three calls" >&2; exit 1; }
cat "$K"/k0/* "$K"/k1/* "$K"/k2/* | sha256sum | cut -d' ' -f1 > "$K/site-xz.sha256"
if [ -f "$K/docker/dock.txz" ]; then
  mkdir -p "$T/dock" && xz -dc "$K/docker/dock.txz" | tar -x -C "$T/dock"
  tar -c -C "$T/dock" . | xz -9e -T0 > "$T/dock.txz" && mv "$T/dock.txz" "$K/docker/dock.txz"
fi
# remote.sh, sourced on the GPU machine, unpacks this format (the shared kit's reads gzip chunks)
rm -f "$K/remote.sh"
cat > "$K/remote.sh" <<'REMOTE'
#!/bin/bash
# Runs ON the GPU machine, from the repo root, after the chunk calls (see README.md "GPU CI").
# Source it: `source .devkit/remote.sh` -> vLLM importable, criu on PATH (as fv-criu wrapper env).
# The kit: /root/stage/site.txz.part* (xz), checked against .devkit/site-xz.sha256.
K=$PWD/.devkit
if [ ! -f /root/site/.ok ]; then
  want=$(cat "$K/site-xz.sha256")
  got=$(cat /root/stage/site.txz.part* 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then echo "devkit: chunks missing or stale in /root/stage (want $want got $got)" >&2; return 3 2>/dev/null || exit 3; fi
  mkdir -p /root/site && cat /root/stage/site.txz.part* | xz -dc -T0 | tar -x -C /root/site && touch /root/site/.ok
fi
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0   # flashinfer is not in the kit
# criu and its libraries: only criu itself should see LD_LIBRARY_PATH
export FV_CRIU_DIR=$K/criu
criu() { LD_LIBRARY_PATH=$FV_CRIU_DIR/lib PATH=$FV_CRIU_DIR:$PATH "$FV_CRIU_DIR/criu" "$@"; }
export -f criu 2>/dev/null || true
REMOTE
chmod 555 "$K/remote.sh"
du -sb "$K"/k0 "$K"/k1 "$K"/k2 "$K"/docker
