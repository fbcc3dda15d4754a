"""How a GPU transfer runs: the ``FV_LOAD_*`` / ``FV_GPU_LOADER`` settings, parsed and checked
in one place, and the thread counts derived from the machine.

``FV_GPU_LOADER=0`` makes ``load_into`` / ``write_weights`` use their simple per-chunk path for
CUDA tensors too (:func:`enabled`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from .. import runenv
from ..runenv import SETTINGS
from .fileformat import WeightFileError

GPU_DEVICE_TYPES = ("cuda",)  # devices whose tensors go through the GPU paths (ring, page cache)

# the defaults live with every other FV_* setting (fvboot.runenv), which fvboot checks at start
DEFAULT_BUFFERS = int(SETTINGS["FV_LOAD_BUFFERS"].default)
DEFAULT_BUFFER_MB = int(SETTINGS["FV_LOAD_BUFFER_MB"].default)
DEFAULT_STREAMS = int(SETTINGS["FV_LOAD_STREAMS"].default)


class GpuLoaderError(WeightFileError):
    """A GPU transfer could not run (no CUDA, bad settings, unusable file system)."""


def _setting(env: Mapping[str, str], name: str) -> str:
    return runenv.value(name, env, GpuLoaderError)


def _env_int(env: Mapping[str, str], name: str) -> int:
    return int(_setting(env, name))


def _env_bool(env: Mapping[str, str], name: str) -> bool:
    return _setting(env, name) == "1"


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
        vals = dict(buffers=_env_int(env, "FV_LOAD_BUFFERS"), buffer_mb=_env_int(env, "FV_LOAD_BUFFER_MB"),
                    threads=_env_int(env, "FV_LOAD_THREADS"), streams=_env_int(env, "FV_LOAD_STREAMS"),
                    odirect=_env_bool(env, "FV_LOAD_ODIRECT"), register=_env_bool(env, "FV_LOAD_REGISTER"))
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
    return _env_bool(os.environ if env is None else env, "FV_GPU_LOADER")
