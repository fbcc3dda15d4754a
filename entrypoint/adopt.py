"""A sleeping engine's GPU memory, made by the weight stager while CRIU restores the engine
(``FV_WAKE_MEMORY=helper``, the default where the weights are staged).

Waking a restored engine allocates its memory again: vLLM's allocator creates physical memory
for every sleeping allocation (the weights' pool, the KV cache) and maps it at the addresses the
engine kept (0.09 s for a 3B model's weights and 0.29 s for its 112 GB KV cache on an H200),
after the CUDA resume, on the path to the first token. Instead the stager, which has a CUDA
context beside the restore anyway, creates the same allocations as exportable memory and hands
a file descriptor for each to the worker over a Unix socket in fvboot's run folder
(``HandOver``, ``receive_fds``); the worker imports them, and vLLM's wake maps them where it would have created memory: ``install`` puts a
``create_and_map`` in front of vLLM's that maps an adopted allocation at its address, records
its handle where vLLM keeps it (a later sleep releases it as its own), and leaves every other
allocation, or one that does not fit or map, to vLLM. Torch-free: the stager's side runs
without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Sequence

from .cuda_driver import CudaError
from .local_socket import listen_privately

HAND_OVER_WAIT_S = 30.0  # how long the stager waits for the worker to come for its descriptors
BATCH = 128  # descriptors per message (the kernel takes at most 253 in one)


class HandOver:
    """The stager's side: DESCRIPTORS (the exported allocations, in the pool's order) given to
    the first process of the same user that connects to the Unix socket at PATH, over
    SCM_RIGHTS. A socket rather than pidfd_getfd: the served tree lives in a PID namespace of its
    own, where the stager's process id names nothing, but it sees fvboot's run folder (its
    runtime file is there). The stager's copies are closed once given, or at ``close``."""

    def __init__(self, path: str, descriptors: Sequence[int], wait: float = HAND_OVER_WAIT_S) -> None:
        self.path, self.fds = path, list(descriptors)
        self._lock = threading.Lock()
        self.given = False
        self._sock = listen_privately(path, socket.SOCK_SEQPACKET)
        self._sock.settimeout(wait)
        self._thread = threading.Thread(target=self._serve, name="fv-stager-hand-over", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:  # not come for in time, or closed
            self.close()
            return
        with conn:
            try:
                conn.settimeout(HAND_OVER_WAIT_S)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
                with self._lock:
                    if uid == os.geteuid() and self.fds:
                        for k in range(0, len(self.fds), BATCH):
                            socket.send_fds(conn, [b"m"], self.fds[k:k + BATCH])
                        self.given = True
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        """Stop waiting, close the stager's copies of the descriptors (the allocations stay
        while a handle or a descriptor holds them), remove the socket. Idempotent."""
        with self._lock:
            fds, self.fds = self.fds, []
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def receive_fds(path: str, count: int, timeout: float = HAND_OVER_WAIT_S) -> list[int]:
    """The worker's side: COUNT descriptors from the HandOver at PATH, now ours (close-on-exec),
    in the order given. OSError says what went wrong; none received is left open."""
    got: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(timeout)
            s.connect(path)
            while len(got) < count:
                msg, fds, flags, _ = socket.recv_fds(s, 16, min(BATCH, count - len(got)), socket.MSG_CMSG_CLOEXEC)
                got.extend(fds)
                if flags & socket.MSG_CTRUNC:
                    raise OSError(errno.EMSGSIZE, f"descriptors from {path} were cut short")
                if not msg:
                    raise OSError(errno.EPIPE, f"{path} gave {len(got)} of {count} descriptors and closed")
    except BaseException:
        for fd in got:
            os.close(fd)
        raise
    return got


class AdoptedMemory:
    """Imported allocations waiting for vLLM's wake to map them: address -> (size, handle)."""

    def __init__(self, driver: Any) -> None:
        self.drv = driver
        self.waiting: dict[int, tuple[int, int]] = {}
        self.mapped_at: set[int] = set()  # the addresses a wake mapped adopted memory at

    @property
    def mapped(self) -> int:
        return len(self.mapped_at)

    def add(self, ptr: int, size: int, fd: int) -> None:
        self.waiting[ptr] = (size, self.drv.import_fd(fd))

    def release_all(self) -> None:
        """Give back what no wake mapped (the memory goes once no process holds it)."""
        for _, handle in self.waiting.values():
            try:
                self.drv.release(handle)
            except CudaError:
                pass
        self.waiting.clear()

    def create_and_map(self, original: Callable[[tuple], None]) -> Callable[[tuple], None]:
        """vLLM's ``create_and_map(handle)`` (HANDLE: device, size, address, where its physical
        handle is kept), mapping an adopted allocation instead of creating one."""

        def create_and_map(handle: tuple) -> None:
            device, size, ptr, keep = (int(x) for x in handle)
            got = self.waiting.pop(ptr, None)
            if got is None:
                return original(handle)
            want, adopted = got
            try:
                if want != size:
                    raise CudaError(f"adopted {want} bytes at {ptr:#x}, vLLM wakes {size}")
                self.drv.map(ptr, size, adopted, device)
            except CudaError:
                try:
                    self.drv.release(adopted)
                except CudaError:
                    pass
                return original(handle)
            ctypes.c_uint64.from_address(keep).value = adopted
            self.mapped_at.add(ptr)
            return None

        return create_and_map


def install(adopted: AdoptedMemory, module: Any) -> None:
    """Put ADOPTED's create_and_map in front of MODULE's (vllm.device_allocator.cumem); the one
    installed by an earlier call is replaced, never stacked."""
    original = getattr(module, "_fv_vllm_create_and_map", None) or module.create_and_map
    module._fv_vllm_create_and_map = original
    module.create_and_map = adopted.create_and_map(original)


def adopt(driver: Any, socket_path: str, pool: Sequence[tuple[int, int]], asleep: dict[int, int],
          module: Any) -> dict[str, Any]:
    """Take the stager's exported allocations POOL ((address, size) each, their descriptors
    from its HandOver at SOCKET_PATH, in that order), check each against what is ASLEEP in
    vLLM's pool (address -> size), import them and install the mapping into MODULE. Raises
    (CudaError, OSError, ValueError) having left nothing imported: vLLM then allocates as it
    would have."""
    t0 = time.perf_counter()
    for ptr, size in pool:
        if asleep.get(ptr) != size:
            raise ValueError(f"the stager made {size} bytes for {ptr:#x}, which the engine does not have asleep"
                             f" ({asleep.get(ptr)})")
    fds = receive_fds(socket_path, len(pool))
    t_received = time.perf_counter() - t0
    adopted = AdoptedMemory(driver)
    try:
        for (ptr, size), fd in zip(pool, fds):
            adopted.add(ptr, size, fd)
    except BaseException:
        adopted.release_all()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    install(adopted, module)
    module._fv_adopted = adopted  # what the wakes mapped: the worker asks before it trusts a fill
    return {"adopted": len(adopted.waiting), "bytes": sum(n for n, _ in adopted.waiting.values()),
            "received_s": round(t_received, 4), "seconds": round(time.perf_counter() - t0, 4)}
