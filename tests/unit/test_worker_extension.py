"""The worker extension's wait for a staged copy taken in the background (FV_WAKE_ORDER=kv-beside):
the take's value or its error comes back in the caller, and a take that does not end within the
bound is said as such and leaves the weights marked not loaded. The take itself runs on a GPU."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import need

need("torch", "the worker extension imports torch")

from fvboot.weights.collection import WeightCollectionError  # noqa: E402
from fvboot.worker_extension import FastVllmWorkerExtension  # noqa: E402


class _Weights:
    released = False

    def release(self):
        self.released = True


def _worker(work):
    w = FastVllmWorkerExtension()
    w._fv_weight_set = _Weights()
    pool = ThreadPoolExecutor(1)
    w._fv_taking = pool.submit(work)
    pool.shutdown(wait=False)
    return w


def test_the_takes_value_or_error_comes_back():
    assert _worker(lambda: {"bytes": 7}).fv_staged_taken(10) == {"bytes": 7}

    def fail():
        raise ValueError("cuIpcOpenMemHandle: CUDA_ERROR_INVALID_VALUE")

    with pytest.raises(ValueError, match="CUDA_ERROR_INVALID_VALUE"):
        _worker(fail).fv_staged_taken(10)


def test_a_take_past_the_bound_marks_the_weights_not_loaded():
    go = threading.Event()
    w = _worker(lambda: go.wait(10))
    try:
        with pytest.raises(WeightCollectionError, match="the staged copy's take did not end within 0.05 s"):
            w.fv_staged_taken(0.05)
        assert w._fv_weight_set.released
        with pytest.raises(WeightCollectionError, match="no staged copy is being taken"):
            w.fv_staged_taken(0.05)
    finally:
        go.set()


def test_the_heap_census_counts_frozen_objects_and_leaves_them_frozen():
    """vLLM freezes the collector after its start-up; a census of gc.get_objects() alone saw
    3 190 objects of the 3B engine's heap. Frozen ones are counted, and stay frozen."""
    import gc

    from fvboot.worker_extension import _heap_census

    kept = [[i] for i in range(50_000)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        heap = _heap_census()
        young = {id(o) for o in gc.get_objects()}  # the permanent generation left out
        assert not any(id(o) in young for o in kept)  # frozen again
        assert frozen >= heap["frozen_objects"] > 50_000  # (frozen ones may die by refcount meanwhile)
        assert heap["python"]["objects"] > heap["frozen_objects"]
        assert [n for name, n, _ in heap["python"]["top"] if name == "list"][0] > 50_000
    finally:
        gc.unfreeze()
    del kept


def test_the_heap_census_leaves_out_memory_a_tensor_holds_off_the_cpu():
    """A tensor's and a storage's __sizeof__ add the memory they hold, on whatever device: a
    GPU's weights and KV cache counted 120 GB of "Python heap". Off the CPU only the object is."""
    import torch

    from fvboot.worker_extension import _heap_census

    big = torch.empty(1 << 36, dtype=torch.uint8, device="meta")  # 64 GiB, nowhere
    storage = big.untyped_storage()
    heap = _heap_census()
    assert heap["python"]["bytes"] < 8 << 30, heap["python"]["top"]
    del big, storage
