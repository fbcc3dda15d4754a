#!/usr/bin/env python3
"""Experiment: copy a file that sits in the page cache to the GPU without a CPU copy.

The weight loader (entrypoint/weights/ring.py) pread()s the file into pinned buffers and copies
those to the GPU: one CPU copy per byte. Here the file is mmap()ed and each window of it is
page-locked in place with cudaHostRegister(..., ReadOnly), so the GPU reads the page cache
directly; registration of window i+1 overlaps the copy of window i. Compared with the loader
on the same file, bit-exactness checked. Prints JSON ($OUT/gpu_register_load.json too).

    python3 bench/gpu_register_load.py [FILE]   (default: the bench's weight dump)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

import torch

from harness import record

REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly


def warm(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


def by_registration(path: Path, dst: torch.Tensor, window: int, streams: int) -> dict:
    cudart = torch.cuda.cudart()
    size = path.stat().st_size
    t0 = time.perf_counter()
    with path.open("rb") as f:
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    addr = _mmap_address(m)
    ss = [torch.cuda.Stream() for _ in range(streams)]
    registered: list[tuple[int, torch.cuda.Event]] = []
    reg_s = 0.0
    for i, off in enumerate(range(0, size, window)):
        n = min(window, size - off)
        t = time.perf_counter()
        err = cudart.cudaHostRegister(addr + off, n, REGISTER_READ_ONLY)
        reg_s += time.perf_counter() - t
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {err}")
        s = ss[i % streams]
        with torch.cuda.stream(s):
            host = _host_tensor(addr + off, n)
            dst[off:off + n].copy_(host, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        registered.append((addr + off, ev))
        while len(registered) > streams * 2:
            a, e = registered.pop(0)
            e.synchronize()
            cudart.cudaHostUnregister(a)
    for a, e in registered:
        e.synchronize()
        cudart.cudaHostUnregister(a)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    m.close()
    return {"seconds": round(took, 4), "gb_per_s": round(size / took / 1e9, 2), "register_seconds": round(reg_s, 4),
            "window_mb": window >> 20, "streams": streams}


def _mmap_address(m: mmap.mmap) -> int:
    """Address of a read-only mmap (ctypes cannot take from_buffer of a read-only buffer)."""
    import numpy as np  # torch depends on it in this environment

    return np.frombuffer(m, dtype=np.uint8).ctypes.data


def _host_tensor(address: int, n: int) -> torch.Tensor:
    arr = (ctypes.c_uint8 * n).from_address(address)
    return torch.frombuffer(arr, dtype=torch.uint8, count=n)


def by_pinned_ring(path: Path, dst: torch.Tensor, chunk: int = 32 << 20, threads: int = 8) -> dict:
    """The loader's scheme, reduced: threads pread into pinned buffers, copies on 4 streams."""
    import queue
    import threading

    size = path.stat().st_size
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    jobs: queue.Queue = queue.Queue()
    for off in range(0, size, chunk):
        jobs.put(off)
    streams = [torch.cuda.Stream() for _ in range(4)]

    def work(k: int) -> None:
        torch.cuda.set_device(dst.device)
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        evs = [None, None]
        i = 0
        while True:
            try:
                off = jobs.get_nowait()
            except queue.Empty:
                break
            b = i % 2
            if evs[b] is not None:
                evs[b].synchronize()
            n = min(chunk, size - off)
            mv = memoryview(bufs[b].numpy())[:n]
            got = 0
            while got < n:
                got += os.preadv(fd, [mv[got:]], off + got)
            s = streams[(k + i) % 4]
            with torch.cuda.stream(s):
                dst[off:off + n].copy_(bufs[b][:n], non_blocking=True)
                evs[b] = torch.cuda.Event()
                evs[b].record(s)
            i += 1
        for e in evs:
            if e is not None:
                e.synchronize()

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    torch.cuda.synchronize()
    os.close(fd)
    took = time.perf_counter() - t0
    return {"seconds": round(took, 4), "gb_per_s": round(size / took / 1e9, 2), "threads": threads,
            "chunk_mb": chunk >> 20}


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/root/fv/weights/rank0.fvw")
    size = path.stat().st_size
    warm(path)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    ref = torch.empty(size, dtype=torch.uint8, device="cuda")
    res: dict = {"file": str(path), "bytes": size, "gpu": torch.cuda.get_device_name(), "runs": []}
    res["runs"].append({"method": "pinned ring (8 threads, 32 MiB)", **by_pinned_ring(path, ref)})
    for window, streams in ((256 << 20, 2), (64 << 20, 4), (1 << 30, 2)):
        dst.zero_()
        r = by_registration(path, dst, window, streams)
        r["bit_exact"] = bool(torch.equal(dst, ref))
        res["runs"].append({"method": "cudaHostRegister of the page cache", **r})
    res["runs"].append({"method": "pinned ring again", **by_pinned_ring(path, ref)})
    record("gpu_register_load", res)


if __name__ == "__main__":
    main()
