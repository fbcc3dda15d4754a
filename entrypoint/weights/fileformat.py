"""The ``.fvw`` file format: one file per worker, read back at memory speed.

Everything that knows the bytes on disk lives here (the header, the JSON index, where each
tensor sits, the checksums); the modules that move the bytes (``load``, ``write``, ``ring``,
``pagecache``, ``dump``) ask this one. Device-agnostic on purpose: no vLLM, no CUDA. The
torch-free part (the layout, header, index, entries, checksums, errors) lives in
``fvboot.weightfile``, whose docstring draws the file, and is re-exported here; this module adds
the tensors' bytes and writing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..checksums import DEFAULT_CHECKSUM, Crc32, blake3  # noqa: F401  (re-exported)
from ..weightfile import (  # noqa: F401  (re-exported: the torch-free part of the format)
    ALIGN, BIG_ENTRY, CHUNK, HEADER, HEADER_SIZE, MAGIC, VERSION, ChecksumMismatchError,
    CorruptHeaderError, MissingKeyError, TensorMismatchError, TruncatedFileError, WeightEntry,
    WeightFileError, WeightIndex, align_up, check_mapped, entry_hasher, hasher, mismatch, read_index)


@dataclass(frozen=True)
class Deferred:
    """A tensor made only when its turn to be written comes (e.g. read back from a packed
    kernel), so a dump holds one such copy at a time, not all of them."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


# --------------------------------------------------------------------------------------------
# tensor bytes


def host_view(t: torch.Tensor) -> memoryview:
    """Writable memoryview over a contiguous CPU tensor's bytes, without ``.numpy()``.

    ``.numpy()`` would tie the storage to a numpy array (and vLLM's release path needs the
    storage to stay resizable), so go through the raw address instead.
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (same storage)."""
    return t.detach().reshape(-1).view(torch.uint8)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_target(e: WeightEntry, t: torch.Tensor) -> None:
    """Refuse a target tensor that cannot take the entry's bytes as they are."""
    dtype = dtype_name(t.dtype)
    if dtype != e.dtype or tuple(t.shape) != e.shape:
        raise TensorMismatchError(f"{e.key}: file has {e.dtype}{list(e.shape)}, "
                                  f"target is {dtype}{list(t.shape)}")
    if not t.is_contiguous():
        raise TensorMismatchError(f"{e.key}: target is not contiguous (strides {t.stride()})")


def check_targets(path: str | os.PathLike, idx: WeightIndex, targets: Mapping[str, torch.Tensor]) -> None:
    """Refuse targets that are not exactly the file's tensors (MissingKeyError, naming the first
    few either way) or one that cannot take its entry's bytes as they are (check_target)."""
    missing = sorted(set(idx.entries) - set(targets))
    extra = sorted(set(targets) - set(idx.entries))
    if missing or extra:
        raise MissingKeyError(f"{path}: no target for {missing[:5]}{'...' if len(missing) > 5 else ''}"
                              f"; not in file: {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for k, e in idx.entries.items():
        check_target(e, targets[k])


# --------------------------------------------------------------------------------------------
# writing: the index first (offsets), the header last


def lay_out(items: Sequence[tuple[str, Any]], meta: Mapping[str, Any] | None,
            checksum: str) -> tuple[dict[str, Any], int, int]:
    """The index document for (key, tensor-like) items, with placeholder checksums; and the
    data start and the end of the last entry (the file is truncated to the larger)."""
    placeholder = hasher(checksum).hexdigest()  # digests have a fixed length per algorithm
    data_start = ALIGN
    while True:  # offsets are absolute, so the index length and data start depend on each other
        entries, off = [], data_start
        for k, t in items:
            n = math.prod(t.shape) * t.dtype.itemsize
            entries.append({"key": k, "dtype": dtype_name(t.dtype),
                            "shape": list(t.shape), "offset": off, "nbytes": n,
                            "checksum": placeholder})
            off = align_up(off + n)
        doc = {"version": VERSION, "checksum": checksum, "meta": dict(meta or {}),
               "entries": entries}
        need = align_up(HEADER_SIZE + len(json.dumps(doc).encode()))
        if need <= data_start:
            return doc, data_start, off
        data_start = need


def pwrite_full(fd: int, data, offset: int) -> None:
    """Write all of DATA at OFFSET: pwrite may write less than asked (a file system's short
    write, the first bytes of an ENOSPC), and a checksum recorded over the whole would then
    cover bytes never written (found by review, 2026-12-06)."""
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote nothing at byte {offset + done}")
        done += n


def write_header(fd: int, doc: dict[str, Any]) -> bytes:
    """Write the header and the index (with the entries' real checksums by now); its sha256."""
    index = json.dumps(doc).encode()
    sha = hashlib.sha256(index).digest()
    pwrite_full(fd, HEADER.pack(MAGIC, VERSION, 0, len(index), sha).ljust(HEADER_SIZE, b"\0") + index, 0)
    return sha


