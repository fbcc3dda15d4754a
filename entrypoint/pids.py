"""Whether the container's pids limit leaves room for the checkpoint's server. A pids cgroup
(`docker run --pids-limit`, a Kubernetes pod's pids limit) counts every thread: vLLM's server is
~80 of them on the CPU image, and CRIU must create them all. Without room its restorer fails with
"Unable to create a thread: -11"; the restore's checks say why, and by how much, before it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# cgroup v2 (the container's own cgroup namespace), then v1's pids hierarchy
_PIDS_DIRS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/pids"))


def room(dirs: tuple[Path, ...] = _PIDS_DIRS) -> Optional[tuple[int, int]]:
    """(the limit, tasks counted now) of this container's pids cgroup; None where unlimited or
    not to be read."""
    for d in dirs:
        try:
            limit = (d / "pids.max").read_text().strip()
            current = int((d / "pids.current").read_text().strip())
        except (OSError, ValueError):
            continue
        return None if limit == "max" else (int(limit), current)
    return None


def lacking_room(tasks: Optional[int], dirs: tuple[Path, ...] = _PIDS_DIRS) -> Optional[str]:
    """Why TASKS more threads (the checkpoint's, recorded at bake) would not fit here, or None."""
    limits = room(dirs) if tasks else None
    if limits is None:
        return None
    limit, current = limits
    if current + tasks <= limit:
        return None
    return (f"this container may run {limit} processes and threads (docker run --pids-limit, or the pod's pids"
            f" limit), {current} of them running, and the checkpoint's server has {tasks}: raise the limit to more"
            f" than {current + tasks}, or lift it (a normal start needs about as many, more while it compiles)")
