"""The few CUDA driver calls fvboot's own processes make, through ctypes (no torch, no CUDA
toolkit: the driver's libcuda.so.1 is all a GPU container has for sure). The weight stager
(``weight_stager``) uses them to put the weight dump on the GPU during a restore, and the
restored worker (``weights.staged``) to take it from there. The virtual memory calls (physical
memory one process makes and exports as a file descriptor, another imports and maps at its own
addresses) are what a helper needs to make a sleeping engine's memory while CRIU restores it:
``bench/gpu_vmm_adopt.py`` measures them.

Every call checks its result and raises :class:`CudaError` naming the call and the driver's
error name, so a failure reads as what it was ("cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY").
"""

from __future__ import annotations

import ctypes
from typing import Optional

HOST_REGISTER_READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY: page-locked, the GPU only reads it
IPC_LAZY_ENABLE_PEER_ACCESS = 0x1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
STREAM_NON_BLOCKING = 0x1


MEM_ALLOCATION_TYPE_PINNED = 1
MEM_HANDLE_TYPE_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
MEM_LOCATION_TYPE_DEVICE = 1
MEM_ACCESS_READWRITE = 3


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemAllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class MemAllocationProp(ctypes.Structure):
    """CUmemAllocationProp (cuda.h): 32 bytes."""
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", MemLocation),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", MemAllocFlags)]


class MemAccessDesc(ctypes.Structure):
    """CUmemAccessDesc (cuda.h): 12 bytes."""
    _fields_ = [("location", MemLocation), ("flags", ctypes.c_int)]


def device_memory_prop(device: int, shareable: bool) -> MemAllocationProp:
    """Physical memory on DEVICE, exportable as a file descriptor where SHAREABLE."""
    return MemAllocationProp(type=MEM_ALLOCATION_TYPE_PINNED,
                             requestedHandleTypes=MEM_HANDLE_TYPE_POSIX_FD if shareable else 0,
                             location=MemLocation(MEM_LOCATION_TYPE_DEVICE, device))


class CudaError(RuntimeError):
    """A driver call failed (or the driver library is missing); the message names both."""


class IpcHandle(ctypes.Structure):
    """CUipcMemHandle: 64 opaque bytes, passed by value."""

    _fields_ = [("reserved", ctypes.c_char * 64)]

    def hex(self) -> str:
        return ctypes.string_at(ctypes.addressof(self), 64).hex()  # .reserved stops at a NUL

    @classmethod
    def from_hex(cls, text: str) -> "IpcHandle":
        raw = bytes.fromhex(text)
        if len(raw) != 64:
            raise CudaError(f"an IPC handle has 64 bytes, not {len(raw)}")
        h = cls()
        ctypes.memmove(ctypes.addressof(h), raw, 64)
        return h


def uuid_text(raw: bytes) -> str:
    """A GPU's 16-byte UUID as nvidia-smi and the manifest write it: GPU-8-4-4-4-12 hex."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


_u64, _size, _ptr, _uint, _int = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int
_LIMITS = {"stack_bytes": 0, "printf_fifo_bytes": 1, "malloc_heap_bytes": 2}  # CUlimit
_ATTR_SM_COUNT, _ATTR_THREADS_PER_SM = 16, 39  # CUdevice_attribute
_SIGNATURES = {
    "cuInit": [_uint],
    "cuDeviceGetCount": [ctypes.POINTER(_int)],
    "cuDeviceGet": [ctypes.POINTER(_int), _int],
    "cuDeviceGetUuid_v2": [ctypes.POINTER(ctypes.c_char), _int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_ptr), _int],
    "cuCtxSetCurrent": [_ptr],
    "cuCtxGetDevice": [ctypes.POINTER(_int)],
    "cuCtxGetLimit": [ctypes.POINTER(_size), _int],
    "cuDeviceGetAttribute": [ctypes.POINTER(_int), _int, _int],
    "cuMemGetInfo_v2": [ctypes.POINTER(_size), ctypes.POINTER(_size)],
    "cuMemAlloc_v2": [ctypes.POINTER(_u64), _size],
    "cuMemFree_v2": [_u64],
    "cuMemHostRegister_v2": [_ptr, _size, _uint],
    "cuMemAllocHost_v2": [ctypes.POINTER(_ptr), _size],
    "cuMemFreeHost": [_ptr],
    "cuMemHostUnregister": [_ptr],
    "cuStreamCreate": [ctypes.POINTER(_ptr), _uint],
    "cuStreamSynchronize": [_ptr],
    "cuMemcpyHtoDAsync_v2": [_u64, _ptr, _size, _ptr],
    "cuMemcpyDtoDAsync_v2": [_u64, _u64, _size, _ptr],
    "cuIpcGetMemHandle": [ctypes.POINTER(IpcHandle), _u64],
    "cuIpcOpenMemHandle_v2": [ctypes.POINTER(_u64), IpcHandle, _uint],
    "cuIpcCloseMemHandle": [_u64],
    "cuGetErrorName": [_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuMemsetD8_v2": [_u64, ctypes.c_ubyte, _size],
    "cuMemcpyDtoH_v2": [_ptr, _u64, _size],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(_size), ctypes.POINTER(MemAllocationProp), _int],
    "cuMemCreate": [ctypes.POINTER(_u64), _size, ctypes.POINTER(MemAllocationProp), _u64],
    "cuMemRelease": [_u64],
    "cuMemExportToShareableHandle": [_ptr, _u64, _int, _u64],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(_u64), _ptr, _int],
    "cuMemAddressReserve": [ctypes.POINTER(_u64), _size, _size, _u64, _u64],
    "cuMemAddressFree": [_u64, _size],
    "cuMemMap": [_u64, _size, _size, _u64, _u64],
    "cuMemUnmap": [_u64, _size],
    "cuMemSetAccess": [_u64, _size, ctypes.POINTER(MemAccessDesc), _size],
}


class Driver:
    """libcuda.so.1 with the signatures above; each method raises CudaError on failure."""

    def __init__(self, lib: Optional[ctypes.CDLL] = None) -> None:
        try:
            self.lib = lib or ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaError(f"no CUDA driver here (libcuda.so.1: {e})") from None
        self.context: Optional[int] = None  # the primary context use_primary_context made current
        for name, args in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, _int

    def _check(self, rc: int, call: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(f"{call}: {(name.value or b'').decode() or 'CUresult'} ({rc})")

    def init(self) -> None:
        self._check(self.lib.cuInit(0), "cuInit")

    def device_uuid(self, device: int) -> str:
        raw = (ctypes.c_char * 16)()
        self._check(self.lib.cuDeviceGetUuid_v2(raw, device), "cuDeviceGetUuid")
        return uuid_text(bytes(raw))

    def device_by_uuid(self, uuid: str) -> int:
        """The ordinal of the visible GPU with this UUID."""
        n = _int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(n)), "cuDeviceGetCount")
        seen = []
        for i in range(n.value):
            dev = _int()
            self._check(self.lib.cuDeviceGet(ctypes.byref(dev), i), "cuDeviceGet")
            seen.append(self.device_uuid(dev.value))
            if seen[-1].lower() == uuid.lower():
                return dev.value
        raise CudaError(f"no visible GPU is {uuid} (visible: {', '.join(seen) or 'none'})")

    def use_primary_context(self, device: int) -> None:
        """Make DEVICE's primary context current in this thread (``use_context`` does it in another)."""
        ctx = _ptr()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device), "cuDevicePrimaryCtxRetain")
        self.context = ctx.value
        self.use_context()

    def use_context(self) -> None:
        self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def current_device_uuid(self) -> str:
        dev = _int()
        self._check(self.lib.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice")
        return self.device_uuid(dev.value)

    def context_limits(self) -> dict[str, int]:
        """The current context's limits that hold GPU memory (bytes): the stack each thread
        gets, the device malloc heap, the printf FIFO, and the local memory the stack size
        reserves for every thread the GPU can run at once (``local_memory_bytes``). A sleeping
        engine's context keeps them; the CUDA checkpoint copies them, zeros included."""
        out = {}
        for name, limit in _LIMITS.items():
            v = _size()
            self._check(self.lib.cuCtxGetLimit(ctypes.byref(v), limit), "cuCtxGetLimit")
            out[name] = v.value
        dev, sms, threads = _int(), _int(), _int()
        self._check(self.lib.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice")
        for value, attr in ((sms, _ATTR_SM_COUNT), (threads, _ATTR_THREADS_PER_SM)):
            self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(value), attr, dev.value), "cuDeviceGetAttribute")
        out["local_memory_bytes"] = out["stack_bytes"] * sms.value * threads.value
        return out

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current context's GPU, other processes' use counted."""
        free, total = _size(), _size()
        self._check(self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
        return free.value, total.value

    def alloc(self, nbytes: int) -> int:
        ptr = _u64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), "cuMemAlloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cuMemFree_v2(ptr), "cuMemFree")

    def alloc_host(self, nbytes: int) -> int:
        """NBYTES of page-locked host memory (cuMemAllocHost)."""
        ptr = _ptr()
        self._check(self.lib.cuMemAllocHost_v2(ctypes.byref(ptr), nbytes), "cuMemAllocHost")
        return ptr.value

    def free_host(self, ptr: int) -> None:
        self._check(self.lib.cuMemFreeHost(ptr), "cuMemFreeHost")

    def host_register(self, addr: int, nbytes: int, flags: int = HOST_REGISTER_READ_ONLY) -> None:
        self._check(self.lib.cuMemHostRegister_v2(addr, nbytes, flags), "cuMemHostRegister")

    def host_unregister(self, addr: int) -> None:
        self._check(self.lib.cuMemHostUnregister(addr), "cuMemHostUnregister")

    def stream(self) -> int:
        s = _ptr()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), STREAM_NON_BLOCKING), "cuStreamCreate")
        return s.value

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")

    def copy_on_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cuMemcpyDtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyDtoDAsync")

    def ipc_handle(self, ptr: int) -> IpcHandle:
        h = IpcHandle()
        self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(h), ptr), "cuIpcGetMemHandle")
        return h

    def ipc_open(self, handle: IpcHandle) -> int:
        ptr = _u64()
        self._check(self.lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), handle, IPC_LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._check(self.lib.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")

    # --- virtual memory management: physical memory made here, mapped there

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        self._check(self.lib.cuMemsetD8_v2(ptr, value, nbytes), "cuMemsetD8")

    def copy_to_host(self, dst: int, src: int, nbytes: int) -> None:
        self._check(self.lib.cuMemcpyDtoH_v2(dst, src, nbytes), "cuMemcpyDtoH")

    def granularity(self, device: int) -> int:
        g = _size()
        prop = device_memory_prop(device, True)
        self._check(self.lib.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0),
                    "cuMemGetAllocationGranularity")
        return g.value

    def create(self, nbytes: int, device: int, shareable: bool = True) -> int:
        """NBYTES of physical memory on DEVICE (a multiple of the granularity); its handle."""
        h, prop = _u64(), device_memory_prop(device, shareable)
        self._check(self.lib.cuMemCreate(ctypes.byref(h), nbytes, ctypes.byref(prop), 0), "cuMemCreate")
        return h.value

    def release(self, handle: int) -> None:
        self._check(self.lib.cuMemRelease(handle), "cuMemRelease")

    def export_fd(self, handle: int) -> int:
        """A file descriptor for HANDLE's memory, which another process may import."""
        fd = _int()
        self._check(self.lib.cuMemExportToShareableHandle(ctypes.byref(fd), handle, MEM_HANDLE_TYPE_POSIX_FD, 0),
                    "cuMemExportToShareableHandle")
        return fd.value

    def import_fd(self, fd: int) -> int:
        """The handle of the memory another process exported as FD (the FD stays ours to close)."""
        h = _u64()
        self._check(self.lib.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(fd),
                                                            MEM_HANDLE_TYPE_POSIX_FD),
                    "cuMemImportFromShareableHandle")
        return h.value

    def reserve(self, nbytes: int, alignment: int = 0) -> int:
        va = _u64()
        self._check(self.lib.cuMemAddressReserve(ctypes.byref(va), nbytes, alignment, 0, 0), "cuMemAddressReserve")
        return va.value

    def address_free(self, va: int, nbytes: int) -> None:
        self._check(self.lib.cuMemAddressFree(va, nbytes), "cuMemAddressFree")

    def map(self, va: int, nbytes: int, handle: int, device: int) -> None:
        """HANDLE's memory at VA, readable and writable from DEVICE."""
        self._check(self.lib.cuMemMap(va, nbytes, 0, handle, 0), "cuMemMap")
        desc = MemAccessDesc(MemLocation(MEM_LOCATION_TYPE_DEVICE, device), MEM_ACCESS_READWRITE)
        try:
            self._check(self.lib.cuMemSetAccess(va, nbytes, ctypes.byref(desc), 1), "cuMemSetAccess")
        except CudaError:
            self.lib.cuMemUnmap(va, nbytes)  # not left half-mapped
            raise

    def unmap(self, va: int, nbytes: int) -> None:
        self._check(self.lib.cuMemUnmap(va, nbytes), "cuMemUnmap")
