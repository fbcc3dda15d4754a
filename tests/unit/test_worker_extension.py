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


def test_a_take_past_the_bound_marks_the_weights_not_loaded_and_no_load_runs_beside_it(tmp_path):
    """The take still runs after its bound: a load of the same tensors beside it would race it
    (found by review, 2026-12-06), so the worker refuses one until the take has ended."""
    go = threading.Event()
    w = _worker(lambda: go.wait(10))
    try:
        with pytest.raises(WeightCollectionError, match="the staged copy's take did not end within 0.05 s"):
            w.fv_staged_taken(0.05)
        assert w._fv_weight_set.released
        with pytest.raises(WeightCollectionError, match="a take of the stager's copy is still running"):
            w.fv_load_weights(str(tmp_path / "weights"))
    finally:
        go.set()
    w._fv_taking.result(10)
    with pytest.raises(Exception) as e:  # the take ended: the load runs (and finds no dump here)
        w.fv_load_weights(str(tmp_path / "weights"))
    assert "still running" not in str(e.value)


def test_a_take_that_failed_leaves_the_load_to_the_worker(tmp_path):
    def fail():
        raise ValueError("cuIpcOpenMemHandle: CUDA_ERROR_INVALID_VALUE")

    w = _worker(fail)
    with pytest.raises(ValueError):
        w.fv_staged_taken(10)
    with pytest.raises(Exception) as e:
        w.fv_load_weights(str(tmp_path / "weights"))
    assert "still running" not in str(e.value)
    with pytest.raises(WeightCollectionError, match="no staged copy is being taken"):
        w.fv_staged_taken(0.05)

