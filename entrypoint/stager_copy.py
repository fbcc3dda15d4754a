"""The weight stager's copies of the cached dump onto the GPU (``fvboot.weight_stager``), with
the CUDA driver through ctypes (torch-free: the stager must be working within milliseconds of
its start): into one device buffer, by page-locking the page cache in place window by window
(``copy_registered``, the default) or through pinned buffers of its own (``copy_through_ring``);
or, where the stager made the engine's weights memory for the worker to adopt
(``FV_WAKE_MEMORY=helper``), each entry straight to its place there (``placement``,
``fill_in_place``). Each page-locking function returns the seconds spent locking."""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Sequence

from .residency import REGISTER_WINDOW
from .worker_threads import run_workers

RING_THREADS, RING_PIECE = 8, 32 << 20


def copy_registered(drv, dst: int, addr: int, size: int, pause: Callable[[], None] = lambda: None) -> float:
    """Copy SIZE bytes of the cached file mapped at ADDR to DST by page-locking the page cache
    in place, window by window (a window's copy runs while the next is locked); PAUSE is called
    before each window (a Yield). Returns the seconds spent locking."""
    return copy_segments(drv, [(0, dst, size)], addr, size, pause)


def copy_through_ring(drv, dst: int, addr: int, size: int, threads: int = RING_THREADS,
                      piece: int = RING_PIECE, pause: Callable[[], None] = lambda: None) -> float:
    """The same copy through page-locked buffers of the stager's own (THREADS threads, two
    PIECE-byte buffers and two streams each: one buffer fills while the other's copy runs).
    It costs CPU copies, but no page-locking of 7 GB of page cache in the driver while the
    CUDA resume needs it. Returns the seconds spent allocating the buffers."""
    import ctypes

    jobs, lock, abort = iter(range(0, size, piece)), threading.Lock(), threading.Event()
    setup = [0.0]

    def run() -> None:
        bufs: list[int] = []
        try:
            drv.use_context()
            t = time.perf_counter()
            bufs.extend(drv.alloc_host(piece) for _ in range(2))
            streams = [drv.stream(), drv.stream()]
            with lock:
                setup[0] = max(setup[0], time.perf_counter() - t)
            k = 0
            while not abort.is_set():
                with lock:
                    off = next(jobs, None)
                if off is None:
                    break
                n = min(piece, size - off)
                pause()
                drv.synchronize(streams[k])  # this buffer's last copy is done
                ctypes.memmove(bufs[k], addr + off, n)
                drv.copy_to_device(dst + off, bufs[k], n, streams[k])
                k ^= 1
            for st in streams:
                drv.synchronize(st)
        finally:
            for b in bufs:
                drv.free_host(b)

    # the first error is raised here: said by the caller, and the worker loads the weights itself
    run_workers(threads, run, abort, on_abort=lambda: None)
    return setup[0]


def placement(entries: Iterable, weights_at: dict[str, int],
              allocations: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Where each entry of the dump goes in the engine's weights pool: (its offset in the file,
    the index in ALLOCATIONS ((address, size) each, the pool's "weights" allocations) of the one
    that holds it, its offset there, its bytes), in file order. WEIGHTS_AT: each entry's device
    address in the engine, as the bake recorded it. An entry outside every allocation of the
    pool is left out: a sleep discards only the pool, so its bytes are still where they were.
    ValueError names an entry with no recorded address, or one that runs past the end of its
    allocation (the worker then loads the weights itself)."""
    import bisect

    order = sorted(range(len(allocations)), key=lambda i: allocations[i][0])
    starts = [allocations[i][0] for i in order]
    out = []
    for e in sorted(entries, key=lambda e: e.offset):
        if not e.nbytes:
            continue
        at = weights_at.get(e.key)
        if not isinstance(at, int):
            raise ValueError(f"the bake recorded no address for {e.key}")
        k = bisect.bisect_right(starts, at) - 1
        if k < 0 or at >= allocations[order[k]][0] + allocations[order[k]][1]:
            continue  # not in the pool: kept through the sleep
        i = order[k]
        base, size = allocations[i]
        if at + e.nbytes > base + size:
            raise ValueError(f"{e.key} ({e.nbytes} bytes at {at:#x}) is not within one allocation of the weights pool")
        out.append((e.offset, i, at - base, e.nbytes))
    return out


def copy_segments(drv, segments: Sequence[tuple[int, int, int]], addr: int, size: int,
                  pause: Callable[[], None] = lambda: None) -> float:
    """copy_registered for scattered destinations: each SEGMENTS (file offset, device address,
    bytes; in file order) from the cached file mapped at ADDR (SIZE bytes), the page cache
    page-locked in place window by window. Returns the seconds spent locking."""
    streams = [drv.stream(), drv.stream()]
    locked, locking, k = [], 0.0, 0
    try:
        for w0 in range(0, size, REGISTER_WINDOW):
            w1 = min(size, w0 + REGISTER_WINDOW)
            while k < len(segments) and segments[k][0] + segments[k][2] <= w0:
                k += 1
            todo = []
            for off, dst, n in segments[k:]:
                if off >= w1:
                    break
                lo, hi = max(off, w0), min(off + n, w1)
                todo.append((dst + lo - off, addr + lo, hi - lo))
            if not todo:
                continue
            pause()
            t = time.perf_counter()
            drv.host_register(addr + w0, w1 - w0)
            locking += time.perf_counter() - t
            locked.append(addr + w0)
            for dst, src, n in todo:
                drv.copy_to_device(dst, src, n, streams[len(locked) % 2])
        for st in streams:
            drv.synchronize(st)
    finally:
        for a in locked:
            drv.host_unregister(a)
    return locking


def fill_in_place(drv, device: int, pool, entries: Iterable, addr: int, size: int,
                  pause: Callable[[], None] = lambda: None) -> dict:
    """The dump copied straight into the weights allocations the stager made for the worker to
    adopt (POOL: a weight_stager.Pool) (mapped here for the copy, unmapped after; the handles keep the bytes): once the
    worker's wake maps them, its weights are in place, with no buffer and no device copy."""
    weights = [(p, n, h) for (tag, p, n), h in zip(pool.wanted, pool.handles) if tag == "weights"]
    where = placement(entries, pool.weights_at, [(p, n) for p, n, _ in weights])
    mapped: list[tuple[int, int]] = []
    reserved: list[tuple[int, int]] = []
    try:
        for _, n, h in weights:
            va = drv.reserve(n)
            reserved.append((va, n))
            drv.map(va, n, h, device)
            mapped.append((va, n))
        locking = copy_segments(drv, [(off, mapped[i][0] + at, n) for off, i, at, n in where], addr, size, pause)
    finally:
        for va, n in mapped:
            drv.unmap(va, n)
        for va, n in reserved:
            drv.address_free(va, n)
    return {"copy": "in-place", "register_s": round(locking, 4), "bytes": sum(n for *_, n in where),
            "entries": len(where)}
