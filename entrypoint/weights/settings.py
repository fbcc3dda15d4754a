"""How a GPU transfer runs: the ``FV_LOAD_*`` / ``FV_GPU_LOADER`` settings, parsed and checked
in one place, and the thread counts derived from the machine.

``FV_GPU_LOADER=0`` makes ``load_into`` / ``write_weights`` use their simple per-chunk path for
CUDA tensors too (:func:`enabled`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from .fileformat import WeightFileError

GPU_DEVICE_TYPES = ("cuda",)  # devices whose tensors go through the GPU paths (ring, page cache)

DEFAULT_BUFFERS = 16  # measured best on an H100 box (bench/results/gpu_weight_load_h100.json)
DEFAULT_BUFFER_MB = 32
DEFAULT_STREAMS = 4


class GpuLoaderError(WeightFileError):
    """A GPU transfer could not run (no CUDA, bad settings, unusable file system)."""


def _env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise GpuLoaderError(f"{name}={raw!r}: expected an integer in [{lo}, {hi}]") from None
    if not lo <= v <= hi:
        raise GpuLoaderError(f"{name}={raw!r}: expected an integer in [{lo}, {hi}]")
    return v


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise GpuLoaderError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def auto_threads(buffers: int, cpus: int | None = None) -> int:
    """Reader threads when none are asked for: half the cores (2..8), leaving >= 2 buffers in
    flight to the GPU while every reader holds one."""
    cpus = cpus or os.cpu_count() or 1
    want = min(8, max(2, cpus // 2))
    return max(1, min(want, buffers - 2 if buffers > 3 else buffers - 1 or 1))


@dataclass(frozen=True)
class Config:
    buffers: int = DEFAULT_BUFFERS  # pinned staging buffers in the ring
    buffer_mb: int = DEFAULT_BUFFER_MB  # MiB each (a multiple of 4 KiB, so any whole MiB)
    threads: int = 0  # reader/writer threads; 0 = auto_threads()
    streams: int = DEFAULT_STREAMS  # CUDA streams the copies are spread over
    odirect: bool = False  # O_DIRECT reads (bypass the page cache)
    register: bool = True  # a file all in the page cache goes to the GPU without a CPU copy

    def __post_init__(self) -> None:
        if self.buffers < 1 or self.buffer_mb < 1 or self.threads < 0 or self.streams < 1:
            raise GpuLoaderError(f"bad transfer settings: {self}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Settings from ``FV_LOAD_*``; keyword arguments that are not None win."""
        env = os.environ if env is None else env
        vals = dict(buffers=_env_int(env, "FV_LOAD_BUFFERS", DEFAULT_BUFFERS, 1, 256),
                    buffer_mb=_env_int(env, "FV_LOAD_BUFFER_MB", DEFAULT_BUFFER_MB, 1, 4096),
                    threads=_env_int(env, "FV_LOAD_THREADS", 0, 0, 256),
                    streams=_env_int(env, "FV_LOAD_STREAMS", DEFAULT_STREAMS, 1, 64),
                    odirect=_env_bool(env, "FV_LOAD_ODIRECT", False),
                    register=_env_bool(env, "FV_LOAD_REGISTER", True))
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**vals)

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_mb << 20

    def reader_threads(self) -> int:
        """Threads a load uses: never more than buffers (a reader holds one while it reads)."""
        return min(self.threads or auto_threads(self.buffers), self.buffers)


def verify_threads(cpus: int | None = None) -> int:
    """Hashing threads beside the page-cache load: all cores but two (the copy loop and the
    driver need one each), 2..12."""
    cpus = cpus or os.cpu_count() or 1
    return max(2, min(12, cpus - 2))


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """``FV_GPU_LOADER=0`` turns the fast paths off (the simple per-chunk loop is used)."""
    return _env_bool(os.environ if env is None else env, "FV_GPU_LOADER", True)
