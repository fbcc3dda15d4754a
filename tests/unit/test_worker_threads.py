"""worker_threads.InThread: work left running in a thread (the worker's take of a staged copy
while the engine wakes the KV cache), its value or its error handed to whoever asks, within a
bound."""

from __future__ import annotations

import threading
import time

import pytest

from fvboot.worker_threads import InThread


def test_its_value_comes_back_once_the_work_ends():
    go = threading.Event()
    t = InThread(lambda: go.wait(10) and {"bytes": 7}, "take")
    with pytest.raises(TimeoutError, match="take did not end within 0.05 s"):
        t.result(0.05)
    go.set()
    assert t.result(10) == {"bytes": 7}


def test_its_error_is_raised_in_the_caller_s_thread():
    def fail():
        raise ValueError("cuIpcOpenMemHandle: CUDA_ERROR_INVALID_VALUE")

    t = InThread(fail, "take")
    with pytest.raises(ValueError, match="CUDA_ERROR_INVALID_VALUE"):
        t.result(10)


def test_the_work_runs_beside_the_caller():
    seen = []
    t0 = time.monotonic()
    t = InThread(lambda: seen.append(threading.current_thread().name) or time.sleep(0.3), "fv-take-staged")
    assert time.monotonic() - t0 < 0.25  # returned before the work ended
    t.result(10)
    assert seen == ["fv-take-staged"]
