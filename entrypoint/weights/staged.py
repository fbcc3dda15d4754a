"""The weights taken from the stager (``fvboot.weight_stager``): the dump is already on this GPU,
in the stager's device buffer, laid out as the file is; the worker opens its CUDA IPC handle and
copies each tensor device to device (~5 ms for 7 GB on an H200), then closes it. The stager
checks the bytes against the dump's checksums meanwhile (the gate waits for its verdict).

Anything that does not fit (another file, another GPU, a handle that does not open) raises
:class:`StagedUnusable` before a byte is copied; the caller then loads the weights itself.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from ..cuda_driver import CudaError, Driver, IpcHandle
from .fileformat import WeightFileError, check_targets, read_index
from .pipeline import one_device


class StagedUnusable(WeightFileError):
    """The stager's copy cannot be taken here; the worker loads the weights itself."""


def load_staged(path: str, targets: Mapping[str, torch.Tensor], handle: str, size: int,
                gpu: str) -> dict[str, Any]:
    """Fill TARGETS from the stager's buffer (HANDLE: its IPC handle in hex; SIZE: the file's
    size it staged; GPU: the UUID it staged on). Returns what it did and how long it took."""
    t0 = time.perf_counter()
    idx = read_index(path)
    if idx.file_size != size:
        raise StagedUnusable(f"the stager staged {size} bytes, {path} has {idx.file_size}")
    check_targets(path, idx, targets)
    device = one_device(list(targets.values()))
    if device.type != "cuda":
        raise StagedUnusable(f"the weights are on {device.type}, not on a CUDA device")
    try:
        drv = Driver()
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)  # this thread's current context is now torch's, on DEVICE
            here = drv.current_device_uuid()
            if here.lower() != gpu.lower():
                raise StagedUnusable(f"the weights are on {here}, the stager staged them on {gpu}")
            base = drv.ipc_open(IpcHandle.from_hex(handle))
            t_open = time.perf_counter()
            try:
                stream = torch.cuda.current_stream(device).cuda_stream
                for k, e in idx.entries.items():
                    if e.nbytes:
                        drv.copy_on_device(targets[k].data_ptr(), base + e.offset, e.nbytes, stream)
                torch.cuda.synchronize(device)
            finally:
                drv.ipc_close(base)
    except CudaError as e:
        raise StagedUnusable(str(e)) from None
    took = time.perf_counter() - t0
    return {"bytes": idx.total_bytes, "tensors": len(idx.entries), "seconds": round(took, 4),
            "open_seconds": round(t_open - t0, 4), "staged": True}
