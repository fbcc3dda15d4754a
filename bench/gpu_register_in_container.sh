#!/usr/bin/env bash
# Does the page-cache weight path work inside a container? On a bare GPU machine (the device
# kind; Docker from .devkit/docker, no vLLM needed), from the repo root:
#
#   bash bench/gpu_register_in_container.sh
#
# A minimal image (this machine's torch, no vLLM) gets a 2 GiB file in an image layer, as the
# weight dump is; a container with the flags fvbuild's restores use (CRIU's capabilities and
# seccomp/apparmor unconfined, the GPU's device nodes, the driver mounted) reads it, maps it
# read-only and page-locks it window by window as fvboot.weights.pagecache does, and prints the
# residency, RLIMIT_MEMLOCK and each cudaHostRegister's result. The same on the host, and in
# containers with --ulimit memlock=-1 / --cap-add IPC_LOCK. Results: $OUT/register_in_container.log
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fv-register}; mkdir -p "$OUT"
LOG=$OUT/register_in_container.log
DRIVER_DIR=${FV_NVIDIA_DRIVER_DIR:-/usr/local/nvidia}
source .devkit/docker/start.sh || exit 1
PY=/opt/torch/.venv/bin/python3
say() { echo "== $*" | tee -a "$LOG"; }
if ! docker image inspect fv-local/torch-only >/dev/null 2>&1; then
  say "base image from this machine's torch"
  mkdir -p /tmp/fv-empty/tmp && chmod 1777 /tmp/fv-empty/tmp
  tar -c --exclude=usr/local/cuda-\* --exclude=usr/local/cuda --exclude=usr/local/nvidia \
      -C / usr etc opt/torch bin lib lib64 sbin -C /tmp/fv-empty tmp 2>/dev/null \
    | docker import -c "ENV LD_LIBRARY_PATH=$DRIVER_DIR/lib64" - fv-local/torch-only >/dev/null || exit 1
fi
ctx=$(mktemp -d)
printf 'FROM fv-local/torch-only\nRUN mkdir -p /data && head -c 2147483648 /dev/urandom > /data/w.bin\n' > "$ctx/Dockerfile"
DOCKER_BUILDKIT=0 docker build -q -t fv-local/register-probe "$ctx" >>"$LOG" 2>&1 || { say "docker build failed"; exit 1; }
flags=(--cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add NET_ADMIN --cap-add DAC_READ_SEARCH --cap-add SYS_TIME
       --security-opt seccomp=unconfined --security-opt apparmor=unconfined -v "$DRIVER_DIR:$DRIVER_DIR:ro"
       -v "$PWD/entrypoint:/opt/fvboot/fvboot:ro" -e PYTHONPATH=/opt/fvboot)
for d in /dev/nvidia*; do [ -c "$d" ] && flags+=(--device "$d"); done
probe='
import ctypes, os, resource, sys, time, torch
from fvboot import residency
from fvboot.weights import pagecache
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
while os.read(fd, 1 << 24):
    pass
size = os.fstat(fd).st_size
m = pagecache.FileMapping(fd, size)
print("memlock", resource.getrlimit(resource.RLIMIT_MEMLOCK), "cachestat", residency.cachestat_pages(m.libc, fd, size),
      "missing", m.missing_pages(), "of", m.pages)
torch.cuda.init()
cudart = torch.cuda.cudart()
for off in range(0, size, 1 << 30):
    t = time.perf_counter()
    err = int(cudart.cudaHostRegister(m.addr + off, min(1 << 30, size - off), 8))
    print(f"cudaHostRegister window at {off >> 20} MiB: error {err} in {time.perf_counter() - t:.3f} s")
    if err == 0:
        cudart.cudaHostUnregister(m.addr + off)
'
say "host"; head -c 2147483648 /dev/urandom > /tmp/w.bin
mkdir -p /tmp/fvpkg && ln -sfn "$PWD/entrypoint" /tmp/fvpkg/fvboot
PYTHONPATH=/tmp/fvpkg LD_LIBRARY_PATH=$DRIVER_DIR/lib64 $PY -c "$probe" /tmp/w.bin 2>&1 | tee -a "$LOG"
for extra in "" "--ulimit memlock=-1" "--cap-add IPC_LOCK"; do
  say "container ${extra:-with the restore flags of fvbuild}"
  docker run --rm "${flags[@]}" $extra --entrypoint $PY fv-local/register-probe -c "$probe" /data/w.bin 2>&1 | tail -8 | tee -a "$LOG"
done
say "the limit of dockerd: $(grep 'locked memory' /proc/$(pgrep -xo dockerd)/limits)"
