"""The mounts a process sees, read from /proc/PID/mountinfo in one place: the paths with the
kernel's octal escapes undone (a space in a path is written \\040), the fields fvboot uses named."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Mount:
    id: str
    parent: str
    point: str  # where it is mounted
    options: tuple[str, ...]  # the mount's own (ro, nosuid, ...), not the file system's
    fstype: str


def _unescape(field: str) -> str:
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, ch)
    return field


def parse(lines: Iterable[str]) -> list[Mount]:
    """Mountinfo lines as Mounts, in the kernel's order; lines not in its format are left out."""
    out = []
    for line in lines:
        left, sep, right = line.rstrip("\n").partition(" - ")
        f, tail = left.split(), right.split()
        if sep and len(f) >= 6:
            out.append(Mount(f[0], f[1], _unescape(f[4]), tuple(f[5].split(",")), tail[0] if tail else ""))
    return out


def read(pid: str = "self", proc: str = "/proc") -> list[Mount]:
    """The mounts process PID sees (OSError where it cannot be read)."""
    with open(os.path.join(proc, pid, "mountinfo")) as f:
        return parse(f)
