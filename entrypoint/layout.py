"""Where everything lives under FV_HOME (/fv in images; any folder in host mode)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ADMIN_HEADER = b"x-fastvllm-admin"  # carries the per-start admin token (middleware, control)
# what the middleware answers (403) to an admin route called without this start's token
ADMIN_REFUSED = "this endpoint is reserved to fvboot"
# on every answer to a request whose admin token the middleware took: an answer without it came
# from a server that does not know this start's token (another on the same port)
ADMIN_ANSWER = b"x-fastvllm-admin-answer"
# The server learns where its runtime settings are from this variable, set once at bake: the
# middleware's environment is frozen in the checkpoint, so a restore writes to the same path.
RUNTIME_FILE_ENV = "FV_RUNTIME_FILE"
RUN_DIR = "/dev/shm/.fvboot"  # Layout.run_dir unless FV_RUN_DIR says otherwise


@dataclass(frozen=True)
class Layout:
    home: Path

    @classmethod
    def from_env(cls, home: str | None = None) -> "Layout":
        return cls(Path(home or os.environ.get("FV_HOME", "/fv")))

    @property
    def model_dir(self) -> Path:
        return self.home / "model"

    @property
    def weights_dir(self) -> Path:
        return self.home / "weights"

    @property
    def checkpoint_dir(self) -> Path:
        return self.home / "checkpoint"

    @property
    def images_dir(self) -> Path:
        """CRIU's image directory."""
        return self.checkpoint_dir / "criu"

    @property
    def shm_archive(self) -> Path:
        """/dev/shm as it was at the dump: CRIU does not store it, vLLM's queues live there."""
        return self.checkpoint_dir / "dev-shm.tar"

    @property
    def manifest(self) -> Path:
        return self.home / "manifest.json"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def run_dir(self) -> Path:
        """Scratch files of one start (logs, sockets, the runtime file); never part of the
        checkpoint. In fvboot's own /dev/shm (private_mounts), which the restored tree binds from
        CRIU's: writable under `docker run --read-only` too, where the image's /tmp is not, and
        seen by the restored server where a --tmpfs /tmp, mounted after the bake, is not."""
        return Path(os.environ.get("FV_RUN_DIR", RUN_DIR))

    @property
    def runtime_file(self) -> Path:
        """This start's secrets and settings for the server (admin token, ...): written afresh
        by every start, mode 0600, never under FV_HOME, so no image layer holds them."""
        return self.run_dir / "runtime.json"
