"""Issue 11, lever 3 ("stage the weights while CRIU restores"), probed without vLLM: can a
helper process put the weight dump on the GPU while the engine is still being restored, and
the engine then take it in a few milliseconds?

Today the restored worker copies 7 GB from the page cache itself (~0.5 s on an H200, most of it
page-locking the cache with cudaHostRegister), after CRIU and the CUDA resume. Here a *stager*
(torch-free: python3 -S and the driver API through ctypes, as fvboot's own processes are) starts
beside the "restore", allocates device memory, registers the cached file and copies it in; it
hands an IPC handle to the *worker* (a torch process, as vLLM's is), which opens it, copies each
entry device-to-device into its own tensors, closes it and tells the stager to free its copy
(the KV cache needs that memory next).

Prints and writes (OUT or /tmp) gpu_weight_staging.json: the stager's steps (cuInit, context,
allocation, register+copy, handle) from its spawn, the worker's (torch CUDA init, IPC open, the
device-to-device copies, close, the stager's free), and a byte-for-byte check of the result.

    /opt/torch/.venv/bin/python3 bench/gpu_weight_staging.py [GIB] [ENTRIES]   # default 7, 294
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

WINDOW = 1 << 30
READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY
LAZY_PEER = 0x1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS


class IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


def _cuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    for name in ("cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuMemAlloc_v2",
                 "cuMemFree_v2", "cuMemHostRegister_v2", "cuMemHostUnregister", "cuMemcpyHtoDAsync_v2",
                 "cuStreamCreate", "cuStreamSynchronize", "cuIpcGetMemHandle", "cuIpcOpenMemHandle_v2",
                 "cuIpcCloseMemHandle", "cuMemcpyDtoDAsync_v2", "cuCtxGetCurrent"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what}: CUDA error {rc}")


def stage(path: str) -> None:
    """The stager: report each step's time since its spawn as JSON lines on stdout."""
    t0 = float(os.environ["FV_STAGE_T0"])
    say = lambda **kw: print(json.dumps({**kw, "t": round(time.time() - t0, 4)}), flush=True)  # noqa: E731
    cu = _cuda()
    say(step="python up")
    check(cu.cuInit(0), "cuInit")
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    check(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    say(step="context")
    size = os.path.getsize(path)
    dptr = ctypes.c_uint64()
    check(cu.cuMemAlloc_v2(ctypes.byref(dptr), ctypes.c_size_t(size)), "cuMemAlloc")
    say(step="allocated")
    fd = os.open(path, os.O_RDONLY)
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    base = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: an address for the driver
    streams = [ctypes.c_void_p(), ctypes.c_void_p()]
    for s in streams:
        check(cu.cuStreamCreate(ctypes.byref(s), 1), "cuStreamCreate")  # non-blocking
    registering = 0.0
    registered = []
    for k, off in enumerate(range(0, size, WINDOW)):
        n = min(WINDOW, size - off)
        tr = time.time()
        check(cu.cuMemHostRegister_v2(ctypes.c_void_p(base + off), ctypes.c_size_t(n), READ_ONLY), "register")
        registering += time.time() - tr
        registered.append(off)
        check(cu.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dptr.value + off), ctypes.c_void_p(base + off),
                                      ctypes.c_size_t(n), streams[k % 2]), "HtoD")
    for s in streams:
        check(cu.cuStreamSynchronize(s), "sync")
    for off in registered:
        cu.cuMemHostUnregister(ctypes.c_void_p(base + off))
    say(step="copied", register_s=round(registering, 4), gb=round(size / 1e9, 3))
    h = IpcHandle()
    check(cu.cuIpcGetMemHandle(ctypes.byref(h), dptr), "cuIpcGetMemHandle")
    say(step="ready", handle=ctypes.string_at(ctypes.addressof(h), 64).hex(), size=size)  # all 64 bytes: .reserved stops at a NUL
    line = sys.stdin.readline().strip()  # "release" (or EOF: the worker is gone)
    tf = time.time()
    check(cu.cuMemFree_v2(dptr), "cuMemFree")
    if line:
        say(step="freed", after=line, free_s=round(time.time() - tf, 4))


def make_file(path: str, size: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for off in range(0, size, len(block)):
            b = bytearray(block)
            for i in range(0, len(b), 1 << 20):  # every MiB its own: a misplaced copy shows
                b[i:i + 8] = (off + i).to_bytes(8, "little")
            f.write(b[:min(len(b), size - off)])
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:  # cached, as the image's dump is on a warm start
        while f.read(256 << 20):
            pass


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 7.0
    n_entries = int(sys.argv[2]) if len(sys.argv) > 2 else 294
    out = os.environ.get("OUT", "/tmp")
    path = os.path.join(out, "staging.bin")
    size = int(gib * (1 << 30)) // 4096 * 4096
    make_file(path, size)
    res: dict = {"bench": "gpu_weight_staging", "bytes": size, "entries": n_entries}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-S", __file__, "stage", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "FV_STAGE_T0": repr(t0)})
    # the worker's side meanwhile: torch and its CUDA context (a restored worker has both already;
    # here they stand in for the restore the stager runs beside)
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    res["worker_torch_cuda_s"] = round(time.time() - t0, 4)
    step = size // n_entries // 4096 * 4096
    spans = [(k * step, step if k < n_entries - 1 else size - k * step) for k in range(n_entries)]
    targets = [torch.empty(n, dtype=torch.uint8, device="cuda") for _, n in spans]
    torch.cuda.synchronize()
    stager = []
    ready = None
    while ready is None:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the stager ended early: {stager}")
        print(line.strip(), flush=True)
        rec = json.loads(line)
        stager.append(rec)
        if rec["step"] == "ready":
            ready = rec
    res["worker_waited_until_s"] = round(time.time() - t0, 4)
    cu = _cuda()
    h = IpcHandle()
    ctypes.memmove(ctypes.byref(h), bytes.fromhex(ready["handle"]), 64)
    ta = time.time()
    src = ctypes.c_uint64()
    cu.cuIpcOpenMemHandle_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), IpcHandle, ctypes.c_uint]
    rc = cu.cuIpcOpenMemHandle_v2(ctypes.byref(src), h, LAZY_PEER)
    res["ipc_open_via"] = f"driver (rc {rc})"
    if rc != 0:  # the runtime's, in the libcudart torch loaded
        with open("/proc/self/maps") as maps:
            rt = ctypes.CDLL(next(l.split()[-1] for l in maps if "libcudart.so" in l))
        rt.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_uint64), IpcHandle, ctypes.c_uint]
        rc2 = rt.cudaIpcOpenMemHandle(ctypes.byref(src), h, LAZY_PEER)
        res["ipc_open_via"] += f", runtime (rc {rc2})"
        check(rc2, "cudaIpcOpenMemHandle")
    tb = time.time()
    stream = torch.cuda.current_stream().cuda_stream
    for (off, n), t in zip(spans, targets):
        check(cu.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(t.data_ptr()), ctypes.c_uint64(src.value + off),
                                      ctypes.c_size_t(n), ctypes.c_void_p(stream)), "DtoD")
    torch.cuda.synchronize()
    tc = time.time()
    cu.cuIpcCloseMemHandle(src)
    td = time.time()
    free_before = torch.cuda.mem_get_info()[0]
    proc.stdin.write("release\n")
    proc.stdin.flush()
    for line in proc.stdout:
        stager.append(json.loads(line))
    proc.wait(30)
    te = time.time()
    free_after = torch.cuda.mem_get_info()[0]
    res.update(stager=stager, ipc_open_s=round(tb - ta, 4), dtod_copies_s=round(tc - tb, 4),
               ipc_close_s=round(td - tc, 4), release_and_exit_s=round(te - td, 4),
               worker_side_total_s=round(te - ta, 4),
               freed_gb=round((free_after - free_before) / 1e9, 3))
    # byte for byte: the file, read back the ordinary way, against what the worker now holds
    ref = torch.from_file(path, shared=False, size=size, dtype=torch.uint8).cuda()
    res["identical"] = all(torch.equal(t, ref[off:off + n]) for (off, n), t in zip(spans, targets))
    res["device"] = torch.cuda.get_device_name()
    os.unlink(path)
    print(json.dumps(res, indent=1))
    with open(os.path.join(out, "gpu_weight_staging.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "stage":
        stage(sys.argv[2])
    else:
        main()
