"""Per-process switch for io_uring: a seccomp filter that makes io_uring_setup fail with ENOSYS.

CRIU cannot dump io_uring file descriptors, and uvloop's bundled libuv opens a ring per event
loop (UV_USE_IO_URING=0 does not stop it). Libraries that see ENOSYS fall back to epoll, so
the served tree has no ring to dump. Inherited by every child; no host sysctl needed.
"""

from __future__ import annotations

import ctypes
import struct

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_NR_IO_URING_SETUP = 425  # the same number on every architecture (unified table since 5.1)
_ENOSYS = 38
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def disable_io_uring() -> None:
    """Install the filter on the calling process (and so on all its future children)."""
    insns = [
        (_BPF_LD_W_ABS, 0, 0, 0),                         # A = seccomp_data.nr
        (_BPF_JEQ_K, 0, 1, _NR_IO_URING_SETUP),           # if A == io_uring_setup
        (_BPF_RET_K, 0, 0, _RET_ERRNO | _ENOSYS),         #   return -ENOSYS
        (_BPF_RET_K, 0, 0, _RET_ALLOW),                   # else allow
    ]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in insns))
    prog = _SockFprog(len(insns), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) for io_uring")
