"""Raw weight dump format (``.fvw``): one file per worker, read back at memory speed.

Layout::

    [0:64)      header: b"FVWEIGHT", u32 version, u32 reserved, u64 index length,
                32-byte sha256 of the index, zero padding
    [64:64+n)   index: UTF-8 JSON {"version", "checksum", "meta", "entries": [...]},
                one entry per tensor: key, dtype, shape, offset (absolute), nbytes, checksum
    ...         raw bytes of each tensor, each starting on a 4096-byte boundary; file padded
                to a multiple of 4096 so O_DIRECT reads and pinned-buffer copies work later

Checksums: BLAKE3 (``blake3`` is a vLLM dependency; ~4.5 GB/s on one core, releases the GIL)
with a fallback to stdlib ``zlib.crc32`` (~4 GB/s) where blake3 is missing. The algorithm is
named in the index, so either reader can check either file. The index itself is covered by
sha256 in the header (it is small). Device-agnostic on purpose: no vLLM import here.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

MAGIC = b"FVWEIGHT"
VERSION = 1
ALIGN = 4096
HEADER = struct.Struct("<8sIIQ32s")  # magic, version, reserved, index_len, index_sha256
HEADER_SIZE = 64
CHUNK = 64 << 20  # bytes per read/write call: large, so syscalls are few and the GIL is free
GPU_DEVICE_TYPES = ("cuda",)  # devices whose tensors go through fvboot.gpu_loader

try:
    import blake3 as _blake3

    DEFAULT_CHECKSUM = "blake3"
except ImportError:  # pragma: no cover - blake3 ships with vLLM
    _blake3 = None
    DEFAULT_CHECKSUM = "crc32"


class WeightFileError(Exception):
    """Base of every error this module raises about a weight file."""


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


@dataclass(frozen=True)
class WeightFileInfo:
    path: str
    bytes: int
    tensors: int
    index_sha256: str
    seconds: float
    details: dict[str, Any] | None = None  # GPU transfer stats, fsync time


@dataclass(frozen=True)
class LoadStats:
    bytes: int
    tensors: int
    seconds: float
    verified: bool
    details: dict[str, Any] | None = None  # GPU transfer stats (threads, buffers, GB/s, ...)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass(frozen=True)
class Deferred:
    """A tensor made only when its turn to be written comes (e.g. read back from a packed
    kernel), so a dump holds one such copy at a time, not all of them."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _hasher(alg: str):
    if alg == "blake3" and _blake3 is not None:
        return _blake3.blake3()
    if alg == "crc32":
        return _Crc32()
    raise CorruptHeaderError(f"checksum algorithm {alg!r} is not available here")


class _Crc32:
    v = 0

    def update(self, data) -> None:
        self.v = zlib.crc32(data, self.v)

    def hexdigest(self) -> str:
        return f"{self.v:08x}"


def _host_view(t: torch.Tensor) -> memoryview:
    """Writable memoryview over a contiguous CPU tensor's bytes, without ``.numpy()``.

    ``.numpy()`` would tie the storage to a numpy array (and vLLM's release path needs the
    storage to stay resizable), so go through the raw address instead.
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def write_weights(path: str | os.PathLike, items: Iterable[tuple[str, torch.Tensor | Deferred]],
                  meta: Mapping[str, Any] | None = None,
                  checksum: str = DEFAULT_CHECKSUM) -> WeightFileInfo:
    """Write tensors to ``path`` atomically (temp file, fsync, rename); any device.

    CUDA tensors go through :func:`fvboot.gpu_loader.dump` (pinned buffers, several threads)
    unless ``FV_GPU_LOADER=0``; CPU tensors and ``Deferred`` items are written one by one."""
    t0 = time.perf_counter()
    items = [(k, t if isinstance(t, Deferred) else t.detach().contiguous()) for k, t in items]
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys: {sorted({k for k in keys if keys.count(k) > 1})}")
    placeholder = _hasher(checksum).hexdigest()  # digests have a fixed length per algorithm
    data_start = ALIGN
    while True:  # offsets are absolute, so the index length and data start depend on each other
        entries, off = [], data_start
        for k, t in items:
            n = math.prod(t.shape) * t.dtype.itemsize
            entries.append({"key": k, "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape), "offset": off, "nbytes": n,
                            "checksum": placeholder})
            off = _align(off + n)
        doc = {"version": VERSION, "checksum": checksum, "meta": dict(meta or {}),
               "entries": entries}
        need = _align(HEADER_SIZE + len(json.dumps(doc).encode()))
        if need <= data_start:
            break
        data_start = need
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
            h, flat = _hasher(checksum), _flat_bytes(t)
            for a in range(0, e["nbytes"], CHUNK):
                part = flat[a:a + CHUNK]
                host = part if part.device.type == "cpu" else part.cpu()  # keep it alive
                h.update(mv := _host_view(host))
                os.pwrite(fd, mv, e["offset"] + a)
            e["checksum"] = h.hexdigest()
        index = json.dumps(doc).encode()
        sha = hashlib.sha256(index).digest()
        os.pwrite(fd, HEADER.pack(MAGIC, VERSION, 0, len(index), sha).ljust(HEADER_SIZE, b"\0")
                  + index, 0)
        os.ftruncate(fd, max(off, data_start))
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
           if not isinstance(t, Deferred) and t.device.type in GPU_DEVICE_TYPES and entries[i]["nbytes"]]
    if not ids:
        return set()
    from fvboot import gpu_loader

    if not gpu_loader.enabled():
        return set()
    by_dev: dict[Any, list[int]] = {}
    for i in ids:
        by_dev.setdefault(items[i][1].device, []).append(i)
    runs = []
    for group in by_dev.values():
        digests, st = gpu_loader.dump(fd, [(entries[i]["offset"], entries[i]["nbytes"]) for i in group],
                                      [items[i][1] for i in group], checksum)
        for i, d in zip(group, digests):
            entries[i]["checksum"] = d
        runs.append(st.as_dict())
    details["gpu"] = runs
    return set(ids)


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


def _check_target(e: WeightEntry, t: torch.Tensor) -> None:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype != e.dtype or tuple(t.shape) != e.shape:
        raise TensorMismatchError(f"{e.key}: file has {e.dtype}{list(e.shape)}, "
                                  f"target is {dtype}{list(t.shape)}")
    if not t.is_contiguous():
        raise TensorMismatchError(f"{e.key}: target is not contiguous (strides {t.stride()})")


def load_into(path: str | os.PathLike, targets: Mapping[str, torch.Tensor], verify: bool = False,
              threads: int | None = None) -> LoadStats:
    """Fill existing tensors in place from ``path``; CPU targets get the bytes directly, CUDA
    targets go through :func:`fvboot.gpu_loader.load` (unless ``FV_GPU_LOADER=0``)."""
    t0 = time.perf_counter()
    idx = read_index(path)
    missing = sorted(set(idx.entries) - set(targets))
    extra = sorted(set(targets) - set(idx.entries))
    if missing or extra:
        raise MissingKeyError(f"{path}: no target for {missing[:5]}{'...' if len(missing) > 5 else ''}"
                              f"; not in file: {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for k, e in idx.entries.items():
        _check_target(e, targets[k])
    details = _load_cuda(path, idx, targets, verify, threads)
    rest = [e for e in idx.entries.values() if details is None or e.key not in details["keys"]]
    if details is not None:
        del details["keys"]
    work = [(e, a, min(CHUNK, e.nbytes - a)) for e in rest for a in range(0, e.nbytes, CHUNK)]
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
        flat = _flat_bytes(targets[e.key])
        if flat.device.type == "cpu":
            pread_into(_host_view(flat[a:a + n]), e.offset + a, e.key)
        else:  # other devices: stage through host memory (a pinned ring is the GPU path's job)
            buf = torch.empty(n, dtype=torch.uint8)
            pread_into(_host_view(buf), e.offset + a, e.key)
            flat[a:a + n].copy_(buf)

    def check(e: WeightEntry) -> None:
        h, flat = _hasher(idx.checksum), _flat_bytes(targets[e.key])
        for a in range(0, e.nbytes, CHUNK):
            part = flat[a:a + CHUNK]
            host = part if part.device.type == "cpu" else part.cpu()  # keep it alive
            h.update(_host_view(host))
        if h.hexdigest() != e.checksum:
            raise ChecksumMismatchError(f"{path}: {e.key} ({e.nbytes} bytes at offset {e.offset}): "
                                        f"{idx.checksum} {h.hexdigest()} != recorded {e.checksum}")

    try:
        with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(read_chunk, work))
            if verify:
                list(pool.map(check, rest))
    finally:
        os.close(fd)
    return LoadStats(idx.total_bytes, len(idx.entries), time.perf_counter() - t0, verify, details)


def _load_cuda(path, idx: WeightIndex, targets: Mapping[str, torch.Tensor], verify: bool,
               threads: int | None) -> dict[str, Any] | None:
    """Fill the CUDA targets with the pinned-buffer pipeline (verify on the way, no read-back);
    None when there are none or ``FV_GPU_LOADER=0``."""
    by_dev: dict[Any, list[WeightEntry]] = {}
    for e in idx.entries.values():
        t = targets[e.key]
        if t.device.type in GPU_DEVICE_TYPES:
            by_dev.setdefault(t.device, []).append(e)
    if not by_dev:
        return None
    from fvboot import gpu_loader

    if not gpu_loader.enabled():
        return None
    cfg = gpu_loader.Config.from_env(threads=threads)
    runs, keys = [], set()
    for group in by_dev.values():
        st = gpu_loader.load(path, group, [targets[e.key] for e in group],
                             idx.checksum if verify else None, cfg)
        runs.append(st.as_dict())
        keys.update(e.key for e in group)
    return {"gpu": runs, "keys": keys}
