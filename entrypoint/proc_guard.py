"""The served tree's /proc, guarded as the container runtime guarded the container's.

The tree runs in a PID namespace of its own, so it needs a /proc of its own: a fresh proc mount.
A fresh proc mount carries none of what the runtime put on the container's /proc: Docker,
containerd, CRI-O and Podman (runc's and crun's `readonlyPaths` and `maskedPaths`) make
/proc/sys, /proc/irq, /proc/bus, /proc/fs and /proc/sysrq-trigger read-only and hide
/proc/kcore, /proc/keys, /proc/timer_list, /proc/acpi and the like behind /dev/null or an empty
tmpfs; NVIDIA's container toolkit puts a tmpfs of its own making on /proc/driver/nvidia (the
driver's parameters as the container may see them, this container's GPUs only). Without the
guards a process of the tree, root without any capability, could write the host's kernel
settings (found by hand, 2026-12-06: `kernel.core_pattern` and `vm.swappiness` were written
from a restored vLLM's processes; `kernel.core_pattern` is a known way out of a container).

So nsinit, PID 1 of the tree's PID and mount namespaces, mounts its namespace's proc over the
container's before anything else runs and carries each of those mounts over: a read-only part of
proc is made read-only in the new proc too; a tmpfs or a device node on a proc path (a mask, the
toolkit's folder) is bound there as it is, from the container's /proc. Other mounts are not
carried: binfmt_misc on a host, and LXCFS's views (`fuse.lxcfs` on /proc/meminfo, /proc/cpuinfo,
... on some Kubernetes nodes), so the tree reads the host's figures there (vLLM sizes nothing
from them: its KV cache is sized by its arguments or the GPU); nor the container's proc mount's
own options (`hidepid=`, a read-only /proc as a whole), which no common runtime sets.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Iterable

from .errors import FvBootError
from .mountinfo import parse as mountinfo_parse

PROC = "/proc"
OWN_PROC = "--own-proc"  # nsinit's first argument where it is PID 1 of a PID and mount namespace of its own
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND, _MS_REC = 0x20, 0x1000, 0x4000
_LOCKED = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
_O_PATH = 0o10000000
_CARRIED = ("tmpfs", "devtmpfs")  # what masks and NVIDIA's toolkit put on proc paths


class ProcGuardError(FvBootError):
    """The tree's /proc could not be given the container's guards: the server must not start."""


@dataclass(frozen=True)
class Guard:
    path: str  # under /proc, e.g. /proc/sys
    read_only: bool  # True: that part of proc, read-only; False: the container's mount there, bound as it is


def guards(mountinfo: Iterable[str], proc: str = PROC) -> list[Guard]:
    """The mounts on the /proc that is visible now (the topmost proc mount at PROC), from
    /proc/self/mountinfo lines: a read-only bind of part of the same proc, or a tmpfs or device
    node (a folder or file hidden, or filled by NVIDIA's toolkit). Shallowest first."""
    rows = mountinfo_parse(mountinfo)
    procs = [m for m in rows if m.point == proc and m.fstype == "proc"]
    if not procs:
        return []
    # the visible proc and the parts of it bound below it, to any depth: a runtime's mask may lie
    # under its read-only /proc/sys (runc binds readonlyPaths before it masks maskedPaths); what
    # lies under a carried tmpfs goes with it (bound recursively)
    ids, grown = {procs[-1].id}, True
    while grown:
        grown = False
        for m in rows:
            if m.fstype == "proc" and m.parent in ids and m.id not in ids and m.point.startswith(proc + "/"):
                ids.add(m.id)
                grown = True
    out = set()
    for m in rows:
        if m.parent not in ids or not m.point.startswith(proc + "/"):
            continue
        if m.fstype == "proc" and "ro" in m.options:
            out.add(Guard(m.point, read_only=True))
        elif m.fstype in _CARRIED:
            out.add(Guard(m.point, read_only=False))
    return sorted(out, key=lambda g: (g.path.count("/"), g.path))


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    if libc.mount(enc(source), enc(target), enc(fstype), flags, None) != 0:
        e = ctypes.get_errno()
        raise ProcGuardError(f"{what} {target} in the served tree failed: {os.strerror(e)}")


def _parent(proc: str, pid: str) -> int:
    with open(os.path.join(proc, pid, "status")) as f:
        return int(next(l for l in f if l.startswith("PPid:")).split()[1])


def _own_namespaces(proc: str) -> None:
    """Refuse unless this process is PID 1 of a PID namespace and in a mount namespace made for
    it: `unshare --pid --fork --mount` makes both, so the `unshare` process, this one's parent,
    shares it, and the process that started `unshare` does not. Elsewhere, a proc mounted over
    /proc would hide the container's (or the host's) own. /proc is still the outer one here, so
    it names these processes by their outer PIDs."""
    try:
        starter = _parent(proc, str(_parent(proc, "self")))
        own = os.stat(os.path.join(proc, "self/ns/mnt")).st_ino
        starters = os.stat(os.path.join(proc, str(starter), "ns/mnt")).st_ino if starter else own
    except (OSError, StopIteration, ValueError) as e:
        raise ProcGuardError(f"cannot tell whether this is a mount namespace of its own: {e}") from None
    if os.getpid() != 1 or own == starters:
        raise ProcGuardError("asked to mount the served tree's /proc outside a PID and mount namespace of "
                             "its own; nothing was changed")


def fresh_guarded_proc(proc: str = PROC) -> list[Guard]:
    """In a new PID and mount namespace, before the server starts: mount this namespace's proc
    over the container's /proc and carry the container's guards over to it. Raises
    ProcGuardError if any step fails. Returns the guards."""
    _own_namespaces(proc)
    try:
        with open(os.path.join(proc, "self/mountinfo")) as f:
            found = guards(f, proc)
    except OSError as e:
        raise ProcGuardError(f"cannot read the container's mounts: {e.strerror}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    held = {}  # the container's mounts to carry, held open: the new proc hides their paths
    try:
        for g in found:
            if not g.read_only:
                try:
                    held[g.path] = os.open(g.path, _O_PATH | os.O_CLOEXEC)
                except OSError as e:
                    raise ProcGuardError(f"cannot open the container's {g.path}: {e.strerror}") from None
        _mount(libc, "proc", proc, "proc", _LOCKED, "mounting a proc on")
        for g in found:
            if not os.path.lexists(g.path):  # the container's kernel showed it, this proc does not
                continue
            if g.read_only:
                _mount(libc, g.path, g.path, None, _MS_BIND, "binding")
                _mount(libc, None, g.path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _LOCKED, "making read-only")
            else:  # /proc/self is this namespace's now, and this process's fds are still its own
                _mount(libc, f"{proc}/self/fd/{held[g.path]}", g.path, None, _MS_BIND | _MS_REC, "carrying over")
    finally:
        for fd in held.values():
            os.close(fd)
    return found


def container_guards() -> list[Guard]:
    """The guards on this process's /proc (fvboot's: the container's, as its runtime set them);
    none where they cannot be read, as on a host."""
    try:
        with open(os.path.join(PROC, "self/mountinfo")) as f:
            return guards(f)
    except OSError:
        return []


def tree_guards(init_pid: int) -> list[Guard]:
    """The guards on the served tree's own /proc, read from its init's mounts (the bake records
    them with the checkpoint)."""
    try:
        with open(f"/proc/{init_pid}/mountinfo") as f:
            return guards(f)
    except OSError as e:
        raise ProcGuardError(f"cannot read the served tree's mounts: {e}") from None
