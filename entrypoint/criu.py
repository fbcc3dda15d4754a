"""Thin wrappers around the `criu` binary: the flags fvboot dumps and restores with, in one place.

The same flags are recorded in the manifest, so what restores is exactly what was dumped.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Sequence

from .errors import FvBootError

# --tcp-established: the engine's loopback connections; --network-lock skip: no iptables in
# containers, and nothing outside the tree talks to it during the dump (the gate is shut);
# --ext-unix-sk: sockets to outside peers (e.g. the log pipe's owner); --link-remap: open files
# that were deleted; --external mnt[]: every mount belongs to the container, not the tree.
COMMON_FLAGS = ("--shell-job", "--tcp-established", "--ext-unix-sk", "--external", "mnt[]")
DUMP_FLAGS = COMMON_FLAGS + ("--link-remap", "--network-lock", "skip")
RESTORE_FLAGS = COMMON_FLAGS + ("--root", "/", "--restore-detached")


def _criu() -> list[str]:
    """The criu command; FV_CRIU_PLUGIN_DIR points CRIU at its plugins (cuda_plugin.so) when they
    are not in the compiled-in /usr/lib/criu (host mode, e.g. the GPU benchmark)."""
    plugins = os.environ.get("FV_CRIU_PLUGIN_DIR")
    return ["criu", "-L", plugins] if plugins else ["criu"]


class CriuError(FvBootError):
    def __init__(self, action: str, log: Path, rc: int) -> None:
        self.log = log
        super().__init__(f"criu {action} failed (exit {rc}): {last_error(log)} (full log: {log})")


def last_error(log: Path) -> str:
    """The most telling error line of a CRIU log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errs = [l for l in lines if "Error" in l or "error" in l or "Can't" in l or "fail" in l]
    return re.sub(r"^\(\s*[\d.]+\)\s*", "", (errs or lines or ["no log"])[-1]).strip()


def version() -> str:
    try:
        out = subprocess.run(["criu", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return " ".join(l.strip() for l in out.splitlines() if l.strip())


def dump(pid: int, images: Path, log: Path) -> None:
    images.mkdir(parents=True, exist_ok=True)
    cmd = [*_criu(), "dump", "-t", str(pid), "-D", str(images), "-o", str(log), "-v4", *DUMP_FLAGS]
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True).returncode
    if rc != 0:
        raise CriuError("dump", log, rc)


def restore(images: Path, workdir: Path, inherit: Sequence[tuple[int, str]],
            env: dict[str, str] | None = None) -> int:
    """Restore detached; returns the host PID of the restored root.

    INHERIT: (our fd, 'pipe:[inode]' recorded at dump) pairs. Logs and pidfile go to WORKDIR so
    the image directory (a read-only image layer in containers) is never written.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log, pidfile = workdir / "criu-restore.log", workdir / "restored.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [*_criu(), "restore", "-D", str(images), "-W", str(workdir), "-o", str(log), "-v4",
           "--pidfile", str(pidfile), *RESTORE_FLAGS]
    for fd, key in inherit:
        cmd += ["--inherit-fd", f"fd[{fd}]:{key}"]
    rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                        pass_fds=[fd for fd, _ in inherit],
                        env={**os.environ, **env} if env else None).returncode
    if rc != 0:
        raise CriuError("restore", log, rc)
    return int(pidfile.read_text().strip())


_TS = re.compile(r"^\((\d+\.\d+)\)")


def restore_phases(log: Path) -> dict[str, float]:
    """Seconds into the restore (CRIU's own log clock) at which the CUDA plugin began resuming
    the GPU, and at which CRIU finished: the timeline's CRIU / CUDA split."""
    out: dict[str, float] = {}
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = _TS.match(line)
        if not m:
            continue
        if "cuda_plugin: resuming devices" in line and "cuda_resume_start" not in out:
            out["cuda_resume_start"] = float(m.group(1))
        elif "Restore finished successfully" in line:
            out["restore_finished"] = float(m.group(1))
    return out
