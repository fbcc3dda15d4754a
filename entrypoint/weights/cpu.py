"""The weights of vLLM's CPU backend: every byte a CPU forward pass reads, released and
refilled in place (``CpuWeights``; the worker extension picks it on CPU).

The CPU trap: vLLM's CPU backend (``dispatch_cpu_unquantized_gemm``) packs each linear weight
into a oneDNN handler held in C++ memory and leaves ``layer.weight`` empty; on AMX machines
small weights go to an SGL-packed tensor captured in ``layer.cpu_linear``'s closure instead.
Parameters alone are ~1% of the bytes. We keep vLLM's fast kernels and cover both:
  * tensors captured in ``cpu_linear`` closures are ordinary storages (freed/refilled in place);
  * a oneDNN handler's weight is read back exactly (identity matmul: one product per output,
    no rounding), and on load a new handler is built from the file with the same call vLLM
    makes, and its address is written into the handler's existing ``handler_tensor`` (the
    0-d tensor the compiled graph reads at every call), so compiled code keeps working.
Anything else found in a closure is refused loudly rather than silently left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .collection import Storage, WeightCollectionError, malloc_trim, storage_of
from .fileformat import Deferred

ONEDNN_CACHE_SIZE = 32  # primitive_cache_size vLLM passes to ops.create_onednn_mm
_READBACK_ROWS = 1024  # identity rows per read-back matmul: bounds its temporary memory
_SCALARS = (int, float, bool, str, bytes, type(None), torch.dtype)


@dataclass
class _Handler:
    key: str
    handler: Any  # vllm._custom_ops.CPUDNNLGEMMHandler
    dtype: torch.dtype
    plain: torch.Tensor | None  # a plain [N, K] weight kept by vLLM too (lm_head): rebuild from it
    staging: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.handler.n, self.handler.k)


class CpuWeights:
    """Every weight byte a CPU forward pass reads: storages plus oneDNN handlers."""

    def __init__(self, model: torch.nn.Module) -> None:
        from vllm import _custom_ops as ops

        self._ops = ops
        self.storages: dict[int, Storage] = {}  # keyed by StorageImpl address (_cdata)
        self.handlers: list[_Handler] = []
        for name, t in model.named_parameters(remove_duplicate=False):
            self._add(name, t)
        for name, t in model.named_buffers(remove_duplicate=False):
            self._add(name, t)
        for mname, module in model.named_modules():
            fn = module.__dict__.get("cpu_linear")
            for var, cell in zip(getattr(getattr(fn, "__code__", None), "co_freevars", ()),
                                 getattr(fn, "__closure__", None) or ()):
                self._add_captured(f"{mname}.cpu_linear.{var}", cell.cell_contents, module)
            extra = module.__dict__.get("_cpu_unpacked_conv_weight")
            if isinstance(extra, torch.Tensor):
                self._add(f"{mname}._cpu_unpacked_conv_weight", extra)

    def _add(self, key: str, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st.nbytes() == 0 or st._cdata in self.storages:  # emptied placeholders; shared
            return
        self.storages[st._cdata] = storage_of(key, t, st, st.nbytes())

    def _add_captured(self, key: str, obj: Any, module: torch.nn.Module) -> None:
        if isinstance(obj, torch.Tensor):
            self._add(key, obj)
        elif isinstance(obj, self._ops.CPUDNNLGEMMHandler):
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor):
                raise WeightCollectionError(f"{key}: oneDNN handler on a module without .weight")
            plain = w if tuple(w.shape) == (obj.n, obj.k) and w.is_contiguous() else None
            self.handlers.append(_Handler(f"{key}.weight", obj, w.dtype, plain))
        elif not isinstance(obj, _SCALARS) and not callable(obj):
            raise WeightCollectionError(
                f"{key} captures a {type(obj).__module__}.{type(obj).__qualname__}: unknown to "
                "fast-vllm, so its memory could not be released and refilled safely")

    @property
    def released(self) -> bool:
        return any(s.storage.nbytes() == 0 for s in self.storages.values()) or any(
            int(h.handler.handler_tensor.item()) == 0 for h in self.handlers)

    def _read_back(self, h: _Handler) -> torch.Tensor:
        """The [N, K] weight a handler packed: I @ W^T, a block of identity rows at a time."""
        n, k = h.shape
        out = torch.empty(n, k, dtype=h.dtype)
        for a in range(0, k, _READBACK_ROWS):
            b = min(a + _READBACK_ROWS, k)
            eye = torch.zeros(b - a, k, dtype=h.dtype)
            eye[torch.arange(b - a), torch.arange(a, b)] = 1
            out[:, a:b] = self._ops.onednn_mm(h.handler, eye, None).t()
        if not torch.isfinite(out).all():  # inf * 0 = NaN would spread: read-back not exact
            raise WeightCollectionError(f"{h.key}: weight has non-finite values, cannot read back")
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor | Deferred]]:
        """What to dump: (key, tensor) pairs; oneDNN weights are read back one at a time."""
        if self.released:
            raise WeightCollectionError("weights are released: fv_load_weights first")
        for s in self.storages.values():
            yield s.key, s.tensor
        for h in self.handlers:
            if h.plain is None:
                yield h.key, Deferred(h.shape, h.dtype, lambda h=h: self._read_back(h))

    def release(self) -> int:
        freed = 0
        for s in self.storages.values():
            freed += s.storage.nbytes()
            s.storage.resize_(0)
        for h in self.handlers:
            ptr = int(h.handler.handler_tensor.item())
            if ptr:
                torch.ops._C.release_dnnl_matmul_handler(ptr)
                h.handler.handler_tensor.fill_(0)  # vLLM's __del__ then deletes nullptr: no-op
                freed += h.shape[0] * h.shape[1] * h.dtype.itemsize
        malloc_trim()  # hand freed heap pages back to the kernel (and out of a CRIU image)
        return freed

    def targets(self) -> dict[str, torch.Tensor]:
        """Regrow every storage and return the tensors a weight file must fill."""
        out = {}
        for s in self.storages.values():
            if s.storage.nbytes() != s.nbytes:
                s.storage.resize_(s.nbytes)
            out[s.key] = s.tensor
        for h in self.handlers:
            if h.plain is None:
                h.staging = torch.empty(h.shape, dtype=h.dtype)
                out[h.key] = h.staging
        return out

    def finish_load(self) -> None:
        """Build a fresh oneDNN handler per packed weight and point the old tensor at it."""
        for h in self.handlers:
            w = h.plain if h.plain is not None else h.staging
            ptr = torch.ops._C.create_onednn_mm_handler(w.t(), ONEDNN_CACHE_SIZE)
            old = int(h.handler.handler_tensor.item())
            h.handler.handler_tensor.fill_(ptr)
            if old:  # loaded over live weights: drop the previous handler
                torch.ops._C.release_dnnl_matmul_handler(old)
            h.staging = None

    def info(self) -> dict[str, Any]:
        return {"storages": len(self.storages),
                "storage_bytes_now": sum(s.storage.nbytes() for s in self.storages.values()),
                "storage_bytes_full": sum(s.nbytes for s in self.storages.values()),
                "onednn_handlers": len(self.handlers),
                "onednn_handlers_live": sum(int(h.handler.handler_tensor.item()) != 0
                                            for h in self.handlers),
                "released": self.released}
