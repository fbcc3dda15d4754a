"""The checksum algorithms fvboot records at bake and checks at restore, without importing torch
(the restore path checks the memory images before vLLM's modules are needed).

BLAKE3 (``blake3`` is a vLLM dependency; ~4.5 GB/s on one core of a CPU with AVX-512, 1.4 GB/s
on one with AVX2 only; releases the GIL) with a fallback to stdlib ``zlib.crc32`` (2.8 GB/s on
that AVX2 CPU; releases the GIL too) where blake3 is missing, and XXH3 (64-bit) where the
system has xxHash's own library (``libxxhash.so.0``: apt's own library depends on it in Debian
and Ubuntu; 11.5 GB/s on the AVX2 CPU), through ctypes, which lets go of the GIL for the call. What was recorded names its algorithm, so either side can check what the other
wrote. All of them catch the accidental damage these checks are for (a flipped bit, a
truncated layer); a hand that can change the image can change its manifest too.
"""

from __future__ import annotations

import ctypes
import functools
import time
import zlib

try:
    import blake3

    DEFAULT_CHECKSUM = "blake3"
except ImportError:  # pragma: no cover - blake3 ships with vLLM
    blake3 = None
    DEFAULT_CHECKSUM = "crc32"


class UnknownChecksum(ValueError):
    """A recorded checksum names an algorithm this machine does not have."""


class Crc32:
    """zlib.crc32 behind the hashlib interface (update / hexdigest)."""

    v = 0

    def update(self, data) -> None:
        self.v = zlib.crc32(data, self.v)

    def hexdigest(self) -> str:
        return f"{self.v:08x}"


XXHASH_LIBRARY = "libxxhash.so.0"


@functools.lru_cache(maxsize=1)
def _xxhash():
    """xxHash's library with the streaming XXH3 calls typed, or None where it is not installed
    (loaded on first use: fvboot's start does not pay for it)."""
    try:
        lib = ctypes.CDLL(XXHASH_LIBRARY)
        lib.XXH3_createState.restype = ctypes.c_void_p
        lib.XXH3_freeState.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_reset.argtypes = [ctypes.c_void_p]
        # a library built with xxHash's x86 dispatch also exports the update that picks the
        # widest vectors the CPU has at run time (AVX2: 11.5 GB/s against 8-9 on the AMD EPYC
        # machine); the digest is the same
        lib.fv_update = getattr(lib, "XXH3_64bits_update_dispatch", None) or lib.XXH3_64bits_update
        lib.fv_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.XXH3_64bits_digest.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_digest.restype = ctypes.c_uint64
    except (OSError, AttributeError):  # not installed, or a build without XXH3 (before 0.8)
        return None
    return lib


class Xxh3:
    """XXH3's 64-bit digest behind the hashlib interface (update / hexdigest)."""

    def __init__(self) -> None:
        self.lib = _xxhash()
        self.state = self.lib.XXH3_createState()
        if not self.state:
            raise MemoryError("XXH3_createState")
        self.lib.XXH3_64bits_reset(self.state)

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        # the buffer's own memory, not a copy: bytes are passed as they are, a writable buffer
        # (a bytearray, a ctypes view of a mapping) through ctypes; only a read-only slice is copied
        if isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
            buf = view.obj
        elif not view.readonly:
            buf = (ctypes.c_char * view.nbytes).from_buffer(view)
        else:
            buf = bytes(view)
        self.lib.fv_update(self.state, buf, view.nbytes)

    def hexdigest(self) -> str:
        return f"{self.lib.XXH3_64bits_digest(self.state):016x}"

    def __del__(self) -> None:
        if getattr(self, "state", None):
            self.lib.XXH3_freeState(self.state)
            self.state = None


def hasher(alg: str):
    """A fresh hasher for ALG; UnknownChecksum if this machine has no such algorithm."""
    if alg == "blake3" and blake3 is not None:
        return blake3.blake3()
    if alg == "crc32":
        return Crc32()
    if alg == "xxh3" and _xxhash() is not None:
        return Xxh3()
    raise UnknownChecksum(f"checksum algorithm {alg!r} is not available here")


def digest(alg: str, data) -> str:
    h = hasher(alg)
    h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def fastest_checksum() -> str:
    """Of the algorithms this machine has, the one that hashes fastest here (best of three 16 MiB
    digests each, ~40 ms): the bake records it for the memory images, whose check a restore
    runs beside CRIU and the probe on the same cores (on a 2-core AVX2 machine blake3's check
    ended 0.37 s after the probe's answers: the restore's last step)."""
    data = bytes(range(256)) * (1 << 16)
    best: dict[str, float] = {}
    for alg in ("blake3", "crc32", "xxh3"):
        try:
            hasher(alg)
        except UnknownChecksum:
            continue
        times = []
        for _ in range(3):
            t = time.perf_counter()
            digest(alg, data)
            times.append(time.perf_counter() - t)
        best[alg] = min(times)
    return min(best, key=best.get) if best else DEFAULT_CHECKSUM
