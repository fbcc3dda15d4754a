"""GPU code the engine's Python keeps after the driver has loaded it, let go before the
checkpoint (``FV_KERNEL_IMAGES``, read at bake: ``drop``, the default, or ``keep``).

Triton keeps, on every compiled kernel, the kernel's binary and each stage that led to it (its
cubin, PTX, LLVM IR and Triton IRs: ``CompiledKernel.asm`` and ``.kernel``) for as long as the
kernel lives, though once its module is loaded the launches use only the driver's handles. The
3B engine's checkpoint held 477 cubins (324 MB) in anonymous memory, besides their IRs in the
heap (``bench/checkpoint_anatomy.py``, the trim's heap census); CRIU saves them, a restore reads
them back, and nothing reads them again. The trim empties them on the kernels whose module is
loaded (the driver has its own copy, which the CUDA checkpoint keeps); a kernel not yet loaded
keeps them, so it can still load later. The restore's probe runs the kernels before any answer
is served.
"""

from __future__ import annotations

import sys
from typing import Any

from .heap_census import all_objects

ENV = "FV_KERNEL_IMAGES"
CHOICES = ("drop", "keep")


def kernel_images_setting() -> str:
    """The bake's FV_KERNEL_IMAGES, checked before vLLM starts: BakeFailed names a value that is
    neither."""
    from .envchoice import choice
    from .errors import BakeFailed, CheckpointUnusable

    try:
        return choice(ENV, CHOICES, "drop")
    except CheckpointUnusable as e:
        raise BakeFailed(str(e)) from None


def drop_loaded() -> dict[str, Any]:
    """Empty the images of every Triton kernel whose module the driver has loaded; {} where
    Triton was never imported or the bake keeps them. The kernels emptied, those kept (not
    loaded), and the bytes let go."""
    from .envchoice import choice

    compiler = sys.modules.get("triton.compiler.compiler")
    kernel_type = getattr(compiler, "CompiledKernel", None)
    if kernel_type is None or choice(ENV, CHOICES, "drop") != "drop":
        return {}
    objects, _ = all_objects()
    kernels = [o for o in objects if isinstance(o, kernel_type)]
    del objects
    dropped = kept = freed = 0
    for kernel in kernels:
        if getattr(kernel, "module", None) is None or not getattr(kernel, "function", None):
            kept += 1  # not loaded yet: it needs its binary to load
            continue
        asm = getattr(kernel, "asm", None)
        if isinstance(asm, dict):
            freed += sum(_size(v) for v in dict.values(asm))
            asm.clear()
        if isinstance(getattr(kernel, "kernel", None), bytes):
            kernel.kernel = b""  # the same binary as asm's: counted there
        dropped += 1
    return {"kernels": dropped, "kept_not_loaded": kept, "bytes": freed}


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (bytes, str)) else 0
