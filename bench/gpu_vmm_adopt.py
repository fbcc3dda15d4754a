#!/usr/bin/env python3
"""Issue 11: can a helper make a sleeping engine's GPU memory while CRIU restores the engine, so
that waking it is a map instead of an allocation? Probed without vLLM.

After the CUDA resume a restored worker wakes its memory: vLLM's allocator creates physical
memory for each sleeping allocation and maps it at the addresses the engine kept (cuMemCreate,
cuMemMap, cuMemSetAccess), 0.09 s for the 3B model's 7.9 GB of weights and 0.29 s for its 112
GB KV cache on an H200; with weights staged, the worker then copies them device to device
(0.09 s). Here a *helper* (torch-free, the driver API through ctypes, as fvboot's own processes
are) creates the same allocations as exportable memory, fills the "weights" ones, and exports a
file descriptor for each; the *worker* (this process, holding reserved addresses as a sleeping
engine does) receives the descriptors over a Unix socket (fvboot.adopt.HandOver, as the
restore does: the served tree is in a PID namespace of its own), imports and maps them. Then the
helper releases its handles and exits: the worker's memory must stay, bytes intact.

Why a wake costs 0.29 s in a restored engine when the same calls cost milliseconds in a fresh
process (2026-12-04: 7 ms for 112 GB): the memory an engine wakes into was last used by
another process (the previous container's engine), and the driver may clear such memory
when it is handed out again. So the wake is timed three ways: on memory no process used since
the GPU was last cleared, right after a process that used and freed all of it exited, and the
same 2 s later; the helper's creation, too, comes right after such a process.

Prints and writes ($OUT or /tmp) gpu_vmm_adopt.json: the in-process wakes of the same sizes
(what vLLM does today), the helper's create/fill/export times, the worker's receive/import/map
times, and the checks (pattern bytes read back, memory kept after the helper is gone).

    python3 bench/gpu_vmm_adopt.py [WEIGHTS_GIB] [WEIGHT_ALLOCS] [KV_GIB] [KV_ALLOCS]
                                   # default 7.9 120 112 28 (the 3B engine's pools on an H200)
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import link_fvboot, record  # noqa: E402

link_fvboot(Path("/tmp/fv-bench-lib"), require="cuda_driver.py")
sys.path.insert(0, "/tmp/fv-bench-lib")
from fvboot.adopt import HandOver, receive_fds  # noqa: E402
from fvboot.cuda_driver import Driver  # noqa: E402


def sizes(gib: float, count: int, gran: int) -> list[int]:
    each = max(gran, int(gib * (1 << 30) / count) // gran * gran)
    return [each] * count


def helper(weights: list[int], kv: list[int]) -> int:
    """The helper's side: create, fill the weights (byte k % 251 + 1 in allocation k), export;
    say the descriptors; wait for "done" on stdin; release; exit."""
    t0 = time.perf_counter()
    drv = Driver()
    drv.init()
    drv.use_primary_context(0)
    t_ctx = time.perf_counter() - t0
    handles, fds, vas = [], [], []
    t = time.perf_counter()
    for n in weights + kv:
        handles.append(drv.create(n, 0))
    t_create = time.perf_counter() - t
    t = time.perf_counter()
    for k, n in enumerate(weights):  # the helper maps its weights to fill them (as a stager would copy)
        va = drv.reserve(n)
        drv.map(va, n, handles[k], 0)
        drv.memset(va, k % 251 + 1, n)
        vas.append((va, n))
    for va, n in vas:
        drv.unmap(va, n)
        drv.address_free(va, n)
    t_fill = time.perf_counter() - t
    t = time.perf_counter()
    fds = [drv.export_fd(h) for h in handles]
    t_export = time.perf_counter() - t
    HandOver(SOCKET, fds)
    print(json.dumps({"context_s": round(t_ctx, 4), "create_s": round(t_create, 4),
                      "fill_s": round(t_fill, 4), "export_s": round(t_export, 4)}), flush=True)
    sys.stdin.readline()
    t = time.perf_counter()
    for h in handles:
        drv.release(h)
    print(json.dumps({"released_s": round(time.perf_counter() - t, 4)}), flush=True)
    return 0


def previous(sizes_: list[int]) -> int:
    """A process that used all that memory (created, mapped, written) and exits: what the
    previous container's engine leaves behind for the next one."""
    drv = Driver()
    drv.init()
    drv.use_primary_context(0)
    for n in sizes_:
        h = drv.create(n, 0, shareable=False)
        va = drv.reserve(n)
        drv.map(va, n, h, 0)
        drv.memset(va, 0x5A, n)
    return 0


def wake_in_process(drv, reserved: list[tuple[int, int]]) -> float:
    """vLLM's wake of RESERVED: create and map each (then given back again); seconds."""
    t = time.perf_counter()
    hs = [drv.create(n, 0, shareable=False) for _, n in reserved]
    for (va, n), h in zip(reserved, hs):
        drv.map(va, n, h, 0)
    took = time.perf_counter() - t
    for (va, n), h in zip(reserved, hs):
        drv.unmap(va, n)
        drv.release(h)
    return round(took, 4)


SOCKET = "/tmp/fv-bench-vmm-adopt.sock"


def run_previous(sizes_: list[int]) -> None:
    subprocess.run([sys.executable, "-S", __file__, "--previous", json.dumps(sizes_)], check=True,
                   env={**os.environ, "PYTHONPATH": "/tmp/fv-bench-lib"})


def main() -> int:
    if sys.argv[1:2] == ["--helper"]:
        w, k = json.loads(sys.argv[2]), json.loads(sys.argv[3])
        return helper(w, k)
    if sys.argv[1:2] == ["--previous"]:
        return previous(json.loads(sys.argv[2]))
    args = [float(a) for a in sys.argv[1:]] + [7.9, 120, 112, 28][len(sys.argv) - 1:]
    drv = Driver()
    drv.init()
    drv.use_primary_context(0)
    gran = drv.granularity(0)
    weights, kv = sizes(args[0], int(args[1]), gran), sizes(args[2], int(args[3]), gran)
    out: dict = {"bench": "gpu_vmm_adopt", "granularity": gran, "weights_bytes": sum(weights),
                 "kv_bytes": sum(kv), "allocations": [len(weights), len(kv)], "checks": {}}
    # the engine's reserved addresses (vLLM keeps them while asleep)
    reserved = [(drv.reserve(n), n) for n in weights + kv]

    # 1. today: the worker creates and maps its own memory (vLLM's wake_up), on memory as it is,
    # then right after a process that used all of it exited, then 2 s after that
    parts = (("weights", reserved[:len(weights)]), ("kv", reserved[len(weights):]))
    for name, part in parts:
        out[f"wake_in_process_{name}_s"] = wake_in_process(drv, part)
    run_previous(weights + kv)
    for name, part in parts:
        out[f"wake_after_another_process_{name}_s"] = wake_in_process(drv, part)
    run_previous(weights + kv)
    time.sleep(2)
    for name, part in parts:
        out[f"wake_2s_after_another_process_{name}_s"] = wake_in_process(drv, part)

    # 2. a helper makes it (while CRIU would restore the engine) right after a process that used
    # it exited; the worker takes it
    run_previous(weights + kv)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", __file__, "--helper", json.dumps(weights), json.dumps(kv)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": "/tmp/fv-bench-lib"})
    said = json.loads(proc.stdout.readline())
    out["helper"] = {**said, "ready_after_spawn_s": round(time.perf_counter() - t0, 4)}
    t = time.perf_counter()
    fds = receive_fds(SOCKET, len(reserved))
    t_take = time.perf_counter() - t
    t = time.perf_counter()
    handles = [drv.import_fd(fd) for fd in fds]
    t_import = time.perf_counter() - t
    t = time.perf_counter()
    for (va, n), h in zip(reserved, handles):
        drv.map(va, n, h, 0)
    out["worker"] = {"receive_fds_s": round(t_take, 4), "import_s": round(t_import, 4),
                     "map_s": round(time.perf_counter() - t, 4)}
    for fd in fds:
        os.close(fd)

    def pattern_ok() -> bool:
        buf = ctypes.create_string_buffer(4096)
        for k, (va, n) in enumerate(reserved[:len(weights)]):
            for off in (0, n - 4096):
                drv.copy_to_host(ctypes.addressof(buf), va + off, 4096)
                if buf.raw != bytes([k % 251 + 1]) * 4096:
                    return False
        return True

    out["checks"]["weights_bytes_as_the_helper_wrote"] = pattern_ok()
    proc.stdin.write("done\n")
    proc.stdin.flush()
    out["helper"].update(json.loads(proc.stdout.readline()))
    proc.wait(60)
    out["checks"]["kept_after_the_helper_exited"] = pattern_ok()
    va, n = reserved[-1]
    drv.memset(va, 7, n)  # the KV cache is writable here
    buf = ctypes.create_string_buffer(16)
    drv.copy_to_host(ctypes.addressof(buf), va + n - 16, 16)
    out["checks"]["kv_writable"] = buf.raw == bytes([7]) * 16
    for (va, n), h in zip(reserved, handles):
        drv.unmap(va, n)
        drv.release(h)
        drv.address_free(va, n)
    out["ok"] = all(out["checks"].values())
    record("gpu_vmm_adopt", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
