"""vLLM's CUDA graphs captured into memory that sleeps with the engine (``FV_GRAPH_POOL=sleep``,
read at bake; an option being measured).

A sleeping 3B engine still holds 1.76 GB of GPU memory at the checkpoint, 0.53 GB of it vLLM's
CUDA-graph pool (33 MB of that in use between replays); the CUDA checkpoint saves whatever the
engine holds and the resume brings it back, ~0.25 s per GiB on an H200. A graph's memory holds
nothing between replays that a replay does not write again (``bench/gpu_graph_pool_sleep.py``:
the same bytes after a sleep and a wake, four times over), so here vLLM's global graph pool is
made a pool of its own CuMemAllocator: the level-2 sleep unmaps it (its addresses kept), the
CUDA checkpoint has that much less to save, and the restore wakes it with the KV cache
(``FV_WAKE_MEMORY=helper``: the stager makes it with the rest of the sleeping memory).

The allocator tags an allocation with its current tag, which during a capture is its default;
the trim (``tag_graph_memory``) gives the pool's allocations the KV cache's tag (``TAG``), so
the restore's wake of the KV cache maps them too. Installed from the worker extension's import,
before vLLM builds its graph wrappers; it acts only where the engine runs on CUDA in sleep mode
(the bake), never in a normal start.
"""

from __future__ import annotations

from typing import Any, Optional

from . import runenv

# the KV cache's tag: vLLM's executor wakes only the tags its sleep set (weights, kv_cache) and
# refuses a whole wake that names another (its KV cache then stays asleep: the 3B restore's first
# request hung on the H200, 2026-12-04), so the graphs' memory wakes with the KV cache
TAG = "kv_cache"
ENV = "FV_GRAPH_POOL"

_pool: Optional[Any] = None  # the MemPool made: kept, or torch frees it with its last reference


def asked() -> bool:
    """FV_GRAPH_POOL=sleep (default ``vllm``: vLLM's own pool, kept through the sleep). The
    bake checks every FV_* setting (runenv) before vLLM starts; here a value it refused never
    arrives."""
    return runenv.value(ENV) == "sleep"


def install() -> bool:
    """Where asked: vLLM's global graph pool becomes one of its CuMemAllocator's when the
    platform first hands it out (a worker of an engine on CUDA in sleep mode); True when the
    hook is in place. Before the model is built: the worker extension's import."""
    if not asked():
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False
    platform = type(current_platform)
    if getattr(platform, "_fv_graph_pool", False):
        return True
    vllm_pool = platform.get_global_graph_pool

    def get_global_graph_pool(self):
        if platform._global_graph_pool is None and _sleep_mode():
            platform._global_graph_pool = _make_pool()
        return vllm_pool(self)

    platform.get_global_graph_pool = get_global_graph_pool
    platform._fv_graph_pool = True
    return True


def _sleep_mode() -> bool:
    """The engine's memory is its CuMemAllocator's: vLLM makes that allocator (sleep mode on
    CUDA) when it loads the model, before any graph wrapper asks for the pool. Not vLLM's current
    config: vLLM builds its piecewise graph wrappers while it compiles in the first profile run,
    outside any ``set_current_vllm_config``, where asking for it raises (on the H200,
    2026-12-04, the pool stayed vLLM's own that way and nothing slept)."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except Exception:  # noqa: BLE001 - no CUDA build of vLLM's allocator: no sleep mode
        return False
    return CuMemAllocator.instance is not None


def _make_pool() -> Any:
    import torch
    from vllm.device_allocator.cumem import CuMemAllocator, get_pluggable_allocator

    global _pool
    allocator = CuMemAllocator.get_instance()
    # the allocator's own callbacks (its C side keeps one pair for every pool); a pool of our
    # own, not use_memory_pool(): leaving that releases every segment torch thinks empty,
    # which a graph's intermediates are between replays
    plug = get_pluggable_allocator(allocator.python_malloc_callback, allocator.python_free_callback)
    _pool = torch.cuda.MemPool(plug._allocator)
    return _pool.id


def tag_graph_memory() -> int:
    """The graph pool's allocations in the allocator's books get TAG (at the trim, after the
    captures); how many. 0 where no such pool was made."""
    if _pool is None:
        return 0
    from vllm.device_allocator.cumem import CuMemAllocator

    segments = {s["address"] for s in _pool.snapshot()}
    n = 0
    for address, data in CuMemAllocator.get_instance().pointer_to_data.items():
        if address in segments:
            data.tag = TAG
            n += 1
    return n
