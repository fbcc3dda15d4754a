"""The checksum algorithms fvboot records at bake and checks at restore, without importing torch
(the restore path checks the memory images before vLLM's modules are needed).

BLAKE3 (``blake3`` is a vLLM dependency; ~4.5 GB/s on one core of a CPU with AVX-512, 1.4 GB/s
on one with AVX2 only; releases the GIL) with a fallback to stdlib ``zlib.crc32`` (2.3 GB/s on
that AVX2 CPU; releases the GIL too) where blake3 is missing. What was recorded names its
algorithm, so either side can check what the other wrote. Both catch the accidental damage
these checks are for (a flipped bit, a truncated layer); a hand that can change the image can
change its manifest too.
"""

from __future__ import annotations

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


def hasher(alg: str):
    """A fresh hasher for ALG; UnknownChecksum if this machine has no such algorithm."""
    if alg == "blake3" and blake3 is not None:
        return blake3.blake3()
    if alg == "crc32":
        return Crc32()
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
    for alg in ("blake3", "crc32"):
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
