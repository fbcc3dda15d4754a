"""Whether the kernel's OOM killer ended processes of this container, said in fvboot's words.
Under a memory limit too small for the server (`docker run --memory`, a pod's
resources.limits.memory) the kernel kills one of vLLM's processes with SIGKILL: vLLM prints
nothing about it, and what fvboot saw was only "Remote end closed connection" or "exited before
it became healthy". The container's memory cgroup counts those kills; fvboot compares the count
before and after and names the cause and the limit."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# cgroup v2 (the container's own cgroup namespace), then v1's memory hierarchy
_V2, _V1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
_NO_LIMIT = 1 << 60  # v1 says "no limit" with a page-rounded 2**63 - 1


def _field(path: Path, name: str) -> Optional[int]:
    """NAME's number in a flat-keyed cgroup file ("oom_kill 3"), or None."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def kills(v2: Path = _V2, v1: Path = _V1) -> Optional[int]:
    """Processes of this container the OOM killer has ended so far; None where not to be read
    (v1 kernels before 4.13 do not count them)."""
    n = _field(v2 / "memory.events", "oom_kill")
    return n if n is not None else _field(v1 / "memory.oom_control", "oom_kill")


def limit(v2: Path = _V2, v1: Path = _V1) -> Optional[int]:
    """This container's memory limit in bytes; None where there is none or it cannot be read."""
    for path in (v2 / "memory.max", v1 / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            n = int(text)
        except ValueError:
            return None
        return None if n >= _NO_LIMIT else n
    return None


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


class OomWatch:
    """The kill count when fvboot began; `since()` says what changed."""

    def __init__(self, v2: Path = _V2, v1: Path = _V1) -> None:
        self._dirs = (v2, v1)
        self._before = kills(v2, v1)

    def since(self) -> Optional[str]:
        """A sentence naming the kills since this watch began and the limit, or None if none."""
        now = kills(*self._dirs)
        if now is None or self._before is None or now <= self._before:
            return None
        cap, n = limit(*self._dirs), now - self._before
        said = f"the kernel's OOM killer ended {n} of this container's processes"
        if cap is None:
            return f"{said} (no memory limit is set on it: the machine, or a limit above the container, ran out)"
        return (f"{said}: its memory limit, {_size(cap)}, is too small for the server; raise it (docker run"
                " --memory, or the pod's resources.limits.memory)")
