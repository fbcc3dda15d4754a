"""The CUDA context's per-thread stack made smaller before the checkpoint
(``FV_TRIM_STACK_BYTES=N`` in the bake's environment; an option being measured, off by default).

A context reserves local memory for every thread its GPU can run at once at the per-thread
stack size: 1 KiB by default, 0.28 GB on an H200 (132 SMs x 2048 threads), held by a sleeping
engine like the rest of its context and copied out by the CUDA checkpoint and back by every
restore (a restore costs ~0.25 s per GiB the process held, bench/results/
gpu_cuda_checkpoint_scaling_h200_2026-12-04/). Lowering the limit just before the checkpoint
gives that reservation back. Correctness does not depend on it: the driver raises the stack
again at the first launch of a kernel that needs more (cuCtxSetLimit, CU_LIMIT_STACK_SIZE: "the
driver automatically increases the per-thread stack size for each kernel launch as needed"),
so what a smaller value can cost is one resize at such a launch after the restore, which the
probe's answers would then include. The trim records what it did (``stack_trim``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

ENV = "FV_TRIM_STACK_BYTES"
MAX_BYTES = 1 << 20  # no thread's stack needs more; a larger value is a typo, not a trim


def setting() -> Optional[int]:
    """The bytes FV_TRIM_STACK_BYTES asks for (None: unset or blank, no trim); ValueError naming
    the variable for anything but a whole number from 0 to MAX_BYTES."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_BYTES:
        raise ValueError(f"{ENV}={raw!r}: expected the per-thread stack in bytes, 0 to {MAX_BYTES}")
    return value


def bake_setting() -> Optional[int]:
    """setting(), checked before vLLM starts: BakeFailed says a bad value."""
    from .errors import BakeFailed

    try:
        return setting()
    except ValueError as e:
        raise BakeFailed(str(e)) from None


def trim(driver: Any, stack_bytes: int) -> dict[str, Any]:
    """Set the current context's stack limit to STACK_BYTES (a value above the present one is
    left alone: this only gives memory back) and say what it freed: {stack_bytes_before,
    stack_bytes_after, gpu_freed_bytes}, or {"error"} where the driver refused (the checkpoint
    is then as it would have been)."""
    from .cuda_driver import CudaError

    try:
        before = driver.context_limits()["stack_bytes"]
        if stack_bytes >= before:
            return {"stack_bytes_before": before, "stack_bytes_after": before, "gpu_freed_bytes": 0}
        free_before, _ = driver.mem_get_info()
        driver.set_limit("stack_bytes", stack_bytes)
        free_after, _ = driver.mem_get_info()
        after = driver.context_limits()["stack_bytes"]
    except (CudaError, KeyError) as e:
        return {"error": str(e)}
    return {"stack_bytes_before": before, "stack_bytes_after": after,
            "gpu_freed_bytes": free_after - free_before}
