"""vLLM worker extension: dump, release and refill the model weights in place.

Used as ``--worker-extension-cls fvboot.worker_extension.FastVllmWorkerExtension`` and driven
through ``POST /collective_rpc {"method": "fv_...", "args": [...]}`` (needs
``VLLM_SERVER_DEV_MODE=1``). Why: a CRIU checkpoint taken with the weights released is smaller
by the weights' size, and the weights come back from a raw ``.fvw`` file at disk speed.

Order the caller must keep: ``POST /sleep?level=1`` (on CPU it only pauses the scheduler) before
``fv_release_weights``, and ``POST /wake_up`` after ``fv_load_weights``: a forward pass over
released weights crashes the worker.

What the weights are depends on the device: :mod:`fvboot.weights.cpu` (vLLM's CPU backend packs
them into oneDNN handlers) and :mod:`fvboot.weights.gpu` (CuMemAllocator's "weights" pool, freed
by ``/sleep?level=2``); :func:`collect_weights` picks one. The file itself is
:mod:`fvboot.weights` (``write_weights`` / ``load_into``).
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

import torch

from . import cpustate, graph_pool, heap_census
from .checksums import DEFAULT_CHECKSUM, fastest_checksum
from .launcher import apply_load_settings
from .weights import load_into, release_pinned_cache, write_weights
from .weights.collection import WeightCollectionError, fingerprint, malloc_trim
from .weights.cpu import CpuWeights
from .weights.gpu import CuMemPool, GpuWeights, kv_room


try:  # before vLLM builds its CUDA-graph wrappers: this module is imported with the worker
    graph_pool.install()
except Exception as e:  # noqa: BLE001 - the engine then keeps vLLM's own graph pool
    print(f"fvboot: CUDA graphs stay in vLLM's own pool: {type(e).__name__}: {e}", file=sys.stderr)


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


def _pools() -> list[dict[str, Any]]:
    """The CUDA caching allocator's segments by memory pool (the default one, CUDA-graph pools,
    vLLM's sleep pool): what of the device memory a sleeping engine still holds is whose, the
    bytes the CUDA checkpoint copies and a restore brings back. Empty where torch cannot say."""
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - a diagnostic: the bake goes on without it
        return []
    pools: dict[str, dict[str, int]] = {}
    for seg in segments:
        p = pools.setdefault(str(tuple(seg.get("segment_pool_id") or (0, 0))),
                             {"segments": 0, "total_bytes": 0, "active_bytes": 0})
        p["segments"] += 1
        p["total_bytes"] += int(seg.get("total_size", 0))
        p["active_bytes"] += int(seg.get("active_size", 0))
    return [{"pool": k, **v} for k, v in sorted(pools.items(), key=lambda kv: -kv[1]["total_bytes"])]


def _context_limits() -> dict[str, Any]:
    """What of the non-torch GPU memory the CUDA context's limits hold (stack, heap, FIFO):
    with torch's pools it accounts for what a sleeping engine keeps; {"error"} where the driver
    cannot say."""
    from .cuda_driver import CudaError, Driver

    try:
        return Driver().context_limits()
    except (CudaError, AttributeError) as e:  # a diagnostic: the bake goes on without it
        return {"error": str(e)}


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
            out = w.dump_report()  # "incomplete": the bake fails on it
            if out.get("warning"):
                print(f"fvboot worker: WARNING: {out['warning']}", file=sys.stderr, flush=True)
        # a CPU engine's restore checks its weights on the cores that run CRIU and the probe:
        # by the digest this machine hashes fastest (XXH3 where the system has xxHash: ~8x
        # blake3 on an AVX2 CPU). A GPU's dump keeps blake3, which its loaders' overlapped
        # checks and the weight stager were measured with.
        checksum = DEFAULT_CHECKSUM if isinstance(w, GpuWeights) else fastest_checksum()
        info = write_weights(self._fv_path(directory), w.items(),
                             meta={"torch": torch.__version__}, checksum=checksum)
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

    def _fv_refill(self, fill: Callable[[dict], Any]) -> tuple[Any, list[str]]:
        """What every refill of the released weights does: ask again for the CPU features the
        bake had (the first call after a restore, before anything can run an AMX kernel), fill
        the weights' targets with FILL, and never leave half-filled weights that look loaded.
        Returns FILL's result and the features regained."""
        regained = cpustate.request(getattr(self, "_fv_cpu_features", 0))
        w = self._fv_weights()
        self._fv_pending = ()
        try:
            result = fill(w.targets())
            w.finish_load()
        except BaseException:
            w.release()
            raise
        return result, regained

    def fv_load_weights(self, directory: str, verify: bool = True,
                        settings: dict[str, str] | None = None, cached: bool = False,
                        overlap: bool = False) -> dict[str, Any]:
        """Refill the released weights from the dump. Every byte is checked against the
        checksums recorded at the dump by default: the probe cannot reach every weight, and a
        damaged byte elsewhere would be served as a wrong answer. SETTINGS: this start's
        FV_LOAD_* values (this process's environment is the bake's). CACHED: the caller has
        just found the dump all in the page cache (the loader need not check). OVERLAP: return
        once the bytes are in place and let the checks that can run on finish meanwhile
        (the result says how many: ``checking``); ``fv_weights_checked`` waits for them, and
        nothing may be served before it has answered."""
        verify, cached, overlap = _flag(verify), _flag(cached), _flag(overlap)
        taking = getattr(self, "_fv_taking", None)
        if taking is not None and not taking.done():
            # a background take of the staged copy still fills these tensors (fvboot did not
            # wait for it, or its wait ran out): a load beside it would race it (found by
            # review, 2026-12-06); the restore ends here, in the normal start
            raise WeightCollectionError("a take of the stager's copy is still running: the weights cannot be loaded"
                                        " beside it")
        self._fv_taking = None
        if settings is not None:
            apply_load_settings(settings)
        t0 = time.perf_counter()
        path = self._fv_path(directory)
        stats, regained = self._fv_refill(lambda targets: load_into(
            path, targets, verify=verify, known_resident=cached, defer_check=verify and overlap))
        self._fv_pending = stats.pending
        dt = time.perf_counter() - t0
        out = {"bytes": stats.bytes, "tensors": stats.tensors, "read_seconds": round(stats.seconds, 4),
               "seconds": round(dt, 4), "gb_per_s": round(stats.bytes / dt / 1e9, 3),
               "verified": verify, "rss": _rss()}
        if regained:
            out["cpu_features_regained"] = regained
        if stats.pending:
            out["checking"] = len(stats.pending)
        if stats.details:
            out["transfer"] = stats.details
        return out

    def fv_take_staged(self, directory: str, handle: str, size: int, gpu: str,
                       background: bool = False) -> dict[str, Any]:
        """Refill the released weights from the weight stager's copy on this GPU (its CUDA IPC
        HANDLE, the SIZE of the file it staged, the GPU it staged on): device-to-device copies,
        no page cache, no checks here (the stager checks the cached dump; the gate waits for
        its verdict). Raises when its copy cannot be taken; fvboot then calls fv_load_weights.
        BACKGROUND: start the take in a thread and return at once, saying whether the GPU has
        room to wake the KV cache beside the stager's buffer meanwhile (``kv_room``);
        ``fv_staged_taken`` waits for it."""
        from .weights.staged import load_staged

        path = self._fv_path(directory)

        def take() -> dict[str, Any]:
            out, regained = self._fv_refill(lambda targets: load_staged(path, targets, handle, int(size), gpu))
            out["rss"] = _rss()
            if regained:
                out["cpu_features_regained"] = regained
            return out

        if not _flag(background):
            return take()
        room = kv_room()  # before the take allocates anything
        pool = ThreadPoolExecutor(1, thread_name_prefix="fv-take-staged")
        self._fv_taking = pool.submit(take)
        pool.shutdown(wait=False)
        return {"started": True, "kv_room": room}

    def fv_staged_taken(self, timeout: float = 300) -> dict[str, Any]:
        """Wait (at most TIMEOUT s) for the take fv_take_staged(background) started: its result,
        or its error (then the weights count as not loaded: the worker loads them itself)."""
        taking = getattr(self, "_fv_taking", None)
        if taking is None:
            raise WeightCollectionError("no staged copy is being taken: fv_take_staged(background) first")
        try:
            out = taking.result(float(timeout))
        except FutureTimeout:  # kept: fv_load_weights refuses to load beside it
            self._fv_weights().release()
            raise WeightCollectionError(f"the staged copy's take did not end within {float(timeout):g} s") from None
        except BaseException:
            self._fv_taking = None  # it ended, failed: the worker may load the weights itself
            raise
        self._fv_taking = None
        return out

    def fv_weights_checked(self, timeout: float = 300) -> dict[str, Any]:
        """Wait (at most TIMEOUT s each) for the checks fv_load_weights left running; raises the
        first failure (a checksum mismatch names the tensor), and then the weights count as not
        loaded."""
        pending, self._fv_pending = getattr(self, "_fv_pending", ()), ()
        t0 = time.perf_counter()
        try:
            took = [p.result(float(timeout)) for p in pending]
        except BaseException:
            self._fv_weights().release()
            raise
        return {"checks": len(pending), "check_seconds": [round(t, 4) for t in took],
                "waited_seconds": round(time.perf_counter() - t0, 4)}

    def fv_trim(self) -> dict[str, Any]:
        """Before the checkpoint: drop what the process keeps cached but does not need (Python
        garbage, the CUDA caching allocator's free blocks, freed heap), so CRIU and the CUDA
        checkpoint save less and a restore has less to bring back."""
        import gc

        rss = _rss()
        # the CPU features this process was permitted (AMX tile data): a restore asks again
        self._fv_cpu_features = cpustate.permitted()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        saved = self._fv_drop_saved_buffers() if cuda else {}  # before the collection and the trim
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            release_pinned_cache()
        heap = heap_census.census()  # before the trim, which then returns the census's own garbage too
        malloc_trim()
        out = {"rss_before": rss, "rss_after": _rss(), "cpu_features": hex(self._fv_cpu_features), "heap": heap}
        if cuda:
            free, total = torch.cuda.mem_get_info()
            out["gpu_used_bytes"] = total - free  # what the CUDA checkpoint will copy to the host
            out["torch_reserved_bytes"] = torch.cuda.memory_reserved()
            out["torch_pools"] = _pools()
            out["context_limits"] = _context_limits()
            if saved:
                out["saved_buffers"] = saved
            if graph_pool.asked():  # FV_GRAPH_POOL=sleep: the graphs' memory sleeps too (0: it did not)
                out["graph_pool_allocations"] = graph_pool.tag_graph_memory()
            pool = CuMemPool.current()
            if pool is not None:  # what a helper must make for a restore to adopt (FV_WAKE_MEMORY=helper)
                out["sleep_pool"] = [[a.tag, a.start, a.size] for a in pool.allocs]
                addresses = getattr(self._fv_weights(), "addresses", None)
                if addresses is not None:  # and where it may put the dump's entries
                    out["weights_at"] = addresses()
        return out

    def _fv_drop_saved_buffers(self) -> dict[str, int]:
        """vLLM's level-2 sleep keeps a CPU copy of every model buffer (the rotary cache among
        them), which its wake copies back: in the checkpoint's heap, and redundant where the
        restore brings the buffer back anyway (in the weight dump, or outside the sleeping
        pool). Those copies are let go before the checkpoint; any other stays. Bytes of each."""
        saved = getattr(self, "_sleep_saved_buffers", None)
        if not saved:
            return {}
        total = sum(t.nbytes for t in saved.values())
        try:
            buffers = dict(self.model_runner.model.named_buffers())
            weights = self._fv_weights()
            dropped = [name for name in saved if name in buffers and weights.restores(buffers[name])]
        except Exception as e:  # noqa: BLE001 - the copies stay: the checkpoint is larger, not wrong
            return {"bytes": total, "dropped_bytes": 0, "kept": len(saved), "error": f"{type(e).__name__}: {e}"}
        freed = sum(saved.pop(name).nbytes for name in dropped)
        return {"bytes": total, "dropped_bytes": freed, "kept": len(saved)}

    def fv_adopt_memory(self, socket_path: str, pool: list) -> dict[str, Any]:
        """Take the sleeping allocations the weight stager made while CRIU restored this worker
        (POOL: [address, size] each; their descriptors handed over at SOCKET_PATH) and have
        vLLM's wake map them instead of creating memory (fvboot.adopt). Raises, leaving nothing
        imported, where they do not match what is asleep here."""
        from vllm.device_allocator import cumem

        from .adopt import adopt
        from .cuda_driver import Driver

        current = CuMemPool.current()
        asleep = {a.start: a.size for a in current.allocs if a.asleep} if current is not None else {}
        return adopt(Driver(), str(socket_path), [(int(p), int(n)) for p, n in pool], asleep, cumem)

    def fv_weights_in_place(self) -> dict[str, Any]:
        """The stager put the dump straight into the weights memory this worker adopted, and the
        weights' wake mapped it (FV_WAKE_MEMORY=helper with the bake's addresses): the weights
        count as loaded, with no copy, where every allocation of the weights pool is one the
        wake mapped from the adopted memory. Raises otherwise (an allocation vLLM made itself
        holds no weights); fvboot then calls fv_load_weights."""
        from vllm.device_allocator import cumem

        adopted = getattr(cumem, "_fv_adopted", None)
        current = CuMemPool.current()
        if adopted is None or current is None:
            raise WeightCollectionError("no adopted memory in this worker: the weights are not in place")
        current.refresh()
        weights = current.tagged("weights")
        missing = [a for a in weights if a.asleep or a.start not in adopted.mapped_at]
        if not weights or missing:
            raise WeightCollectionError(f"{len(missing)} of the {len(weights)} allocations of the weights pool were"
                                        " not mapped from the stager's memory: the weights are not in place")
        regained = cpustate.request(getattr(self, "_fv_cpu_features", 0))
        self._fv_pending = ()
        self._fv_weights().mark_filled()
        out: dict[str, Any] = {"in_place": True, "allocations": len(weights),
                               "bytes": sum(a.size for a in weights), "rss": _rss()}
        if regained:
            out["cpu_features_regained"] = regained
        return out

    def fv_weights_info(self) -> dict[str, Any]:
        return {**self._fv_weights().info(), "rss": _rss()}

    def fv_weights_fingerprint(self, detail: bool = False) -> dict[str, Any]:
        """A cheap checksum of every dumped storage (computed on their device): compare the
        values before the dump and after fv_load_weights. Refused while they are released."""
        detail = _flag(detail)
        w = self._fv_weights()
        if isinstance(w, GpuWeights):
            w.require_awake("fingerprint")
        elif w.released:
            raise WeightCollectionError("weights are released: fv_load_weights first")
        return fingerprint([(s.key, s.tensor) for s in w.storages.values()], detail=detail)
