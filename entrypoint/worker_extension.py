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

On GPU (``GpuWeights``) vLLM runs with ``--enable-sleep-mode``: its CuMemAllocator puts every
allocation made while loading the model in a pool tagged "weights". ``POST /sleep?level=2``
unmaps that pool (contents lost, virtual addresses kept, tensor objects unchanged),
``/wake_up?tags=weights`` maps fresh memory at the same addresses, and ``fv_load_weights``
refills it from the file. So the dump must hold every live byte of that pool: all storages
reachable from the model's parameters and buffers (plus tensors kept as plain module attributes
inside the pool), each dumped whole, and a coverage check against the pool's allocated blocks
says what would be lost if anything else lives there.
"""

from __future__ import annotations

import bisect
import ctypes
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .weights import Deferred, load_into, release_pinned_cache, write_weights
from .weights.fileformat import flat_bytes

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


COVERAGE_WARN = 0.99  # below this share of the weights pool dumped, the dump result warns


@dataclass(frozen=True)
class _Alloc:
    start: int
    size: int
    tag: str
    asleep: bool


class CuMemPool:
    """Read-only view of vLLM's CuMemAllocator bookkeeping (never creates the singleton)."""

    def __init__(self, allocator: Any) -> None:
        self.allocator = allocator
        self.allocs: list[_Alloc] = []
        self._starts: list[int] = []
        self.refresh()

    @classmethod
    def current(cls) -> "CuMemPool | None":
        try:
            from vllm.device_allocator.cumem import CuMemAllocator
        except Exception:  # noqa: BLE001 - no CUDA build of vLLM, no cumem extension
            return None
        inst = getattr(CuMemAllocator, "instance", None)
        return cls(inst) if inst is not None else None

    def refresh(self) -> None:
        allocs = []
        for ptr, data in list(self.allocator.pointer_to_data.items()):  # AllocationData
            allocs.append(_Alloc(int(ptr), int(data.handle[1]), str(data.tag),
                                 bool(getattr(data, "is_asleep", False))))
        self.allocs = sorted(allocs, key=lambda a: a.start)
        self._starts = [a.start for a in self.allocs]

    def find(self, ptr: int) -> _Alloc | None:
        k = bisect.bisect_right(self._starts, ptr) - 1
        if k >= 0 and ptr < self.allocs[k].start + self.allocs[k].size:
            return self.allocs[k]
        return None

    def tagged(self, tag: str) -> list[_Alloc]:
        return [a for a in self.allocs if a.tag == tag]

    def asleep(self, tag: str = "weights") -> bool:
        self.refresh()
        return any(a.asleep for a in self.tagged(tag))

    def blocks(self, tag: str = "weights") -> tuple[list[tuple[int, int]] | None, str | None]:
        """Live blocks (address, size) the caching allocator handed out inside the tag's
        segments, from the MemPool snapshot; (None, why) where that is not available."""
        entry = getattr(self.allocator, "allocator_and_pools", {}).get(tag)
        if not entry:
            return None, f"no MemPool kept for tag {tag!r}"
        try:
            segments = entry[0].snapshot()
        except Exception as exc:  # noqa: BLE001 - private API: degrade to segment sizes
            return None, f"MemPool.snapshot() failed: {type(exc).__name__}: {exc}"
        out = []
        for seg in segments:
            addr = int(seg.get("address", 0))
            a = self.find(addr)
            if a is None or a.tag != tag:
                continue
            for blk in seg.get("blocks", []):
                size = int(blk.get("size", 0))
                baddr = int(blk.get("address", addr))
                if str(blk.get("state", "")).startswith("active"):
                    out.append((baddr, size))
                addr = baddr + size
        return sorted(out), None


class GpuWeights:
    """Every storage a CUDA forward pass reads from the CuMemAllocator "weights" pool.

    ``release`` frees nothing (``/sleep?level=2`` does); the tensors stay valid objects whose
    memory is unmapped while asleep and mapped again (garbage) by ``/wake_up?tags=weights``.
    """

    device_type = "cuda"  # the unit tests run the bookkeeping on CPU tensors

    def __init__(self, modules: dict[str, torch.nn.Module], pool: Any = "current") -> None:
        self.pool: CuMemPool | None = CuMemPool.current() if pool == "current" else pool
        self.storages: dict[int, _Storage] = {}
        self.skipped: dict[str, Any] = {"host_bytes": 0, "other_pools": {}, "unsupported": []}
        self._released = False
        for prefix, model in modules.items():
            for name, t in model.named_parameters(remove_duplicate=False):
                self._add(prefix + name, t)
            for name, t in model.named_buffers(remove_duplicate=False):
                self._add(prefix + name, t)
        if self.pool is not None:  # plain tensor attributes (workspaces, caches) in the pool
            for prefix, model in modules.items():
                for mname, module in model.named_modules():
                    for attr, val in module.__dict__.items():
                        if attr in ("_parameters", "_buffers", "_modules"):
                            continue
                        vals = val if isinstance(val, (list, tuple)) else (val,)
                        for k, v in enumerate(vals):
                            if isinstance(v, torch.Tensor):
                                sub = f"[{k}]" if vals is val else ""
                                self._add(f"{prefix}{mname + '.' if mname else ''}{attr}{sub}", v,
                                          pool_only=True)

    def _add(self, key: str, t: torch.Tensor, pool_only: bool = False) -> None:
        if t.device.type != self.device_type:
            if t.device.type != "meta" and not pool_only:
                try:
                    self.skipped["host_bytes"] += t.untyped_storage().nbytes()
                except Exception:  # noqa: BLE001
                    pass
            return
        try:
            st = t.untyped_storage()
            nbytes = st.nbytes()
            ptr = st.data_ptr()
        except Exception as exc:  # noqa: BLE001 - tensor subclasses without a plain storage
            self.skipped["unsupported"].append(f"{key}: {type(t).__name__}: {exc}")
            return
        if nbytes == 0 or st._cdata in self.storages:
            return
        alloc = self.pool.find(ptr) if self.pool is not None else None
        if alloc is not None and alloc.tag != "weights":
            if not pool_only:  # e.g. a buffer in the kv_cache pool: not ours to refill
                other = self.skipped["other_pools"]
                other[alloc.tag] = other.get(alloc.tag, 0) + nbytes
            return
        if pool_only and alloc is None:
            return
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.numel() * t.element_size() == nbytes)
        view = t.detach() if whole else torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        self.storages[st._cdata] = _Storage(key if whole else f"{key}#storage", view, st, nbytes)

    @property
    def released(self) -> bool:
        return self._released or (self.pool is not None and self.pool.asleep("weights"))

    def _require_awake(self, what: str) -> None:
        if self.pool is not None and self.pool.asleep("weights"):
            raise WeightCollectionError(
                f"{what}: the 'weights' pool is asleep (unmapped by /sleep?level=2); "
                "POST /wake_up?tags=weights first (touching it now would crash the worker)")

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._require_awake("dump")
        if self._released:
            raise WeightCollectionError("weights are released (contents not valid): "
                                        "fv_load_weights first")
        for s in self.storages.values():
            yield s.key, s.tensor
        # What no parameter, buffer or attribute reaches (workspaces, tensors held elsewhere)
        # is dumped raw, block by block, so the whole pool comes back: model-agnostic.
        self.raw_blocks = self._uncovered_blocks()
        for addr, n in self.raw_blocks:
            copy = torch.empty(n, dtype=torch.uint8, device="cuda")
            _copy_device(copy.data_ptr(), addr, n)
            yield f"pool@{addr:#x}", copy

    def _uncovered_blocks(self) -> list[tuple[int, int]]:
        if self.pool is None or self.device_type != "cuda":
            return []
        return list(self.coverage().get("_uncovered", []))

    def release(self) -> int:
        """Mark the contents invalid; the memory itself goes with /sleep?level=2."""
        self._released = True
        return 0

    def targets(self) -> dict[str, torch.Tensor]:
        self._require_awake("load")
        out = {s.key: s.tensor for s in self.storages.values()}
        self._staging = [(addr, torch.empty(n, dtype=torch.uint8, device="cuda"))
                         for addr, n in getattr(self, "raw_blocks", [])]
        out.update({f"pool@{addr:#x}": t for addr, t in self._staging})
        return out

    def finish_load(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            for addr, t in getattr(self, "_staging", []):
                _copy_device(addr, t.data_ptr(), t.numel())
            torch.cuda.synchronize()
        self._staging = []
        self._released = False

    def coverage(self) -> dict[str, Any]:
        """How much of the pool's live memory the dump holds; a warning when it is not all."""
        dumped = sum(s.nbytes for s in self.storages.values())
        out: dict[str, Any] = {"dumped_bytes": dumped, "coverage": None}
        if self.pool is None:
            out["warning"] = ("no CuMemAllocator in this process (vLLM started without "
                              "--enable-sleep-mode?): /sleep?level=2 would discard nothing, and "
                              "the dump's completeness cannot be checked")
            return out
        self.pool.refresh()
        allocs = self.pool.tagged("weights")
        reserved = sum(a.size for a in allocs)
        spans = sorted((s.storage.data_ptr(), s.nbytes) for s in self.storages.values())
        in_pool = [(p, n) for p, n in spans if (a := self.pool.find(p)) and a.tag == "weights"]
        out.update(weights_pool_reserved_bytes=reserved,
                   dumped_outside_pool_bytes=dumped - sum(n for _, n in in_pool))
        blocks, why = self.pool.blocks("weights")
        uncovered: list[tuple[int, int]] = []
        if blocks:
            starts = [b for b, _ in blocks]
            hit = [False] * len(blocks)
            for p, _ in in_pool:
                k = bisect.bisect_right(starts, p) - 1
                if k >= 0 and p < blocks[k][0] + blocks[k][1]:
                    hit[k] = True
            pool_bytes = sum(n for _, n in blocks)
            covered = sum(n for (_, n), h in zip(blocks, hit) if h)
            uncovered = sorted(((a, n) for (a, n), h in zip(blocks, hit) if not h),
                               key=lambda x: -x[1])
            out["measured_against"] = "allocated blocks (MemPool snapshot)"
        else:
            covered, end = 0, 0  # union of the dumped ranges, against the reserved segments
            for p, n in in_pool:
                covered += max(0, p + n - max(p, end))
                end = max(end, p + n)
            pool_bytes = reserved
            out["measured_against"] = f"reserved segments ({why or 'empty snapshot'})"
        out["_uncovered"] = uncovered
        out.update(weights_pool_bytes=pool_bytes, covered_bytes=covered,
                   uncovered_blocks=len(uncovered),
                   largest_uncovered=[{"address": hex(a), "bytes": n} for a, n in uncovered[:5]])
        if pool_bytes == 0:
            out["warning"] = "the CuMemAllocator 'weights' pool is empty: nothing to check against"
            return out
        cov = covered / pool_bytes
        out["coverage"] = round(cov, 6)
        if cov < COVERAGE_WARN:
            out["warning"] = (
                f"weights coverage {cov:.4f} < {COVERAGE_WARN}: the dump holds "
                f"{covered / 1e9:.3f} GB of the {pool_bytes / 1e9:.3f} GB live in CuMemAllocator's "
                f"'weights' pool ({len(uncovered)} blocks uncovered, largest "
                + ", ".join(f"{n} B at {hex(a)}" for a, n in uncovered[:3])
                + "); /sleep?level=2 discards them and they come back as garbage after restore")
        return out

    def info(self) -> dict[str, Any]:
        cov = {k: v for k, v in self.coverage().items() if not k.startswith("_")}
        raw = getattr(self, "raw_blocks", [])
        return {"device": "cuda", "storages": len(self.storages),
                "storage_bytes": sum(s.nbytes for s in self.storages.values()),
                "raw_pool_blocks": len(raw), "raw_pool_bytes": sum(n for _, n in raw),
                "released": self.released, "skipped": self.skipped, **cov}


def _copy_device(dst: int, src: int, nbytes: int) -> None:
    """Device-to-device copy between raw addresses (cuMemcpyDtoD; torch has no tensor for a
    bare pool block). Runs on the worker thread, whose CUDA context torch made current."""
    global _CUDA
    if _CUDA is None:
        _CUDA = ctypes.CDLL("libcuda.so.1")
        _CUDA.cuMemcpyDtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t]
    torch.cuda.synchronize()
    rc = _CUDA.cuMemcpyDtoD_v2(dst, src, nbytes)
    if rc != 0:
        raise WeightCollectionError(f"cuMemcpyDtoD of {nbytes} bytes at {src:#x} -> {dst:#x} failed (CUresult {rc})")


_CUDA = None


def fingerprint(tensors: list[tuple[str, torch.Tensor]], samples: int = 1 << 20,
                detail: bool = False) -> dict[str, Any]:
    """Cheap checksum of weights, computed where they live: per storage, the byte sum and a
    position-weighted byte sum over a strided sample (<= ``samples`` bytes, all of a small
    one). Exact integer arithmetic; one device-to-host transfer for the whole set."""
    keys, sums, total, sampled = [], [], 0, 0
    for key, t in tensors:
        flat = flat_bytes(t)
        n = flat.numel()
        if n == 0:
            continue
        step = -(-n // samples)
        s = flat[::step].to(torch.int64)
        w = torch.arange(s.numel(), device=s.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack([s.sum(), (s * w).sum()]))
        keys.append(key)
        total += n
        sampled += s.numel()
    values = torch.stack(sums).tolist() if sums else []
    digest = hashlib.sha256(json.dumps([keys, values]).encode()).hexdigest()[:32]
    out: dict[str, Any] = {"fingerprint": digest, "storages": len(keys), "bytes": total,
                           "sampled_bytes": sampled}
    if detail:
        out["per_key"] = {k: v for k, v in zip(keys, values)}
    return out


def collect_weights(model: torch.nn.Module, draft: torch.nn.Module | None = None):
    """The platform seam: an object with items / release / targets / finish_load / info."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return CpuWeights(model)
    if current_platform.is_cuda_alike():
        modules = {"": model}
        if draft is not None and draft is not model:
            modules["draft."] = draft
        return GpuWeights(modules)
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


def _flag(value: Any) -> bool:
    """collective_rpc over HTTP passes arguments as strings."""
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


class FastVllmWorkerExtension:
    """Mixed into vLLM's worker class; every name is prefixed ``fv_`` to avoid clashes."""

    def _fv_weights(self):
        if getattr(self, "_fv_weight_set", None) is None:
            runner = self.model_runner
            get_model = getattr(runner, "get_model", None)  # unwraps CUDA graph wrappers
            model = get_model() if callable(get_model) else runner.model
            get_draft = getattr(runner, "get_draft_model", None)
            draft = get_draft() if callable(get_draft) else None
            self._fv_weight_set = collect_weights(model, draft)
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
        out: dict[str, Any] = {}
        if isinstance(w, GpuWeights):
            out = {k: v for k, v in w.coverage().items() if not k.startswith("_")}
            if out.get("coverage") is not None:
                out.pop("warning", None)  # uncovered blocks are dumped raw (see GpuWeights.items)
            elif out.get("warning"):
                print(f"fvboot worker: WARNING: {out['warning']}", file=sys.stderr, flush=True)
        info = write_weights(self._fv_path(directory), w.items(),
                             meta={"torch": torch.__version__})
        return {"path": info.path, "bytes": info.bytes, "tensors": info.tensors,
                "index_sha256": info.index_sha256, "seconds": round(info.seconds, 4),
                "gb_per_s": round(info.bytes / info.seconds / 1e9, 3) if info.seconds else 0.0,
                **({"transfer": info.details} if info.details else {}), **out,
                **({"raw_pool_blocks": len(w.raw_blocks), "raw_pool_bytes": sum(n for _, n in w.raw_blocks)}
                   if isinstance(w, GpuWeights) else {})}

    def fv_release_weights(self) -> dict[str, Any]:
        rss = _rss()
        freed = self._fv_weights().release()
        return {"bytes": freed, "rss_before": rss, "rss_after": _rss()}

    def fv_load_weights(self, directory: str, verify: bool = True) -> dict[str, Any]:
        """Refill the released weights from the dump. Every byte is checked against the
        checksums recorded at the dump by default: the probe cannot reach every weight, and a
        damaged byte elsewhere would be served as a wrong answer."""
        verify = _flag(verify)
        t0 = time.perf_counter()
        w = self._fv_weights()
        try:
            stats = load_into(self._fv_path(directory), w.targets(), verify=verify)
            w.finish_load()
        except BaseException:
            w.release()  # never leave half-filled weights that look loaded
            raise
        dt = time.perf_counter() - t0
        out = {"bytes": stats.bytes, "tensors": stats.tensors, "read_seconds": round(stats.seconds, 4),
               "seconds": round(dt, 4), "gb_per_s": round(stats.bytes / dt / 1e9, 3),
               "verified": verify, "rss": _rss()}
        if stats.details:
            out["transfer"] = stats.details
        return out

    def fv_trim(self) -> dict[str, Any]:
        """Before the checkpoint: drop what the process keeps cached but does not need (Python
        garbage, the CUDA caching allocator's free blocks, freed heap), so CRIU and the CUDA
        checkpoint save less and a restore has less to bring back."""
        import gc

        rss = _rss()
        gc.collect()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            release_pinned_cache()
        _malloc_trim()
        out = {"rss_before": rss, "rss_after": _rss()}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            out["gpu_used_bytes"] = total - free  # what the CUDA checkpoint will copy to the host
            out["torch_reserved_bytes"] = torch.cuda.memory_reserved()
        return out

    def fv_weights_info(self) -> dict[str, Any]:
        return {**self._fv_weights().info(), "rss": _rss()}

    def fv_weights_fingerprint(self, detail: bool = False) -> dict[str, Any]:
        """A cheap checksum of every dumped storage (computed on their device): compare the
        values before the dump and after fv_load_weights. Refused while they are released."""
        detail = _flag(detail)
        w = self._fv_weights()
        if isinstance(w, GpuWeights):
            w._require_awake("fingerprint")
        elif w.released:
            raise WeightCollectionError("weights are released: fv_load_weights first")
        return fingerprint([(s.key, s.tensor) for s in w.storages.values()], detail=detail)
