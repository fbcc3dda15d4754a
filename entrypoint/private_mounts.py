"""fvboot's own mount namespace: a /dev/shm no other container shares, and a writable /tmp.

/dev/shm: `docker run --ipc=host` (which vLLM's own documentation suggests) and Kubernetes'
`hostIPC` give a container the host's /dev/shm. A restored vLLM's processes use the
shared-memory files they had at bake, under the same names in every container of the image: a
second container of the image put those files back over the first one's live queues, which
stopped that server, and each container left its files on the host (found by hand,
2026-12-05). So `fvboot serve` and `fvboot bake` first move into a mount namespace of their own
and mount a fresh tmpfs, as large as the /dev/shm they were given, on /dev/shm: the restored
tree (CRIU binds its /dev/shm from the restorer's), a normal start, CRIU and the weight stager
all see that one, and it is gone with them.

/tmp: under `docker run --read-only` (Kubernetes: readOnlyRootFilesystem) CRIU cannot start (its
kernel probes make folders in /tmp) and neither can a normal start (Python wants a temporary
folder). Where /tmp cannot be written, a tmpfs goes there too, for fvboot and what it starts; a
restored server keeps the /tmp it had at bake (its mount namespace is the checkpoint's).

Needs CAP_SYS_ADMIN, which the restore needs anyway; without it fvboot carries on with the mounts
it was given and says why.
"""

from __future__ import annotations

import ctypes
import os

SHM, TMP = "/dev/shm", "/tmp"
# why this process is not in a mount namespace of its own, once isolate() failed ("" otherwise):
# a restore must not run then (compatibility), its files would be the host's under --ipc=host
not_isolated = ""
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _tmpfs(libc, path: str, options: str) -> None:
    _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()),
           f"mounting a tmpfs on {path}")


def isolate(shm: str = SHM, tmp: str = TMP) -> tuple[bool, str]:
    """Move this process into a mount namespace of its own with a fresh tmpfs on SHM (the size
    of the one it replaces) and, where TMP cannot be written, one on TMP. Call it before any
    thread starts: a mount namespace is per thread, and only this one and what it starts later
    get the new one. Returns (done, why not); not_isolated keeps the why."""
    global not_isolated
    done, why = _isolate(shm, tmp)
    not_isolated = "" if done else why
    return done, why


def _isolate(shm: str, tmp: str) -> tuple[bool, str]:
    try:
        st = os.statvfs(shm)
    except OSError as e:
        return False, f"{shm} cannot be read: {e.strerror}"
    size = st.f_blocks * st.f_frsize
    if size <= 0:
        return False, f"{shm} has no size"
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # nothing mounted here from now on propagates to the container's namespace, or back
        _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
        _tmpfs(libc, shm, f"mode=1777,size={size}")
        if os.path.isdir(tmp) and not os.access(tmp, os.W_OK):
            _tmpfs(libc, tmp, "mode=1777")
    except OSError as e:
        return False, str(e.strerror)
    return True, ""


def writable_overlay(path: str, scratch: str) -> tuple[bool, str]:
    """Make PATH writable in this mount namespace (private_mounts.isolate made it ours): an
    overlay of PATH whose changes go to SCRATCH (fvboot's run folder, in its /dev/shm) and are
    gone with the container. For a normal start under --read-only: vLLM's compile takes lock
    files in its caches even when everything is cached. Returns (done, why not)."""
    upper, work = os.path.join(scratch, "upper"), os.path.join(scratch, "work")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        os.makedirs(upper, mode=0o700, exist_ok=True)
        os.makedirs(work, mode=0o700, exist_ok=True)
        _check(libc.mount(b"overlay", path.encode(), b"overlay", 0,
                          f"lowerdir={path},upperdir={upper},workdir={work}".encode()),
               f"mounting an overlay on {path}")
    except OSError as e:
        return False, str(e.strerror)
    return True, ""
