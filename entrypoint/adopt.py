"""A sleeping engine's GPU memory, made by the weight stager while CRIU restores the engine
(``FV_WAKE_MEMORY=helper``, an option being measured).

Waking a restored engine allocates its memory again: vLLM's allocator creates physical memory
for every sleeping allocation (the weights' pool, the KV cache) and maps it at the addresses the
engine kept (0.09 s for a 3B model's weights and 0.29 s for its 112 GB KV cache on an H200),
after the CUDA resume, on the path to the first token. Instead the stager, which has a CUDA
context beside the restore anyway, creates the same allocations as exportable memory and hands
out a file descriptor for each; the worker takes them from the stager's process (pidfd_getfd),
imports them, and vLLM's wake maps them where it would have created memory: ``install`` puts a
``create_and_map`` in front of vLLM's that maps an adopted allocation at its address, records
its handle where vLLM keeps it (a later sleep releases it as its own), and leaves every other
allocation, or one that does not fit or map, to vLLM. Torch-free: the stager's side runs
without it.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any, Callable, Sequence

from .cuda_driver import CudaError

SYS_PIDFD_GETFD = 438  # the same number on x86_64 and arm64


def take_fds(pid: int, fds: Sequence[int]) -> list[int]:
    """Copies of process PID's descriptors FDS, now ours (pidfd_getfd: Linux 5.6, and the right
    to ptrace PID, which root in the same container has). OSError names the one that failed;
    none of those taken before it is left open."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    taken: list[int] = []
    try:
        for fd in fds:
            got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
            if got < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd of descriptor {fd} of process {pid}: {os.strerror(err)}")
            taken.append(got)
    except BaseException:
        for fd in taken:
            os.close(fd)
        raise
    finally:
        os.close(pidfd)
    return taken


class AdoptedMemory:
    """Imported allocations waiting for vLLM's wake to map them: address -> (size, handle)."""

    def __init__(self, driver: Any) -> None:
        self.drv = driver
        self.waiting: dict[int, tuple[int, int]] = {}
        self.mapped = 0

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
            self.mapped += 1
            return None

        return create_and_map


def install(adopted: AdoptedMemory, module: Any) -> None:
    """Put ADOPTED's create_and_map in front of MODULE's (vllm.device_allocator.cumem); the one
    installed by an earlier call is replaced, never stacked."""
    original = getattr(module, "_fv_vllm_create_and_map", None) or module.create_and_map
    module._fv_vllm_create_and_map = original
    module.create_and_map = adopted.create_and_map(original)


def adopt(driver: Any, pid: int, pool: Sequence[tuple[int, int, int]], asleep: dict[int, int],
          module: Any) -> dict[str, Any]:
    """Take process PID's exported allocations POOL ((address, size, its descriptor) each), check
    each against what is ASLEEP in vLLM's pool (address -> size), import them and install the
    mapping into MODULE. Raises (CudaError, OSError, ValueError) having left nothing imported:
    vLLM then allocates as it would have."""
    t0 = time.perf_counter()
    for ptr, size, _ in pool:
        if asleep.get(ptr) != size:
            raise ValueError(f"the stager made {size} bytes for {ptr:#x}, which the engine does not have asleep"
                             f" ({asleep.get(ptr)})")
    fds = take_fds(pid, [fd for _, _, fd in pool])
    adopted = AdoptedMemory(driver)
    try:
        for (ptr, size, _), fd in zip(pool, fds):
            adopted.add(ptr, size, fd)
    except BaseException:
        adopted.release_all()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    install(adopted, module)
    return {"adopted": len(adopted.waiting), "bytes": sum(n for n, _ in adopted.waiting.values()),
            "seconds": round(time.perf_counter() - t0, 4)}
