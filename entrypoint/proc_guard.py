"""The served tree's /proc, guarded as the container runtime guarded the container's.

The tree runs in a PID namespace of its own, so it needs a /proc of its own: a fresh proc mount.
A fresh proc mount carries none of the guards the runtime put on the container's /proc: Docker,
containerd, CRI-O and Podman (runc's and crun's `readonlyPaths` and `maskedPaths`) make
/proc/sys, /proc/irq, /proc/bus, /proc/fs and /proc/sysrq-trigger read-only and hide
/proc/kcore, /proc/keys, /proc/timer_list, /proc/acpi and the like. Without them a process of
the tree, root without any capability, could write the host's kernel settings (found by hand,
2026-12-06: `kernel.core_pattern` and `vm.swappiness` were written from a restored vLLM's
processes; `kernel.core_pattern` is a known way out of a container). So nsinit reads the guards
from the container's /proc mounts, replaces that /proc by a fresh one and puts the same guards on
it before anything else runs. The container's /proc and its guards are then gone from the tree's
mount namespace, so a checkpoint does not depend on which paths this runtime guarded.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Iterable

from .errors import FvBootError

PROC = "/proc"
OWN_PROC = "--own-proc"  # nsinit's first argument where it is PID 1 of a PID and mount namespace of its own
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
_MS_REMOUNT, _MS_BIND = 0x20, 0x1000
_MNT_DETACH = 0x2
_LOCKED = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC


class ProcGuardError(FvBootError):
    """The tree's /proc could not be given the container's guards: the server must not start."""


@dataclass(frozen=True)
class Guard:
    path: str  # under /proc, e.g. /proc/sys
    read_only: bool  # True: the path stays visible, read-only; False: it is hidden (masked)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def guards(mountinfo: Iterable[str], proc: str = PROC) -> list[Guard]:
    """The guards on the /proc mount that is visible now (the topmost mount at PROC), read from
    /proc/self/mountinfo lines: a read-only bind of part of the same proc is a read-only guard; a
    tmpfs (a folder) or a bind of a device node such as /dev/null (a file) on top of a path is a
    mask. Other mounts there (binfmt_misc on a host) are not guards and are left out."""
    rows = []
    for line in mountinfo:
        left, sep, right = line.rstrip("\n").partition(" - ")
        f = left.split()
        if not sep or len(f) < 6:
            continue
        fstype = right.split()[0] if right.split() else ""
        rows.append((f[0], f[1], _unescape(f[3]), _unescape(f[4]), f[5].split(","), fstype))
    procs = [r for r in rows if r[3] == proc and r[5] == "proc"]
    if not procs:
        return []
    proc_id = procs[-1][0]
    out = []
    for mount_id, parent, root, point, options, fstype in rows:
        if parent != proc_id or not point.startswith(proc + "/"):
            continue
        if fstype == "proc":
            if "ro" in options:
                out.append(Guard(point, read_only=True))
        elif fstype in ("tmpfs", "devtmpfs"):
            out.append(Guard(point, read_only=False))
    return sorted(set(out), key=lambda g: (g.path.count("/"), g.path))


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, what: str) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    if libc.mount(enc(source), enc(target), enc(fstype), flags, None) != 0:
        e = ctypes.get_errno()
        raise ProcGuardError(f"{what} {target} in the served tree failed: {os.strerror(e)}")


def apply(found: list[Guard], libc=None) -> None:
    """Put each guard on the /proc visible now. A path this /proc does not have is skipped (the
    container's kernel had it, this proc does not show it: nothing to guard)."""
    libc = libc or ctypes.CDLL(None, use_errno=True)
    for g in found:
        if not os.path.lexists(g.path):
            continue
        if g.read_only:
            _mount(libc, g.path, g.path, None, _MS_BIND, "binding")
            _mount(libc, None, g.path, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _LOCKED, "making read-only")
        elif os.path.isdir(g.path):
            _mount(libc, "tmpfs", g.path, "tmpfs", _MS_RDONLY | _LOCKED, "hiding")
        else:
            _mount(libc, "/dev/null", g.path, None, _MS_BIND, "hiding")


def _parent(proc: str, pid: str) -> int:
    with open(os.path.join(proc, pid, "status")) as f:
        return int(next(l for l in f if l.startswith("PPid:")).split()[1])


def _own_namespaces(proc: str) -> None:
    """Refuse unless this process is PID 1 of a PID namespace and in a mount namespace made for
    it: `unshare --pid --fork --mount` makes both, so the `unshare` process, this one's parent,
    shares it, and the process that started `unshare` does not. Elsewhere, detaching /proc would
    take it from the container (or the host) itself. /proc is still the outer one here, so it
    names these processes by their outer PIDs."""
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
    """In a new PID and mount namespace, before the server starts: read the guards on the
    container's /proc, detach that /proc (with its guards), mount this namespace's proc and put
    the same guards on it. Raises ProcGuardError if any step fails. Returns the guards."""
    _own_namespaces(proc)
    with open(os.path.join(proc, "self/mountinfo")) as f:
        found = guards(f, proc)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(proc.encode(), _MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise ProcGuardError(f"detaching the container's {proc} in the served tree failed: {os.strerror(e)}")
    _mount(libc, "proc", proc, "proc", _LOCKED, "mounting a proc on")
    apply(found, libc)
    return found
