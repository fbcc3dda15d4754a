"""vLLM worker extension: dump, release and refill the model weights in place.

Used as ``--worker-extension-cls fvboot.worker_extension.FastVllmWorkerExtension`` and driven
through ``POST /collective_rpc {"method": "fv_...", "args": [...]}`` (needs
``VLLM_SERVER_DEV_MODE=1``). Why: a CRIU checkpoint taken with the weights released is smaller
by the weights' size, and the weights come back from a raw ``.fvw`` file at disk speed.

Order the caller must keep: ``POST /sleep?level=1`` (on CPU it only pauses the scheduler) before
``fv_release_weights``, and ``POST /wake_up`` after ``fv_load_weights``: a forward pass over
released weights crashes the worker.

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

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from fvboot import weightfile

ONEDNN_CACHE_SIZE = 32  # primitive_cache_size vLLM passes to ops.create_onednn_mm
_READBACK_ROWS = 1024  # identity rows per read-back matmul: bounds its temporary memory
_SCALARS = (int, float, bool, str, bytes, type(None), torch.dtype)


class WeightCollectionError(RuntimeError):
    """Something the forward pass reads could not be made releasable."""


@dataclass
class _Storage:
    key: str
    tensor: torch.Tensor  # what is dumped/filled: the tensor itself, or a uint8 view of it all
    storage: torch.UntypedStorage  # identity kept: data_ptr() is 0 for every released storage
    nbytes: int


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
        self.storages: dict[int, _Storage] = {}  # keyed by StorageImpl address (_cdata)
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
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.numel() * t.element_size() == st.nbytes())
        view = t.detach() if whole else torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        self.storages[st._cdata] = _Storage(key if whole else f"{key}#storage", view, st,
                                            st.nbytes())

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

    def items(self) -> Iterator[tuple[str, torch.Tensor | weightfile.Deferred]]:
        """What to dump: (key, tensor) pairs; oneDNN weights are read back one at a time."""
        if self.released:
            raise WeightCollectionError("weights are released: fv_load_weights first")
        for s in self.storages.values():
            yield s.key, s.tensor
        for h in self.handlers:
            if h.plain is None:
                yield h.key, weightfile.Deferred(h.shape, h.dtype, lambda h=h: self._read_back(h))

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
        _malloc_trim()  # hand freed heap pages back to the kernel (and out of a CRIU image)
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


def collect_weights(model: torch.nn.Module):
    """The platform seam: an object with items / release / targets / finish_load / info."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return CpuWeights(model)
    # GPU (to do): dump/refill the CuMemAllocator "weights" pool as raw uint8 tensors.
    raise NotImplementedError(f"weight release is not implemented on {current_platform.device_name}")


def _malloc_trim() -> None:
    """Return freed heap to the kernel: glibc keeps it mapped (and CRIU would dump it)."""
    libc = ctypes.CDLL(None)
    for name, args in (("MallocExtension_ReleaseFreeMemory", ()), ("malloc_trim", (0,))):
        fn = getattr(libc, name, None)  # tcmalloc (vLLM suggests LD_PRELOADing it), glibc
        if fn is not None:
            fn(*args)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FastVllmWorkerExtension:
    """Mixed into vLLM's worker class; every name is prefixed ``fv_`` to avoid clashes."""

    def _fv_weights(self):
        if getattr(self, "_fv_weight_set", None) is None:
            self._fv_weight_set = collect_weights(self.model_runner.model)
        return self._fv_weight_set

    def _fv_path(self, directory: str) -> str:
        from vllm.distributed import parallel_state as ps

        name = f"rank{ps.get_tensor_model_parallel_rank()}.fvw"
        if ps.get_pp_group().world_size > 1:
            name = f"pp{ps.get_pp_group().rank_in_group}-{name}"
        return os.path.join(directory, name)

    def fv_dump_weights(self, directory: str) -> dict[str, Any]:
        os.makedirs(directory, exist_ok=True)
        w = self._fv_weights()
        info = weightfile.write_weights(self._fv_path(directory), w.items(),
                                        meta={"torch": torch.__version__})
        return {"path": info.path, "bytes": info.bytes, "tensors": info.tensors,
                "index_sha256": info.index_sha256, "seconds": round(info.seconds, 4)}

    def fv_release_weights(self) -> dict[str, Any]:
        rss = _rss()
        freed = self._fv_weights().release()
        return {"bytes": freed, "rss_before": rss, "rss_after": _rss()}

    def fv_load_weights(self, directory: str, verify: bool = False) -> dict[str, Any]:
        if isinstance(verify, str):  # collective_rpc over HTTP passes strings
            verify = verify.lower() in ("1", "true", "yes")
        t0 = time.perf_counter()
        w = self._fv_weights()
        try:
            stats = weightfile.load_into(self._fv_path(directory), w.targets(), verify=verify)
            w.finish_load()
        except BaseException:
            w.release()  # never leave half-filled weights that look loaded
            raise
        dt = time.perf_counter() - t0
        return {"bytes": stats.bytes, "tensors": stats.tensors, "read_seconds": round(stats.seconds, 4),
                "seconds": round(dt, 4), "gb_per_s": round(stats.bytes / dt / 1e9, 3),
                "verified": verify, "rss": _rss()}

    def fv_weights_info(self) -> dict[str, Any]:
        return {**self._fv_weights().info(), "rss": _rss()}
