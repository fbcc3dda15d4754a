"""The container's mounts a checkpoint takes with it, and whether this container has them.

The served tree's mount namespace is a copy of the bake container's, and CRIU puts each of its
mounts back by binding the same path of the restoring container (`--external mnt[]`): every
such path must be there, or `criu restore` fails late, in words only CRIU's log explains ("mnt-v2:
Can't stat mountpoint .../cpu"). Container runtimes agree on most of them (/dev, /dev/shm, /sys,
/etc/hosts, /etc/resolv.conf) but not on the cgroup mounts: a cgroup v1 host mounts one folder
per controller, a v2 host one file system, and containerd's own `ctr run` none (found by hand,
2026-12-06: an image baked by Docker on a v1 host fell back under `ctr run`). vLLM reads its
cgroup's limits as it starts; the restored server has started long before. So the bake detaches
/sys/fs/cgroup from the tree's mounts just before the dump, the checkpoint's mounts are recorded
in the manifest, and a start refuses by name, before CRIU runs, a container that lacks one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterable

from . import mountinfo
from .criu import image_entries, proto_fields
from .errors import FvBootError

CGROUPS = "/sys/fs/cgroup"
# CRIU's images/mnt.proto: mnt_entry.mountpoint = 7, source = 8, ext_key = 18 (set for a mount
# bound from the restoring side, whose path is then the source)
_MOUNTPOINT, _SOURCE, _EXT_KEY = 7, 8, 18


class MountsError(FvBootError):
    pass


def detach_cgroups(init_pid: int, timeout: float = 30) -> bool:
    """Detach CGROUPS and every mount below it (as many as are stacked there) from the mount
    namespace of INIT_PID, the served tree's init. True if something was detached, False where
    nothing is mounted at or below it."""
    try:
        theirs = [os.stat(f"/proc/{init_pid}/ns/{kind}").st_ino for kind in ("mnt", "pid")]
        ours = [os.stat(f"/proc/self/ns/{kind}").st_ino for kind in ("mnt", "pid")]
    except OSError as e:
        raise MountsError(f"cannot read the served tree's mounts: {e}") from None
    if theirs[0] == ours[0] or theirs[1] == ours[1]:  # not a tree of its own: this container's, or the host's
        raise MountsError(f"process {init_pid} is not the init of a served tree's own namespaces: nothing detached")
    detached = False
    for _ in range(32):  # each umount takes the topmost mount at a path, with every mount below it
        below = [p for p in _points(init_pid) if _under_cgroups(p)]
        if not below:
            return detached
        # CGROUPS itself where it is mounted; else the shallowest mount below it (a v1 host's
        # controller folders on a /sys without a cgroup tmpfs)
        target = CGROUPS if CGROUPS in below else min(below, key=lambda p: (p.count("/"), p))
        try:
            # the PID namespace too: umount reads /proc/self/mountinfo, and the tree's /proc is its own
            r = subprocess.run(["nsenter", f"--target={init_pid}", "--mount", "--pid", "--", "umount", "--lazy",
                                target], capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MountsError(f"detaching {target} from the served tree's mounts failed: {e}") from None
        if r.returncode != 0:
            raise MountsError(f"detaching {target} from the served tree's mounts failed: "
                              f"{(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")
        detached = True
    raise MountsError(f"{CGROUPS} was still mounted in the served tree after 32 detaches")


def _under_cgroups(point: str) -> bool:
    """POINT is CGROUPS or below it (not /sys/fs/cgroup2 or the like beside it)."""
    return point == CGROUPS or point.startswith(CGROUPS + "/")


def _points(pid: int) -> list[str]:
    try:
        return [m.point for m in mountinfo.read(str(pid))]
    except OSError as e:
        raise MountsError(f"cannot read the served tree's mounts: {e}") from None


def needed(images: Path) -> tuple[str, ...]:
    """The paths of this container that the checkpoint's mounts are bound from at restore (the
    mounts CRIU's images in IMAGES mark external), sorted."""
    found: set[str] = set()
    for path in sorted(images.glob("mountpoints-*.img")):
        for entry in image_entries(path):
            f = dict(proto_fields(entry))
            source = f.get(_SOURCE)
            if f.get(_EXT_KEY) is not None and isinstance(source, bytes) and source.startswith(b"/"):
                found.add(source.decode(errors="replace"))
    return tuple(sorted(found))


def missing_here(paths: Iterable[str]) -> list[str]:
    """Those of PATHS this container has not got."""
    return [p for p in paths if not os.path.lexists(p)]
