"""CPU state the kernel keeps per process and CRIU does not checkpoint: the permission to use
AMX tile data (Intel Sapphire Rapids and later, x86-64 Linux 5.16+). oneDNN asks for it once
(arch_prctl ARCH_REQ_XCOMP_PERM) and from then on runs AMX kernels; a restored process has lost
the permission, and its first AMX instruction kills it (SIGILL: vLLM's CPU worker "died
unexpectedly" at the first request after every restore on such a machine). So the worker records
at bake what it was permitted (:func:`permitted`) and asks for the same again after a restore,
before anything runs (:func:`request`); a machine that cannot grant it is refused with the
reason, and the restore falls back to a normal start."""

from __future__ import annotations

import ctypes
import os
import platform

ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
DYNAMIC_FEATURES = {XFEATURE_XTILEDATA: "AMX tile data"}  # what a process must ask for
_SYS_ARCH_PRCTL = 158  # x86-64


class PermissionRefused(RuntimeError):
    """This machine would not grant a CPU feature the checkpointed process was using."""


def _arch_prctl(code: int, arg: int) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(_SYS_ARCH_PRCTL, code, ctypes.c_ulong(arg))
    return rc, ctypes.get_errno()


def permitted() -> int:
    """The extended CPU features (XSAVE bit mask) this process may use; 0 where the kernel or
    the machine has no such permission system (not x86-64, Linux before 5.16)."""
    if platform.machine() != "x86_64":
        return 0
    mask = ctypes.c_uint64(0)
    rc, _ = _arch_prctl(ARCH_GET_XCOMP_PERM, ctypes.addressof(mask))
    return int(mask.value) if rc == 0 else 0


def request(features: int) -> list[str]:
    """Ask again for every dynamically permitted feature in FEATURES (a mask from
    :func:`permitted`, recorded before the checkpoint); returns the names granted. Raises
    PermissionRefused, naming the feature, where this machine will not grant one."""
    granted = []
    for bit, name in DYNAMIC_FEATURES.items():
        if not features & (1 << bit):
            continue
        rc, err = _arch_prctl(ARCH_REQ_XCOMP_PERM, bit)
        if rc != 0:
            raise PermissionRefused(
                f"the checkpointed process used {name} (XSAVE feature {bit}), which this machine does not"
                f" grant ({os.strerror(err)}): it was baked on a CPU with AMX, this one has none or its"
                " kernel does not allow it")
        granted.append(name)
    return granted
