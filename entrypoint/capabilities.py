"""The served tree gives up the capabilities only CRIU needs.

The container gets SYS_ADMIN, SYS_PTRACE, NET_ADMIN, DAC_READ_SEARCH and SYS_TIME for CRIU
(README "Capabilities"). vLLM needs none of them, and it is what API clients talk to: the tree's
init drops them from every set (bounding, effective, permitted, inheritable, ambient) before vLLM
starts, and with them Docker's defaults vLLM never uses (NET_RAW, MKNOD, AUDIT_WRITE, SETFCAP),
so the server runs with less than a default container's capabilities. CRIU dumps the tree with
those credentials and restores it with them; fvboot and CRIU keep theirs.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

# What a container needs for CRIU on Docker 20.10 (README "Capabilities"; --privileged is not
# needed, and fails on hosts without CAP_SYS_RESOURCE): one list for fvbuild's `run-flags` and
# bake container, the examples, the tests, and fvboot's own hint when a restore lacks them.
# SYS_CHROOT is Docker's by default; a container that drops them all (Kubernetes' drop: [ALL])
# needs it back for CRIU's setns into the restored mount namespace.
CONTAINER_CAPS = ("SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN", "DAC_READ_SEARCH", "SYS_TIME", "SYS_CHROOT")
CONTAINER_SECURITY_OPT = ("seccomp=unconfined", "apparmor=unconfined")
CONTAINER_SHM_SIZE = "1g"  # vLLM's queues


def docker_run_flags() -> list[str]:
    """CONTAINER_CAPS, CONTAINER_SECURITY_OPT and the /dev/shm size as `docker run` flags."""
    flags = [f for cap in CONTAINER_CAPS for f in ("--cap-add", cap)]
    flags += [f for opt in CONTAINER_SECURITY_OPT for f in ("--security-opt", opt)]
    return flags + ["--shm-size", CONTAINER_SHM_SIZE]


# What to do when CRIU lacks them, literally: an operator who ran `docker run IMAGE` may not have
# fvbuild at hand.
RUN_WITH = (f"run the container with {' '.join(docker_run_flags())} (`fvbuild run-flags IMAGE` prints them,"
            " and a GPU image's GPUs)")


# <linux/capability.h>, by number: the names Docker's --cap-add takes
CAP_NAMES = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
             "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
             "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
             "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
             "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
             "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")


def names(mask: int) -> frozenset[str]:
    """The capabilities a /proc/PID/status mask holds, by name (a number this table lacks as CAP_N)."""
    return frozenset(CAP_NAMES[n] if n < len(CAP_NAMES) else f"CAP_{n}"
                     for n in range(mask.bit_length()) if mask >> n & 1)


# The capabilities only CRIU needs, by number: the served tree drops them
RESTORE_ONLY = {f"CAP_{name}": CAP_NAMES.index(name) for name in
                ("DAC_READ_SEARCH", "NET_ADMIN", "SYS_PTRACE", "SYS_ADMIN", "SYS_TIME", "CHECKPOINT_RESTORE")}
# Docker's defaults vLLM never uses: the tree gives them up too, so that it holds none a cluster's
# policy may take from the container (NET_RAW most often): CRIU can give a restored process only
# what it holds itself, and a checkpoint whose tree held NET_RAW would not restore without it.
UNUSED_DEFAULTS = ("NET_RAW", "MKNOD", "AUDIT_WRITE", "SETFCAP")
TREE_GIVES_UP = {**RESTORE_ONLY, **{f"CAP_{name}": CAP_NAMES.index(name) for name in UNUSED_DEFAULTS}}
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def give_up_unneeded() -> None:
    """Drop TREE_GIVES_UP from the calling process (and so from all it starts); OSError if the
    kernel refuses the change of the capability sets."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in TREE_GIVES_UP.values():
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL: a cap this kernel lacks; EPERM: not ours
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget: " + os.strerror(ctypes.get_errno()))
    for cap in TREE_GIVES_UP.values():
        word, bit = divmod(cap, 32)
        keep = ~(1 << bit) & 0xFFFFFFFF
        data[word].effective &= keep
        data[word].permitted &= keep
        data[word].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset: " + os.strerror(ctypes.get_errno()))


def held(status_text: str) -> dict[str, set[str]]:
    """Which of TREE_GIVES_UP each set of a /proc/PID/status text holds: {"CapEff": {...}, ...}."""
    out = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            mask = int(value.strip(), 16)
            out[key] = {name for name, cap in TREE_GIVES_UP.items() if mask >> cap & 1}
    return out


def _status_value(pid: "int | str", key: str) -> Optional[str]:
    """KEY's value in /proc/PID/status, or None where it has none; OSError if PID is gone."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return value.strip()
    return None


def permitted(pid: "int | str" = "self") -> frozenset[str]:
    """The capabilities process PID may use (its permitted set, from /proc), by name; OSError if
    it is gone."""
    mask = _status_value(pid, "CapPrm")
    return names(int(mask, 16)) if mask is not None else frozenset()


def seccomp_filtered(pid: "int | str" = "self") -> bool:
    """Whether process PID runs under a seccomp filter (Docker's default profile, Kubernetes'
    RuntimeDefault): CRIU then meets "Operation not permitted" on calls its capabilities allow
    (pivot_root, seen 2026-12-05), which says nothing of the cause by itself."""
    try:
        return _status_value(pid, "Seccomp") == "2"
    except OSError:
        return False


def restore_lacks(tree_caps: "tuple[str, ...] | None", have: frozenset[str]) -> list[str]:
    """What a restore needs and HAVE (fvboot's permitted set) lacks: CRIU's own capabilities
    (CONTAINER_CAPS), and every one the checkpoint's processes held (TREE_CAPS, recorded at bake;
    None in an older manifest): CRIU gives a process back only capabilities it holds itself, and
    a restore without them fails inside CRIU's restorer (it hung until its timeout)."""
    needed = set(CONTAINER_CAPS) | set(tree_caps or ())
    return sorted(needed - have)
