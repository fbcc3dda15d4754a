"""The exit warnings of a stopped vLLM (as a CPU server printed them on `docker stop`, 2026-12-02)
are dropped only after the stop; a real fault's traceback is written whole."""

from __future__ import annotations

import pytest

from fvboot import exitnoise
from fvboot.exitnoise import ExitFilter

SEEN_ON_STOP = [
    b"nanobind: leaked 64 types!\n",
    b' - leaked type "triton._C.libtriton.ir.location"\n',
    b" - ... skipped remainder\n",
    b"nanobind: leaked 514 functions!\n",
    b' - leaked function "create_memdesc_subslice"\n',
    b' - leaked function ""\n',
    b"nanobind: this is likely caused by a reference counting issue in the binding code.\n",
    b"See https://nanobind.readthedocs.io/en/latest/refleaks.html/usr/lib/python3.11/multiprocessing/"
    b"resource_tracker.py:224: UserWarning: resource_tracker: There appear to be 1 leaked semaphore objects "
    b"to clean up at shutdown\n",
    b"  warnings.warn('resource_tracker: There appear to be %d '\n",
    b"/usr/lib/python3.11/multiprocessing/resource_tracker.py:224: UserWarning: resource_tracker: There "
    b"appear to be 2 leaked shared_memory objects to clean up at shutdown\n",
]
ENGINE_DEAD = [
    b"(APIServer pid=2) Traceback (most recent call last):\n",
    b'(APIServer pid=2)   File "/opt/vllm/v1/engine/async_llm.py", line 400, in output_handler\n',
    b"(APIServer pid=2)     outputs = await engine_core.get_output_async()\n",
    b"(APIServer pid=2) vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n",
]
# The same, through vLLM's logger, after "AsyncLLM output_handler failed." (CPU image, 2026-12-02)
LOGGED_ENGINE_DEAD = [
    b"(APIServer pid=2) ERROR 12-02 17:50:30 [async_llm.py:906] AsyncLLM output_handler failed.\n",
    b"(APIServer pid=2) ERROR 12-02 17:50:30 [async_llm.py:906] Traceback (most recent call last):\n",
    b'(APIServer pid=2) ERROR 12-02 17:50:30 [async_llm.py:906]   File "/opt/venv/lib/python3.11/site-packages/'
    b'vllm/v1/engine/async_llm.py", line 849, in output_handler\n',
    b"(APIServer pid=2) ERROR 12-02 17:50:30 [async_llm.py:906]     outputs = await engine_core.get_output_async()\n",
    b"(APIServer pid=2) ERROR 12-02 17:50:30 [async_llm.py:906]               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    b"(APIServer pid=2) ERROR 12-02 17:50:30 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore "
    b"encountered an issue. See stack trace (above) for the root cause.\n",
    b' - leaked instance 0x7f00f4bf07e8 of type "triton._C.libtriton.ir.attribute"\n',
]
OTHER_FAULT = [
    b"Traceback (most recent call last):\n",
    b'  File "x.py", line 1, in <module>\n',
    b"RuntimeError: CUDA error: an illegal memory access was encountered\n",
]


@pytest.fixture
def stopped():
    exitnoise.stopping.set()
    yield
    exitnoise.stopping.clear()


def _through(f: ExitFilter, lines: list[bytes]) -> list[bytes]:
    return [out for line in lines for out in f.feed(line)] + f.flush()


def test_before_a_stop_every_line_passes():
    f = ExitFilter()
    assert _through(f, SEEN_ON_STOP + ENGINE_DEAD) == SEEN_ON_STOP + ENGINE_DEAD
    assert f.dropped == 0


def test_after_a_stop_the_libraries_exit_warnings_and_the_engine_dead_traceback_are_dropped(stopped):
    f = ExitFilter()
    kept = [b"(APIServer pid=2) INFO:     Shutting down\n"]
    shutdown = [b"(APIServer pid=2) INFO 12-02 17:50:30 [launcher.py:279] [shutdown] API server: engine client stopped\n"]
    assert _through(f, kept + SEEN_ON_STOP + ENGINE_DEAD + LOGGED_ENGINE_DEAD + shutdown) == kept + shutdown
    assert f.dropped == len(SEEN_ON_STOP) + len(ENGINE_DEAD) + len(LOGGED_ENGINE_DEAD)
    assert exitnoise.dropped() >= f.dropped


def test_after_a_stop_any_other_traceback_is_written_whole(stopped):
    f = ExitFilter()
    assert _through(f, OTHER_FAULT + [b"after\n"]) == OTHER_FAULT + [b"after\n"]
    cut = ExitFilter()  # the process died inside its traceback: what was held is still written
    assert _through(cut, OTHER_FAULT[:2]) == OTHER_FAULT[:2]
