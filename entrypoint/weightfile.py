"""The ``.fvw`` weight file's header and index, without torch: the restore's weight stager
(``fvboot.weight_stager``, a process that must start in milliseconds) reads the index and checks
the entries before any torch is imported. ``fvboot.weights.fileformat`` re-exports all of it and
adds what needs torch (the tensors' bytes, writing).

Layout::

    [0:64)      header: b"FVWEIGHT", u32 version, u32 reserved, u64 index length,
                32-byte sha256 of the index, zero padding
    [64:64+n)   index: UTF-8 JSON {"version", "checksum", "meta", "entries": [...]},
                one entry per tensor: key, dtype, shape, offset (absolute), nbytes, checksum
    ...         raw bytes of each tensor, each starting on a 4096-byte boundary; file padded
                to a multiple of 4096 so O_DIRECT reads and pinned-buffer copies work later

Checksums: those of ``checksums`` (BLAKE3, or zlib.crc32 where blake3 is missing), named in
the index, so either reader can check either file. The index itself is covered by sha256 in the
header (it is small).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from . import checksums
from .checksums import blake3

MAGIC = b"FVWEIGHT"
VERSION = 1
ALIGN = 4096
HEADER = struct.Struct("<8sIIQ32s")  # magic, version, reserved, index_len, index_sha256
HEADER_SIZE = 64
CHUNK = 64 << 20  # bytes per read/write call: large, so syscalls are few and the GIL is free
BIG_ENTRY = 16 << 20  # entries this large hash with blake3's own thread pool too


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class WeightFileError(Exception):
    """Base of every error this package raises about a weight file."""


class CorruptHeaderError(WeightFileError):
    """Bad magic, unknown version, or an index that does not parse or match its hash."""


class TruncatedFileError(WeightFileError):
    """The file is shorter than its index says."""


class ChecksumMismatchError(WeightFileError):
    """A tensor's bytes do not match the checksum recorded when it was written."""


class MissingKeyError(WeightFileError):
    """The file and the targets do not name the same tensors."""


class TensorMismatchError(WeightFileError):
    """A target tensor has another shape, dtype or layout than the file's entry."""


@dataclass(frozen=True)
class WeightEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class WeightIndex:
    version: int
    checksum: str  # algorithm name
    entries: dict[str, WeightEntry]
    meta: dict[str, Any]
    index_sha256: str
    file_size: int

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def hasher(alg: str):
    """A fresh hasher for the algorithm an index names."""
    try:
        return checksums.hasher(alg)
    except checksums.UnknownChecksum as e:
        raise CorruptHeaderError(str(e)) from None


def entry_hasher(alg: str, nbytes: int):
    """``hasher``, with blake3's own threads for an entry of ``BIG_ENTRY`` bytes or more."""
    if alg == "blake3" and blake3 is not None and nbytes >= BIG_ENTRY:
        auto = getattr(blake3.blake3, "AUTO", None)
        if auto is not None:
            return blake3.blake3(max_threads=auto)  # same digest, several cores on one big tensor
    return hasher(alg)


def mismatch(path: str | os.PathLike, e: WeightEntry, alg: str, got: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(f"{path}: {e.key} ({e.nbytes} bytes at offset {e.offset}): "
                                 f"checksum mismatch, {alg} {got} != recorded {e.checksum}")


def check_mapped(addr: int, e: WeightEntry, alg: str, path: str | os.PathLike) -> None:
    """Entry E of the weight file mapped at ADDR against its recorded checksum (ALG); raises
    ChecksumMismatchError naming it. Both readers of a cached dump check it this way: the GPU
    loader's page-cache path and the weight stager."""
    h = entry_hasher(alg, e.nbytes)
    if e.nbytes:
        h.update(memoryview((ctypes.c_char * e.nbytes).from_address(addr + e.offset)).cast("B"))
    if h.hexdigest() != e.checksum:
        raise mismatch(path, e, alg, h.hexdigest())


def read_index(path: str | os.PathLike) -> WeightIndex:
    """Parse and check the header and index (not the tensor bytes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise TruncatedFileError(f"{path}: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        magic, version, _, n, sha = HEADER.unpack_from(head)
        if magic != MAGIC:
            raise CorruptHeaderError(f"{path}: magic {magic!r}, expected {MAGIC!r}: not a weight file")
        if version != VERSION:
            raise CorruptHeaderError(f"{path}: format version {version}, this reader knows {VERSION}")
        if HEADER_SIZE + n > size:
            raise TruncatedFileError(f"{path}: index needs {HEADER_SIZE + n} bytes, file has {size}")
        raw = f.read(n)
    if hashlib.sha256(raw).digest() != sha:
        raise CorruptHeaderError(f"{path}: index sha256 mismatch (index bytes are corrupt)")
    try:
        doc = json.loads(raw)
        entries = {e["key"]: WeightEntry(e["key"], e["dtype"], tuple(e["shape"]), e["offset"],
                                         e["nbytes"], e["checksum"]) for e in doc["entries"]}
        alg, meta = doc["checksum"], doc.get("meta", {})
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptHeaderError(f"{path}: index does not parse: {exc}") from exc
    for e in entries.values():
        if e.offset % ALIGN:
            raise CorruptHeaderError(f"{path}: {e.key} at offset {e.offset}, not {ALIGN}-aligned")
        if e.offset + e.nbytes > size:
            raise TruncatedFileError(f"{path}: {e.key} ends at byte {e.offset + e.nbytes}, "
                                     f"file has {size} bytes (truncated)")
    return WeightIndex(version, alg, entries, meta, sha.hex(), size)
