"""The checksum algorithms fvboot records at bake and checks at restore, without importing torch
(the restore path checks the memory images before vLLM's modules are needed).

BLAKE3 (``blake3`` is a vLLM dependency; ~4.5 GB/s on one core, releases the GIL) with a
fallback to stdlib ``zlib.crc32`` (~4 GB/s) where blake3 is missing. What was recorded names its
algorithm, so either side can check what the other wrote.
"""

from __future__ import annotations

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
