"""Loading a ``.fvw`` file into existing tensors, in place: the entry point of the weight path
on restore (``fv_load_weights`` calls :func:`load_into`).

CPU targets get the bytes directly (threaded ``preadv`` into the tensors' memory). CUDA
targets, per device, go through :func:`load_tensors` (unless ``FV_GPU_LOADER=0``): the
page-cache path when the whole file is cached (``pagecache``), the pinned ring otherwise
(``ring``); either verifies every entry on the way when asked, with no read-back.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch

from . import fileformat, settings
from .fileformat import (TruncatedFileError, WeightEntry, WeightIndex, check_targets, flat_bytes,
                         hasher, host_view, mismatch, read_index)
from .pagecache import PageCachePathUnavailable, load_registered
from .pending import PendingCheck
from .ring import ODirectRefused, load_ring
from .settings import Config, verify_threads
from .stats import LoadStats, TransferStats


def load_into(path: str | os.PathLike, targets: Mapping[str, torch.Tensor], verify: bool = False,
              threads: int | None = None, known_resident: bool = False,
              defer_check: bool = False) -> LoadStats:
    """Fill existing tensors in place from ``path``; CPU targets get the bytes directly, CUDA
    targets go through :func:`load_tensors` (unless ``FV_GPU_LOADER=0``). KNOWN_RESIDENT: the
    caller has just found the whole file in the page cache (see :func:`load_tensors`).
    DEFER_CHECK (with VERIFY): return once the bytes are in place; the checks that can go on
    without the file's reads (the CPU targets', the page-cache path's) keep running, and the
    stats' ``pending`` holds them (:class:`.pending.PendingCheck`): the caller must have every
    one's result before it serves these weights."""
    t0 = time.perf_counter()
    idx = read_index(path)
    check_targets(path, idx, targets)
    details = _load_cuda(path, idx, targets, verify, threads, known_resident, defer_check)
    rest = [e for e in idx.entries.values() if details is None or e.key not in details["keys"]]
    pending: list[PendingCheck] = []
    if details is not None:
        del details["keys"]
        pending += details.pop("pending")
    work = [(e, a, min(fileformat.CHUNK, e.nbytes - a)) for e in rest for a in range(0, e.nbytes, fileformat.CHUNK)]
    fd = os.open(path, os.O_RDONLY)

    def pread_into(mv: memoryview, off: int, key: str) -> None:
        got = 0
        while got < len(mv):
            n = os.preadv(fd, [mv[got:]], off + got)
            if n == 0:
                raise TruncatedFileError(f"{path}: unexpected end of file inside {key}")
            got += n

    def read_chunk(job) -> None:
        e, a, n = job
        flat = flat_bytes(targets[e.key])
        if flat.device.type == "cpu":
            pread_into(host_view(flat[a:a + n]), e.offset + a, e.key)
        else:  # other devices: stage through host memory (a pinned ring is the GPU path's job)
            buf = torch.empty(n, dtype=torch.uint8)
            pread_into(host_view(buf), e.offset + a, e.key)
            flat[a:a + n].copy_(buf)

    def check(e: WeightEntry) -> None:
        h, flat = hasher(idx.checksum), flat_bytes(targets[e.key])
        for a in range(0, e.nbytes, fileformat.CHUNK):
            part = flat[a:a + fileformat.CHUNK]
            host = part if part.device.type == "cpu" else part.cpu()  # keep it alive
            h.update(host_view(host))
        if h.hexdigest() != e.checksum:
            raise mismatch(path, e, idx.checksum, h.hexdigest())

    n_threads = threads or min(8, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(n_threads) as pool:
            list(pool.map(read_chunk, work))
            if verify and not (defer_check and rest):
                list(pool.map(check, rest))
    finally:
        os.close(fd)
    if verify and defer_check and rest:  # the check reads the targets (kept alive by it), not the file
        def check_rest() -> None:
            with ThreadPoolExecutor(n_threads) as pool:
                list(pool.map(check, rest))

        pending.append(PendingCheck(check_rest, f"{path} ({len(rest)} tensors in host memory)"))
    return LoadStats(idx.total_bytes, len(idx.entries), time.perf_counter() - t0, verify, details,
                     tuple(pending))


def _load_cuda(path, idx: WeightIndex, targets: Mapping[str, torch.Tensor], verify: bool,
               threads: int | None, known_resident: bool = False,
               defer_check: bool = False) -> dict[str, Any] | None:
    """Fill the CUDA targets with the GPU paths (verify on the way, no read-back); None when
    there are none or ``FV_GPU_LOADER=0``."""
    by_dev: dict[Any, list[WeightEntry]] = {}
    for e in idx.entries.values():
        t = targets[e.key]
        if t.device.type in settings.GPU_DEVICE_TYPES:
            by_dev.setdefault(t.device, []).append(e)
    if not by_dev or not settings.enabled():
        return None
    cfg = Config.from_env(threads=threads)
    runs, keys, pending = [], set(), []
    for group in by_dev.values():
        st = load_tensors(path, group, [targets[e.key] for e in group],
                          idx.checksum if verify else None, cfg, known_resident=known_resident,
                          defer_check=defer_check)
        runs.append(st.as_dict())
        keys.update(e.key for e in group)
        if st.pending is not None:
            pending.append(st.pending)
    return {"gpu": runs, "keys": keys, "pending": pending}


def load_tensors(path: str | os.PathLike, entries: Sequence[WeightEntry],
                 tensors: Sequence[torch.Tensor], checksum: str | None = None,
                 config: Config | None = None, engine: Any = None,
                 known_resident: bool = False, defer_check: bool = False) -> TransferStats:
    """Fill ``tensors`` (contiguous, one CUDA device, already checked against ``entries``) from
    the file; with ``checksum`` (the index's algorithm) verify every entry on the way.

    When the whole file is in the page cache, the GPU copies straight out of the page cache
    (:func:`.pagecache.load_registered`: no CPU copy; ``FV_LOAD_REGISTER=0`` turns it off)
    while CPU threads check the same pages against the index. Otherwise, and if the driver
    refuses, the pinned ring (:func:`.ring.load_ring`) reads the file and hashes what it puts
    in its buffers. ``engine`` (tests, benchmarks) forces the ring with that copy engine.

    With O_DIRECT asked for, a file system that refuses it (at open or at the first reads)
    gets the page-cache path instead, and the stats' notes say so. ``known_resident``: the
    caller has just found the whole file in the page cache, so the page-cache path does not
    check it again. ``defer_check``: the page-cache path returns after its copies and leaves its
    hashing running (the stats' ``pending``); the ring hashes what it reads as it reads it."""
    cfg = config or Config.from_env()
    skipped = None
    if engine is None and not cfg.odirect and cfg.register and entries:
        try:
            return load_registered(path, entries, tensors, checksum, cfg.threads or verify_threads(),
                                   known_resident=known_resident, defer_check=defer_check)
        except PageCachePathUnavailable as exc:
            skipped = f"pinned ring, not the page-cache path: {exc}"
    try:
        st = load_ring(path, entries, tensors, checksum, cfg, engine)
    except ODirectRefused as exc:
        if not cfg.odirect:
            raise
        st = load_ring(path, entries, tensors, checksum, replace(cfg, odirect=False), engine)
        st.notes.append(f"O_DIRECT reads refused, fell back to the page cache: {exc}")
    if skipped:
        st.notes.append(skipped)
    return st
