"""Writing a ``.fvw`` file: tensors of any device, atomically (temp file, fsync, rename).

CUDA tensors go through the GPU dump (:func:`.dump.dump`: pinned buffers, several threads)
unless ``FV_GPU_LOADER=0``; CPU tensors and ``Deferred`` items are written one by one here.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping

import torch

from . import fileformat, settings
from .dump import dump
from .fileformat import (DEFAULT_CHECKSUM, Deferred, flat_bytes, hasher, host_view,
                         lay_out, write_header)
from .stats import WeightFileInfo


def write_weights(path: str | os.PathLike, items: Iterable[tuple[str, torch.Tensor | Deferred]],
                  meta: Mapping[str, Any] | None = None,
                  checksum: str = DEFAULT_CHECKSUM) -> WeightFileInfo:
    """Write tensors to ``path`` atomically (temp file, fsync, rename); any device.

    CUDA tensors go through :func:`fvboot.weights.dump.dump` unless ``FV_GPU_LOADER=0``; CPU
    tensors and ``Deferred`` items are written one by one."""
    t0 = time.perf_counter()
    items = [(k, t if isinstance(t, Deferred) else t.detach().contiguous()) for k, t in items]
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    doc, data_start, end = lay_out(items, meta, checksum)
    entries = doc["entries"]
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    details: dict[str, Any] = {}
    try:
        done = _dump_cuda(fd, items, entries, checksum, details)  # first: see _dump_cuda
        for i, ((_, t), e) in enumerate(zip(items, entries)):
            if i in done:
                continue
            if isinstance(t, Deferred):
                made = t.make().detach().contiguous()
                if made.dtype != t.dtype or tuple(made.shape) != tuple(t.shape):
                    raise ValueError(f"{e['key']}: made {made.dtype}{list(made.shape)}, "
                                     f"declared {t.dtype}{list(t.shape)}")
                t = made
            h, flat = hasher(checksum), flat_bytes(t)
            for a in range(0, e["nbytes"], fileformat.CHUNK):
                part = flat[a:a + fileformat.CHUNK]
                host = part if part.device.type == "cpu" else part.cpu()  # keep it alive
                h.update(mv := host_view(host))
                fileformat.pwrite_full(fd, mv, e["offset"] + a)
            e["checksum"] = h.hexdigest()
        sha = write_header(fd, doc)
        os.ftruncate(fd, max(end, data_start))
        t_sync = time.perf_counter()
        os.fsync(fd)
        details["fsync_seconds"] = round(time.perf_counter() - t_sync, 4)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return WeightFileInfo(path, sum(e["nbytes"] for e in entries), len(entries), sha.hex(),
                          time.perf_counter() - t0, details)


def _dump_cuda(fd: int, items: list, entries: list[dict], checksum: str,
               details: dict[str, Any]) -> set[int]:
    """Write the non-empty CUDA tensors with the pinned-buffer pipeline; their indices.

    Runs before the one-by-one loop: a chunk may zero-fill the padding between two of its
    entries, and (the plan splits at any gap of a whole block, where another entry could lie)
    that never reaches another entry's bytes; going first keeps even that order-proof."""
    ids = [i for i, (_, t) in enumerate(items)
           if not isinstance(t, Deferred) and t.device.type in settings.GPU_DEVICE_TYPES
           and entries[i]["nbytes"]]
    if not ids or not settings.enabled():
        return set()
    by_dev: dict[Any, list[int]] = {}
    for i in ids:
        by_dev.setdefault(items[i][1].device, []).append(i)
    runs = []
    for group in by_dev.values():
        digests, st = dump(fd, [(entries[i]["offset"], entries[i]["nbytes"]) for i in group],
                           [items[i][1] for i in group], checksum)
        for i, d in zip(group, digests):
            entries[i]["checksum"] = d
        runs.append(st.as_dict())
    details["gpu"] = runs
    return set(ids)
