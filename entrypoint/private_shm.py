"""A /dev/shm of fvboot's own, so that what it starts never shares one with other containers.

`docker run --ipc=host` (which vLLM's own documentation suggests) and Kubernetes' `hostIPC` give
a container the host's /dev/shm. A restored vLLM's processes use the shared-memory files they
had at bake, under the same names in every container of the image: a second container of the
image put those files back over the first one's live queues, which stopped that server, and each
container left its files on the host (found by hand, 2026-12-05). So `fvboot serve` and `fvboot
bake` first move into a mount namespace of their own and mount a fresh tmpfs, as large as the
/dev/shm they were given, on /dev/shm: the restored tree (CRIU binds its /dev/shm from the
restorer's), a normal start, CRIU and the weight stager all see that one, and it is gone with
them. Needs CAP_SYS_ADMIN, which the restore needs anyway; without it fvboot carries on with the
/dev/shm it was given and says why.
"""

from __future__ import annotations

import ctypes
import os

SHM = "/dev/shm"
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def isolate(path: str = SHM) -> tuple[bool, str]:
    """Move this process into a mount namespace of its own with a fresh tmpfs on PATH (the size
    of the one it replaces). Call it before any thread starts: a mount namespace is per thread,
    and only this one and what it starts later get the new one. Returns (done, why not)."""
    try:
        st = os.statvfs(path)
    except OSError as e:
        return False, f"{path} cannot be read: {e.strerror}"
    size = st.f_blocks * st.f_frsize
    if size <= 0:
        return False, f"{path} has no size"
    libc = _libc()
    try:
        _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # nothing mounted here from now on propagates to the container's namespace, or back
        _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
        _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                          f"mode=1777,size={size}".encode()), f"mounting a tmpfs on {path}")
    except OSError as e:
        return False, str(e.strerror)
    return True, ""
