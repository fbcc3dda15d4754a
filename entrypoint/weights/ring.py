"""The pinned ring: a ``.fvw`` file read into a ring of pinned host buffers by several
threads and copied to the GPU asynchronously. The load path when the file is not all in the
page cache (or ``FV_LOAD_REGISTER=0``, or O_DIRECT asked for).

Per device:
  * B pinned host buffers of M MiB (``FV_LOAD_BUFFERS``, ``FV_LOAD_BUFFER_MB``), each bound to
    one of S CUDA streams (``FV_LOAD_STREAMS``, round robin) and owning one CUDA event;
  * T reader threads (``FV_LOAD_THREADS``). A thread takes a free buffer from the ring (FIFO),
    waits on that buffer's event (its previous H2D copy is done), *then* takes the next chunk in
    file order (:func:`.plan.plan`), fills the buffer with ``os.preadv`` (O_DIRECT with
    ``FV_LOAD_ODIRECT=1``, the page cache otherwise), queues one ``copy_(non_blocking=True)``
    per piece on the buffer's stream, records the event and hands the buffer back to the ring.
    Reads, hashing and DMA of different chunks overlap; the GIL is free during preadv, copies
    and hashing.
  * verify: each entry's checksum is computed over the bytes as they sit in the pinned buffer
    (what is DMA'd to the GPU, so no read-back), while the copy runs (``pipeline.OrderedHashes``).
    No deadlock: a thread holds a buffer before it takes a chunk number, so the lowest
    unfinished chunk always owns a buffer and can finish.
  * before: the device is synchronized (anything queued that writes the targets lands first);
    after: every stream is synchronized before the pinned buffers are freed and the cached
    pinned blocks are handed back (``torch._C._host_emptyCache``: a CRIU image would carry
    them otherwise).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Sequence

import torch

from . import pipeline
from .fileformat import ALIGN, TruncatedFileError, WeightEntry, flat_bytes, mismatch
from ..worker_threads import run_workers
from .pipeline import OrderedHashes, Slot, finish, one_device
from .plan import plan
from .settings import Config, GpuLoaderError
from .stats import TransferStats


class ODirectRefused(GpuLoaderError):
    """The file system opened the file with O_DIRECT but refuses the reads (EINVAL)."""


def pread_full(fd: int, mv: memoryview, offset: int, need: int, odirect: bool, path: str) -> int:
    """Read into ``mv`` from ``offset`` until at least ``need`` bytes are there."""
    got = 0
    while got < need:
        try:
            n = os.preadv(fd, [mv[got:]], offset + got)
        except OSError as exc:
            if odirect and exc.errno == 22:
                raise ODirectRefused(f"{path}: O_DIRECT read of {len(mv) - got} bytes at "
                                     f"{offset + got} refused ({exc}); set FV_LOAD_ODIRECT=0") from exc
            raise
        if n == 0:
            raise TruncatedFileError(f"{path}: unexpected end of file at byte {offset + got} "
                                     f"(needed {need - got} more bytes from {offset})")
        got += n
        if odirect and got < need and got % ALIGN:
            raise TruncatedFileError(f"{path}: file ends at byte {offset + got}, inside data "
                                     f"that should reach {offset + need}")
    return got


def _open_for_read(path: str, odirect: bool) -> tuple[int, bool, str | None]:
    if odirect:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return os.open(path, os.O_RDONLY), False, "O_DIRECT is not available on this OS"
        try:
            return os.open(path, os.O_RDONLY | flag), True, None
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: the file system does not do O_DIRECT (tmpfs...)
                raise
            return (os.open(path, os.O_RDONLY), False,
                    f"O_DIRECT refused by the file system ({exc.strerror}): read through the page cache")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    return fd, False, None


def load_ring(path: str | os.PathLike, entries: Sequence[WeightEntry],
              tensors: Sequence[torch.Tensor], checksum: str | None, cfg: Config,
              engine: Any) -> TransferStats:
    """Fill ``tensors`` from the file through the ring; with ``checksum``, verify on the way."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if len(entries) != len(tensors):
        raise GpuLoaderError(f"{len(entries)} entries but {len(tensors)} tensors")
    for e, t in zip(entries, tensors):
        if t.numel() * t.element_size() != e.nbytes or not t.is_contiguous():
            raise GpuLoaderError(f"{e.key}: target does not hold exactly {e.nbytes} contiguous bytes")
    chunks = plan([(e.offset, e.nbytes) for e in entries], cfg.buffer_bytes)
    abort = threading.Event()
    hashes = OrderedHashes(checksum, [e.nbytes for e in entries], abort) if checksum else None
    n_threads = n_buffers = n_streams = 0
    odirect, notes = False, []
    t_xfer0 = t_xfer1 = time.perf_counter()
    io_bytes = [0]
    if chunks:  # else every entry is empty: nothing to move (their digests are checked below)
        device = one_device(tensors)
        n_threads = max(1, min(cfg.reader_threads(), len(chunks)))
        n_buffers = max(n_threads, min(cfg.buffers, len(chunks)))
        flats = [flat_bytes(t) for t in tensors]
        eng = pipeline.engine_for(device, cfg, engine)
        n_streams = len(eng.streams)
        fd, odirect, note = _open_for_read(path, cfg.odirect)
        if note:
            notes.append(note)
        ring: queue.Queue[Slot] = queue.Queue()
        made = [0]  # buffers are pinned lazily, by the readers: reading starts after the first
        try:
            eng.begin()
            taken = [0]
            lock = threading.Lock()

            def acquire() -> Slot:
                try:
                    return ring.get_nowait()
                except queue.Empty:
                    pass
                with lock:
                    k = made[0] if made[0] < n_buffers else -1
                    made[0] += k >= 0
                if k < 0:
                    return ring.get()
                try:
                    return eng.alloc(cfg.buffer_bytes, k)
                except BaseException:
                    with lock:
                        made[0] -= 1
                    raise

            def reader() -> None:
                eng.thread_init()
                while not abort.is_set():
                    slot = acquire()
                    try:
                        eng.wait(slot)  # its last H2D copy is done: the buffer may be refilled
                        with lock:  # chunk numbers only go to threads that hold a buffer
                            i = taken[0]
                            taken[0] += 1
                        if i >= len(chunks):
                            return
                        c = chunks[i]
                        n = c.read_length if odirect else c.length
                        got = pread_full(fd, slot.view[:n], c.offset, c.length, odirect, path)
                        with lock:
                            io_bytes[0] += got
                        eng.copies([(flats[p.entry][p.src:p.src + p.length],
                                     slot.tensor[p.buf:p.buf + p.length]) for p in c.pieces], slot)
                        eng.record(slot)
                        if hashes is not None:  # the bytes being DMA'd, while they are
                            for p in c.pieces:
                                hashes.update(p, slot.view[p.buf:p.buf + p.length])
                    finally:
                        ring.put(slot)

            t_xfer0 = time.perf_counter()
            finish(eng, lambda: run_workers(n_threads, reader, abort,
                                            hashes.wake if hashes else (lambda: None)))
            t_xfer1 = time.perf_counter()
        finally:
            os.close(fd)
            n_buffers = made[0]  # how many the readers really pinned
            while not ring.empty():  # drop the last references to the pinned buffers
                ring.get_nowait()
            eng.release()

    if hashes is not None:
        for e, got in zip(entries, hashes.digests()):
            if got != e.checksum:
                raise mismatch(path, e, checksum, got)
    return TransferStats("load", sum(e.nbytes for e in entries), io_bytes[0], len(entries),
                         len(chunks), time.perf_counter() - t0, t_xfer0 - t0, t_xfer1 - t_xfer0,
                         n_threads, n_buffers, cfg.buffer_mb, n_streams, odirect,
                         hashes is not None, notes)
