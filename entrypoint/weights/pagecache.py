"""The page-cache path: when the whole ``.fvw`` file is already in the page cache (a restore
right after the prefetch), the GPU copies the tensors straight out of it, with no CPU copy
(~21 GB/s against ~12 for the pinned ring on an H100; ``FV_LOAD_REGISTER=0`` turns it off).

The file is mapped read-only (libc mmap), checked for residency (cachestat(2), and mincore(2)
where cachestat cannot tell: overlayfs, i.e. every container), and page-locked window by window in place (``cudaHostRegister``, read-only);
registering window i+1 overlaps the copies of window i. With a checksum, CPU threads hash the
same mapped pages while the GPU copies them (:class:`MappedVerifier`). When the file is not
all cached, or the driver refuses to register it, :func:`load_registered` raises
:class:`PageCachePathUnavailable` and the caller uses the pinned ring, with the reason in its notes.
"""

from __future__ import annotations

import ctypes
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Sequence

import torch

from ..residency import PAGE, REGISTER_WINDOW, FileMapping
from .fileformat import WeightEntry, check_mapped, flat_bytes
from .pending import PendingCheck
from .pipeline import one_device
from .plan import windows
from .settings import GpuLoaderError
from .stats import TransferStats

_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly


class PageCachePathUnavailable(GpuLoaderError):
    """The page-cache path cannot load this file now: the caller uses the pinned ring, and says
    why in the load's notes (a restore that took the slower path must show the reason)."""


class NotResident(PageCachePathUnavailable):
    """Part of the file is not in the page cache: the ring reads it faster from disk."""


class RegisterRefused(PageCachePathUnavailable):
    """The driver would not page-lock the mapped file."""


# --------------------------------------------------------------------------------------------
# verifying the mapped pages beside the copies


class MappedVerifier:
    """Checks every entry of a mapped weight file against its recorded checksum in background
    threads (the hashes release the GIL), so verification overlaps the GPU copies of the same
    pages instead of adding a pass. Largest entries first: they bound the wall time. On exit
    it always waits for its threads: the mapping must outlive them."""

    def __init__(self, mapping: FileMapping, entries: Sequence[WeightEntry],
                 alg: str | None, path: str, threads: int) -> None:
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._pool = ThreadPoolExecutor(max(1, threads)) if alg else None
        self._jobs = [self._pool.submit(check_mapped, mapping.addr, e, alg, path)
                      for e in sorted(entries, key=lambda e: -e.nbytes)] if self._pool else []

    def result(self) -> None:
        for job in self._jobs:
            job.result()
        self.seconds = time.perf_counter() - self._t0

    def __enter__(self) -> "MappedVerifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            for job in self._jobs:
                job.cancel()
            self._pool.shutdown(wait=True)


# --------------------------------------------------------------------------------------------
# the copies


def _clear_last_cuda_error() -> None:
    """cudaGetLastError() on this thread. A failed runtime call stays this thread's "last error"
    until read, and torch reads it after its kernel launches (C10_CUDA_KERNEL_LAUNCH_CHECK): a
    refused registration must not surface later as the error of some unrelated kernel. torch's
    cudart binding has no cudaGetLastError, so it is called in the libcudart torch loaded."""
    fn = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if fn is None:
        try:
            with open("/proc/self/maps") as maps:
                path = next((line.split()[-1] for line in maps if "libcudart.so" in line), None)
            fn = ctypes.CDLL(path).cudaGetLastError if path else None
        except (OSError, AttributeError):
            fn = None
    if fn is not None:
        fn()


def _copy_windows(entries: Sequence[WeightEntry], tensors: Sequence[torch.Tensor],
                  mapping: FileMapping, device: torch.device, streams: int = 2,
                  window: int = REGISTER_WINDOW) -> tuple[float, int, float]:
    """Page-lock each window of the mapped file in place (cudaHostRegister, read-only) and let
    the GPU copy the tensors out of it; registering window i+1 overlaps the copies of window i.
    Returns (transfer seconds, windows, seconds spent in cudaHostRegister)."""
    cudart = torch.cuda.cudart()
    flats = [flat_bytes(t) for t in tensors]
    plan_ = windows([(e.offset, e.nbytes) for e in entries], window)
    with torch.cuda.device(device):
        ss = [torch.cuda.Stream(device=device) for _ in range(streams)]
    torch.cuda.synchronize(device)
    inflight: list[tuple[int, Any, torch.Tensor]] = []
    registering = 0.0
    t0 = time.perf_counter()
    try:
        for k, w in enumerate(plan_):
            woff = w.offset
            span = min(-(-w.length // PAGE) * PAGE, -(-mapping.size // PAGE) * PAGE - woff)
            tr = time.perf_counter()
            err = int(cudart.cudaHostRegister(mapping.addr + woff, span, _HOST_REGISTER_READ_ONLY))
            registering += time.perf_counter() - tr
            if err != 0:
                _clear_last_cuda_error()  # else torch's next launch check reports this error
                raise RegisterRefused(f"cudaHostRegister of the mapped weight file failed (error {err})")
            host = torch.frombuffer((ctypes.c_ubyte * span).from_address(mapping.addr + woff),
                                    dtype=torch.uint8)
            inflight.append((mapping.addr + woff, None, host))
            s = ss[k % streams]
            with torch.cuda.stream(s):
                for p in w.pieces:
                    flats[p.entry][p.src:p.src + p.length].copy_(host[p.buf:p.buf + p.length],
                                                                 non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
            inflight[-1] = (mapping.addr + woff, ev, host)
            while len(inflight) > streams:
                addr, ev, _ = inflight.pop(0)
                ev.synchronize()
                cudart.cudaHostUnregister(addr)
    finally:
        torch.cuda.synchronize(device)  # no copy may still read what we unregister and unmap
        for addr, _, _ in inflight:
            cudart.cudaHostUnregister(addr)
    return time.perf_counter() - t0, len(plan_), registering


def load_registered(path: str | os.PathLike, entries: Sequence[WeightEntry],
                    tensors: Sequence[torch.Tensor], checksum: str | None = None,
                    threads: int = 4, known_resident: bool = False,
                    defer_check: bool = False) -> TransferStats:
    """The page-cache path; raises PageCachePathUnavailable (saying why) when the file is not
    all in the page cache (the ring then reads it: faster from disk) or the driver refuses to
    register it. With CHECKSUM, THREADS hash the mapped entries while the GPU copies them; a
    mismatch raises. KNOWN_RESIDENT: the caller has just found every page cached (the restore's
    prefetch, while CRIU ran), so the check is not made again here (~85 ms for 7 GB); a page
    evicted since is read in by the registration, slower but the same bytes. DEFER_CHECK: return
    once the copies are done and leave the hashing running (the stats' ``pending``, which owns
    the mapping until it ends)."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    device = one_device(tensors)
    if device.type != "cuda":
        raise PageCachePathUnavailable(f"the tensors are on {device.type}, not on a CUDA device")
    pending = None
    with ExitStack() as owned:  # unwound in reverse: the hashing threads, the mapping, the file
        fd = os.open(path, os.O_RDONLY)
        owned.callback(os.close, fd)
        size = os.fstat(fd).st_size
        mapping = FileMapping(fd, size)
        owned.callback(mapping.close)
        missing = 0 if known_resident else mapping.missing_pages()
        if missing:
            raise NotResident(f"{missing} of the file's {mapping.pages} pages are not in the page cache")
        t1 = time.perf_counter()
        verifier = owned.enter_context(MappedVerifier(mapping, entries, checksum, path, threads))
        took, n_windows, registering = _copy_windows(entries, tensors, mapping, device)
        if defer_check and checksum:
            later = owned.pop_all()  # the check owns the mapping now, and unwinds it when done

            def finish() -> None:
                with later:
                    verifier.result()

            pending = PendingCheck(finish, path)
        else:
            verifier.result()  # before the mapping goes: raises on a mismatch
    nbytes = sum(e.nbytes for e in entries)
    notes = [f"page cache registered in place (cudaHostRegister, read-only windows: {n_windows} in"
             f" {registering:.3f} s of the {took:.3f} s)"]
    if known_resident:
        notes.append("residency as the prefetch found it (not checked again)")
    if pending is not None:
        notes.append(f"{checksum} of every entry being checked from the page cache after the copies,"
                     " beside the KV wake and the probe")
    elif checksum:
        notes.append(f"{checksum} of every entry checked from the page cache in {verifier.seconds:.3f} s")
    return TransferStats("load", nbytes, nbytes, len(entries), n_windows, time.perf_counter() - t0,
                         t1 - t0, took, 0, 0, REGISTER_WINDOW >> 20, 2, False, checksum is not None,
                         notes, pending)
