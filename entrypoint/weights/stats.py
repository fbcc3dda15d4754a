"""What a load or a dump reports: bytes, time, and how the transfer ran (threads, buffers,
notes), returned to the worker extension and printed in the restore timeline."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class WeightFileInfo:
    """The result of ``write_weights``."""

    path: str
    bytes: int
    tensors: int
    index_sha256: str
    seconds: float
    details: dict[str, Any] | None = None  # GPU transfer stats, fsync time


@dataclass(frozen=True)
class LoadStats:
    """The result of ``load_into``."""

    bytes: int
    tensors: int
    seconds: float
    verified: bool
    details: dict[str, Any] | None = None  # GPU transfer stats (threads, buffers, GB/s, ...)
    pending: tuple = field(default=(), repr=False, compare=False)  # PendingChecks still running

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class TransferStats:
    """One GPU transfer (ring, page cache or dump) of one device's tensors."""

    direction: str  # "load" or "dump"
    bytes: int  # tensor bytes moved
    io_bytes: int  # bytes read/written on the file (with the padding inside chunks)
    tensors: int
    chunks: int
    seconds: float  # whole call: setup, transfer, synchronize, teardown
    setup_seconds: float  # pinned buffers, streams
    transfer_seconds: float  # first chunk taken to last copy synchronized
    threads: int
    buffers: int
    buffer_mb: int
    streams: int
    odirect: bool
    verified: bool = False
    notes: list[str] = field(default_factory=list)
    pending: Any = field(default=None, repr=False, compare=False)  # a PendingCheck still running

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pending"}
        d["notes"] = list(self.notes)
        d["gb_per_s"] = round(self.gb_per_s, 3)
        d["transfer_gb_per_s"] = round(self.bytes / self.transfer_seconds / 1e9, 3) \
            if self.transfer_seconds else 0.0
        for k in ("seconds", "setup_seconds", "transfer_seconds"):
            d[k] = round(d[k], 4)
        return d
