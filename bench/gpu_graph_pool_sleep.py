#!/usr/bin/env python3
"""Issue 11: can CUDA graphs live in memory that sleeps with the engine? Probed without vLLM's
engine (its allocator only: the device kit's vLLM).

A sleeping 3B engine still holds 1.64 GiB of GPU memory at the checkpoint, 0.50 GiB of it the
CUDA-graph pool (0.03 GiB in use between replays), and a CUDA restore costs ~0.25 s per GiB it
brings back (bench/results/gpu_cuda_checkpoint_scaling_h200_2026-12-04/). Graph memory holds
nothing between replays that a replay does not write again, so it need not be checkpointed:
if the graphs were captured into a pool of vLLM's CuMemAllocator, the engine's sleep would
unmap it (addresses kept) and a wake would map fresh memory there. Here: a stack of bf16 layers
is captured into such a pool (tag "cudagraph") and replayed; the pool is put to sleep (the
memory it gives back is measured), woken, and replayed again: the outputs must be the same
bytes. Also replayed after a wake of *only* the graph pool, and timed.

Prints and writes ($OUT or /tmp) gpu_graph_pool_sleep.json.

    python3 bench/gpu_graph_pool_sleep.py [LAYERS] [WIDTH] [BATCH]   # default 16 4096 256
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import record  # noqa: E402

TAG = "cudagraph"


def main() -> int:
    import torch
    from vllm.device_allocator.cumem import CuMemAllocator, get_pluggable_allocator

    layers, width, batch = ([int(a) for a in sys.argv[1:4]] + [16, 4096, 256][len(sys.argv) - 1:])[:3]
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width, dtype=torch.bfloat16, device=dev),
                                                      torch.nn.GELU()) for _ in range(layers)])
    x = torch.randn(batch, width, dtype=torch.bfloat16, device=dev)  # a static input, outside the pool
    out: dict = {"bench": "gpu_graph_pool_sleep", "layers": layers, "width": width, "batch": batch, "checks": {}}
    free = lambda: torch.cuda.mem_get_info(dev)[0]  # noqa: E731

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
            for _ in range(2):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        allocator = CuMemAllocator.get_instance()
        before_capture = free()
        graph = torch.cuda.CUDAGraph()
        # a pool of the allocator's own, not its use_memory_pool(): leaving that releases every
        # segment with nothing allocated in torch's eyes, which a graph's intermediates are
        plug = get_pluggable_allocator(allocator.python_malloc_callback, allocator.python_free_callback)
        pool = torch.cuda.MemPool(plug._allocator)
        allocator.current_tag = TAG  # what the allocator tags the pool's allocations with
        try:
            with torch.cuda.graph(graph, pool=pool.id):
                y = model(x)
        finally:
            allocator.current_tag = CuMemAllocator.default_tag
        torch.cuda.synchronize()
        out["pool_bytes"] = sum(d.handle[1] for d in allocator.pointer_to_data.values() if d.tag == TAG)
        out["captured_gpu_bytes"] = before_capture - free()

        graph.replay()
        torch.cuda.synchronize()
        want = y.clone()
        eager = model(x)
        out["replay_matches_eager"] = bool(torch.equal(want, eager))  # said, not required: kernels may differ
        del eager

        held = free()
        torch.cuda.synchronize()  # a sleep unmaps: nothing may still run in that memory
        t = time.perf_counter()
        allocator.sleep(offload_tags=())  # the graph pool's memory unmapped, its addresses kept
        out["sleep_s"] = round(time.perf_counter() - t, 4)
        out["freed_by_sleep_bytes"] = free() - held

        t = time.perf_counter()
        allocator.wake_up([TAG])  # fresh memory mapped at the same addresses
        out["wake_s"] = round(time.perf_counter() - t, 4)
        y.zero_()  # whatever the fresh memory held, the replay must write it all again
        graph.replay()
        torch.cuda.synchronize()
        out["checks"]["replay_after_wake_is_the_same"] = bool(torch.equal(y, want))

        for _ in range(3):  # and again, a sleep and wake each time
            torch.cuda.synchronize()
            allocator.sleep(offload_tags=())
            allocator.wake_up([TAG])
            graph.replay()
        torch.cuda.synchronize()
        out["checks"]["three_more_rounds_the_same"] = bool(torch.equal(y, want))

    out["ok"] = all(out["checks"].values()) and out["freed_by_sleep_bytes"] > 0
    record("gpu_graph_pool_sleep", out)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
