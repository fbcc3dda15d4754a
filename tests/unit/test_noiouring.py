"""The served tree's io_uring switch: a real process with the filter gets ENOSYS."""

from __future__ import annotations

import subprocess
import sys


def test_io_uring_switch_makes_io_uring_setup_fail_with_enosys():
    code = ("import ctypes,sys; from fvboot.noiouring import disable_io_uring; disable_io_uring();"
            "libc=ctypes.CDLL(None,use_errno=True); p=ctypes.create_string_buffer(120);"
            "r=libc.syscall(425,8,p); print(r, ctypes.get_errno())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["-1", "38"]

