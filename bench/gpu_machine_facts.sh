#!/usr/bin/env bash
# What a GPU machine of the device kind is, beside a measurement on it: the same kind has given
# 3B warm restores from 1.35 to 1.96 s at the same start path (docs/figures-gpu.md), and the
# CPU-bound steps (Python's start, CRIU's memory) moved with it. CPU model and its clock, the
# driver's persistence mode and clocks, a cold cuInit, a pure-Python loop and `import torch`:
#   bash bench/gpu_machine_facts.sh > $OUT/machine.txt   (.ci/gpu-run setup runs it: machine.txt)
set -uo pipefail
echo "date: $(date -u +%FT%TZ)"
grep -m1 "model name" /proc/cpuinfo; echo "cpus: $(nproc)"; grep -m1 "cpu MHz" /proc/cpuinfo
cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null | sed 's/^/governor: /'
uname -r; grep -E "MemTotal|MemAvailable" /proc/meminfo; cat /proc/loadavg
NV=${FV_NVIDIA_SMI:-$(command -v nvidia-smi || echo /usr/local/nvidia/bin/nvidia-smi)}
"$NV" --query-gpu=name,driver_version,persistence_mode,clocks.sm,clocks.max.sm,clocks.mem,pstate,power.draw --format=csv
python3 - <<'PY'
import ctypes, time
t = time.perf_counter(); cuda = ctypes.CDLL("libcuda.so.1"); rc = cuda.cuInit(0)
print(f"cuInit: rc {rc}, {time.perf_counter() - t:.3f} s (a fresh process)")
t = time.perf_counter(); n = 0
for i in range(5_000_000):
    n += i
print(f"python loop of 5e6 adds: {time.perf_counter() - t:.3f} s")
PY
python3 -c "import time; t=time.perf_counter(); import torch; print(f'import torch: {time.perf_counter()-t:.2f} s (page cache warm after the first)')"
python3 -c "import time; t=time.perf_counter(); import torch; print(f'import torch: {time.perf_counter()-t:.2f} s')"
dd if=/dev/zero of=/dev/null bs=1M count=20000 2>&1 | tail -1 | sed 's/^/memory read (dd, 20 GB of zeros): /'
