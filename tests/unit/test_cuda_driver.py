"""cuda_driver.py without a GPU: what it does with the bytes it hands between processes (the
IPC handle the weight stager prints and the worker reads back), the UUID text the manifest
compares, and the error where no driver is. The driver calls themselves run on a GPU
(tests/unit/weights/test_staging.py::test_gpu_*, bench/gpu_weight_staging.py)."""

from __future__ import annotations

import ctypes
import os

import pytest

from fvboot.cuda_driver import CudaError, Driver, IpcHandle, uuid_text


def test_an_ipc_handle_with_nul_bytes_survives_its_hex_round_trip():
    """A CUDA IPC handle is 64 opaque bytes, NULs included: reading it through the ctypes field
    (a c_char array stops at the first NUL) cut it to 4 bytes in a first probe on the H200, and
    the worker could not open it. All 64 bytes must travel."""
    raw = bytes([0xE0, 0xCC, 0xAF, 0x1F, 0, 0, 0, 0]) + bytes(range(56))
    h = IpcHandle.from_hex(raw.hex())
    assert h.hex() == raw.hex() and len(bytes.fromhex(h.hex())) == 64
    assert ctypes.string_at(ctypes.addressof(h), 64) == raw
    with pytest.raises(CudaError, match="an IPC handle has 64 bytes, not 4"):
        IpcHandle.from_hex("e0ccaf1f")


def test_uuid_text_is_the_manifests_spelling():
    raw = bytes.fromhex("6e03ce3c4f405da6182f72dd3e3106cd")
    assert uuid_text(raw) == "GPU-6e03ce3c-4f40-5da6-182f-72dd3e3106cd"


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"),
                    reason="needs a machine without a CUDA driver: this one has /dev/nvidiactl")
def test_no_driver_is_one_clear_error():
    with pytest.raises(CudaError, match=r"^no CUDA driver here \(libcuda.so.1: "):
        Driver()


class _FakeLib:
    """libcuda's calls that context_limits makes, answering as an H200's context would (132
    SMs, 2048 threads each, 1 KiB of stack per thread); every other call fails."""

    LIMITS = {0: 1024, 1: 1 << 20, 2: 8 << 20}
    ATTRS = {16: 132, 39: 2048}

    def __getattr__(self, name):
        def fail(*args):
            return 999
        fn = {"cuCtxGetLimit": self._limit, "cuCtxGetDevice": self._device,
              "cuDeviceGetAttribute": self._attr}.get(name, fail)
        wrapper = lambda *a: fn(*a)  # noqa: E731 - a new object that takes argtypes/restype
        setattr(self, name, wrapper)
        return wrapper

    def _limit(self, out, which):
        out._obj.value = self.LIMITS[which]
        return 0

    def _device(self, out):
        out._obj.value = 0
        return 0

    def _attr(self, out, attr, dev):
        out._obj.value = self.ATTRS[attr]
        return 0


def test_the_context_limits_say_the_local_memory_the_stack_reserves():
    limits = Driver(_FakeLib()).context_limits()
    assert limits == {"stack_bytes": 1024, "printf_fifo_bytes": 1 << 20, "malloc_heap_bytes": 8 << 20,
                      "local_memory_bytes": 1024 * 132 * 2048}


def test_the_virtual_memory_structures_have_the_drivers_layout():
    """cuda.h: CUmemAllocationProp is 32 bytes (the handle types at 4, the location at 8, the
    flags at 24), CUmemAccessDesc 12; a device allocation asks for a file descriptor only when
    it is to be shared."""
    import ctypes

    from fvboot.cuda_driver import MemAccessDesc, MemAllocationProp, device_memory_prop

    assert ctypes.sizeof(MemAllocationProp) == 32 and ctypes.sizeof(MemAccessDesc) == 12
    assert MemAllocationProp.requestedHandleTypes.offset == 4 and MemAllocationProp.location.offset == 8
    assert MemAllocationProp.allocFlags.offset == 24
    prop = device_memory_prop(3, True)
    assert (prop.type, prop.requestedHandleTypes, prop.location.type, prop.location.id) == (1, 1, 1, 3)
    assert device_memory_prop(0, False).requestedHandleTypes == 0
