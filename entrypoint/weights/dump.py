"""The GPU dump: CUDA tensors written to a ``.fvw`` file through pinned buffers, the reverse
of the ring (``write_weights`` calls it for the non-empty CUDA tensors).

T threads (as many as readers: ``FV_LOAD_THREADS``, auto by default), each with its own pinned
buffer and stream; a thread takes the next chunk (:func:`.plan.plan`), queues D2H copies of its
pieces, waits on the event, zeroes the padding between pieces, hashes the pieces (per-entry
order, ``pipeline.OrderedHashes``) and ``pwrite``s the chunk, then starts its writeback
(``sync_file_range``; ``FV_DUMP_WRITEBACK=0`` turns that off) so the caller's fsync overlaps
the dump. No ``.cpu()`` temporaries, no pageable copies.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from typing import Any, Sequence

import torch

from . import pipeline
from .. import runenv
from .fileformat import ALIGN, flat_bytes, pwrite_full
from ..worker_threads import run_workers
from .pipeline import OrderedHashes, Slot, finish, one_device
from .plan import plan
from .settings import Config, GpuLoaderError
from .stats import TransferStats


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = False  # resolved on first use; None where libc lacks it


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these dirty pages now (``sync_file_range(WRITE)``), so
    the caller's final fsync finds most of the file on disk already: the disk works while
    the rest is still being copied and hashed. Best effort; errors are ignored."""
    global _sync_file_range
    if _sync_file_range is False:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (AttributeError, OSError):
            _sync_file_range = None
    if _sync_file_range is not None and runenv.value("FV_DUMP_WRITEBACK", error=ValueError) != "0":  # off, no, false too
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def dump(fd: int, spans: Sequence[tuple[int, int]], tensors: Sequence[torch.Tensor],
         checksum: str, config: Config | None = None,
         engine: Any = None) -> tuple[list[str], TransferStats]:
    """Write contiguous same-device tensors to ``fd`` at the given (offset, nbytes) spans.

    Returns each tensor's checksum (``checksum`` algorithm) and the stats. The padding between
    spans that share a chunk is written as zeros; padding at the end is left to the caller
    (``write_weights`` truncates the file to its full size).
    """
    t0 = time.perf_counter()
    cfg = config or Config.from_env()
    if len(spans) != len(tensors):
        raise GpuLoaderError(f"{len(spans)} spans but {len(tensors)} tensors")
    for (off, n), t in zip(spans, tensors):
        if t.numel() * t.element_size() != n or not t.is_contiguous():
            raise GpuLoaderError(f"tensor for span at {off} does not hold exactly {n} contiguous bytes")
    chunks = plan(spans, cfg.buffer_bytes, max_gap=ALIGN - 1)  # only padding: see write_weights
    abort = threading.Event()
    hashes = OrderedHashes(checksum, [n for _, n in spans], abort)
    n_threads = n_streams = 0
    t_xfer0 = t_xfer1 = time.perf_counter()
    if chunks:
        device = one_device(tensors)
        n_threads = max(1, min(cfg.reader_threads(), len(chunks)))
        flats = [flat_bytes(t) for t in tensors]
        eng = pipeline.engine_for(device, cfg, engine)
        n_streams = len(eng.streams)
        free: queue.Queue[Slot] = queue.Queue()
        try:
            eng.begin()  # kernels still writing the weights finish before we copy them out
            taken = [0]
            lock = threading.Lock()
            numbers: queue.Queue[int] = queue.Queue()
            for i in range(n_threads):
                numbers.put(i)

            def writer() -> None:
                eng.thread_init()
                slot = eng.alloc(cfg.buffer_bytes, numbers.get())  # its own buffer, pinned here
                try:
                    base = slot.tensor.data_ptr()
                    while not abort.is_set():
                        with lock:
                            i = taken[0]
                            taken[0] += 1
                        if i >= len(chunks):
                            return
                        c = chunks[i]
                        eng.copies([(slot.tensor[p.buf:p.buf + p.length],
                                     flats[p.entry][p.src:p.src + p.length]) for p in c.pieces],
                                   slot)
                        eng.record(slot)
                        eng.wait(slot)
                        for a, b in c.gaps():
                            ctypes.memset(base + a, 0, b - a)
                        for p in c.pieces:
                            hashes.update(p, slot.view[p.buf:p.buf + p.length])
                        pwrite_full(fd, slot.view[:c.length], c.offset)
                        _start_writeback(fd, c.offset, c.length)
                finally:
                    free.put(slot)

            t_xfer0 = time.perf_counter()
            finish(eng, lambda: run_workers(n_threads, writer, abort, hashes.wake))
            t_xfer1 = time.perf_counter()
        finally:
            while not free.empty():
                free.get_nowait()
            eng.release()
    stats = TransferStats("dump", sum(n for _, n in spans), sum(c.length for c in chunks),
                          len(spans), len(chunks), time.perf_counter() - t0, t_xfer0 - t0,
                          t_xfer1 - t_xfer0, n_threads, n_threads, cfg.buffer_mb, n_streams,
                          False)
    return hashes.digests(), stats
