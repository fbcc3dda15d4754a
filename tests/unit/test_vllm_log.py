"""fvboot's one line for a vLLM that stopped before it served (a bake's, which fvbuild shows, or
a normal start's): vLLM's own reason, read from the end of its output, instead of "see its log
above" (tried as an operator would, 2026-12-05: `--vllm-arg=--max-model-len=abc` ended in that
line, the reason 20 lines up in a wrapped traceback; 2026-12-06: a normal start with Docker's
default 64 MB /dev/shm, vLLM's "Increase /dev/shm" pages up). The lines are those vLLM 0.32 (CPU) printed in the bake of this machine;
vLLM 0.26 (the GPU machine's) prints the same with its process's name before every line, and the
GPU suite found the reason missed there (H100, 2026-12-06: "vLLM said: ValidationError: 1
validation error for ModelConfig")."""

from __future__ import annotations

import pytest

from fvboot.vllm_log import Tail, exited, reason as vllm_reason
import fvboot.vllm_log as vllm_log

ARGPARSE = [
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "usage: vllm serve [model_tag] [options]",
    "main.py serve: error: argument --max-model-len: invalid human_readable_int_or_auto value: 'abc'",
    "fvboot: the vLLM server exited before it became healthy (see its log above)",
]
PYDANTIC = [
    '  File "/opt/venv/lib/python3.11/site-packages/pydantic/_internal/_dataclasses.py", line 121, in __init__',
    "    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)",
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
    "  Value error, User-specified max_model_len (1048576) is greater than the derived max_model_len"
    " (max_position_embeddings=2048.0 or model_max_length=None in model's config.json). To allow overriding"
    " this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. [type=value_error, input_value=ArgsKwargs((),"
    " {'model': ...}), input_type=ArgsKwargs]",
    "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
    "fvboot: the vLLM server exited before it became healthy (see its log above)",
]
SHM = [  # the normal start of 2026-12-06, as vLLM 0.32 printed it
    "Process EngineCore:",
    "Traceback (most recent call last):",
    "RuntimeError: Insufficient space in /dev/shm for shared-memory allocation: 160 MiB required, 64 MiB free."
    " Increase /dev/shm (e.g. --shm-size or --ipc=host).",
    "(EngineCore pid=54) ERROR 12-06 08:32:58 [core.py:1510] RuntimeError: Insufficient space in /dev/shm for"
    " shared-memory allocation: 160 MiB required, 64 MiB free. Increase /dev/shm (e.g. --shm-size or --ipc=host).",
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
]
ENGINE = [
    "(EngineCore pid=108) ERROR 12-05 18:20:01 [core.py:700] EngineCore failed to start.",
    "(EngineCore pid=108) ValueError: Free memory on device (1.2/79.1 GiB) on startup is less than desired"
    " GPU memory utilization (0.9, 71.2 GiB).",
    "(APIServer pid=2) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    "fvboot: the vLLM server exited before it became healthy (see its log above)",
]


CYAN, RESET = "\x1b[0;36m", "\x1b[0;0m"
PREFIXED = [f"(APIServer pid=1) {line}" for line in PYDANTIC[:-1]] + PYDANTIC[-1:]
COLOURED = [f"{CYAN}(APIServer pid=1){RESET} {line}" for line in PYDANTIC[:-1]] + PYDANTIC[-1:]


@pytest.mark.parametrize("lines, said", [
    (ARGPARSE, "argument --max-model-len: invalid human_readable_int_or_auto value: 'abc'"),
    (PYDANTIC, "User-specified max_model_len (1048576) is greater than the derived max_model_len"),
    (PREFIXED, "User-specified max_model_len (1048576) is greater than the derived max_model_len"),
    (COLOURED, "User-specified max_model_len (1048576) is greater than the derived max_model_len"),
    (SHM, "RuntimeError: Insufficient space in /dev/shm for shared-memory allocation: 160 MiB required, 64 MiB "
          "free. Increase /dev/shm (e.g. --shm-size or --ipc=host)."),
    (ENGINE, "ValueError: Free memory on device (1.2/79.1 GiB) on startup is less than desired"),
], ids=["argparse", "pydantic", "pydantic-vllm-0.26", "pydantic-coloured", "shm", "engine"])
def test_vllms_own_reason_is_found(lines, said):
    got = vllm_reason(lines)
    assert got is not None and got.startswith(said), got
    assert "[type=" not in got and "See root cause above" not in got and "pid=" not in got


def test_a_log_without_a_reason_gives_none_and_a_long_one_is_cut():
    assert vllm_reason(["INFO starting", "fvboot: the vLLM server exited before it became healthy"]) is None
    assert len(vllm_reason(["RuntimeError: " + "x" * 2000])) == 400


def test_the_tail_of_the_trees_output_gives_the_exit_its_reason_and_a_new_tree_starts_it_afresh(monkeypatch):
    tail = Tail(size=4)
    monkeypatch.setattr(vllm_log, "recent", tail)
    tail.stream_started()
    for line in [b"old noise\n", b"ValueError: from an earlier tree\n"]:
        tail.add(line)
    tail.clear()
    assert exited("the vLLM server exited", wait=0.05) == "the vLLM server exited (see its log above)"
    for line in [b"x\n", b"Traceback (most recent call last):\n", b"OSError: [Errno 24] Too many open files\n",
                 b"RuntimeError: Engine core initialization failed. See root cause above.\n"]:
        tail.add(line)
    tail.stream_ended()  # the wait ends at once once every stream has ended
    assert exited("the vLLM server exited", wait=30) == (
        "the vLLM server exited; vLLM said: OSError: [Errno 24] Too many open files")


def test_a_compilers_error_line_is_not_taken_for_a_command_line_refusal():
    """argparse's "PROG: error: ..." outranks every exception; a compiler's diagnostic from a
    JIT build (Triton's, FlashInfer's) has the same words and must not (found by review,
    2026-12-06: the C error was given instead of the out-of-memory that ended the server)."""
    lines = ["/tmp/x/cuda_utils.c:6:10: error: unknown type name 'foo'", "kernel.cu(12): error: identifier undefined",
             "Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"]
    assert vllm_reason(lines) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
    assert vllm_reason(["usage: vllm serve [model_tag] [options]", "vllm serve: error: unrecognized arguments: --x"]) \
        == "unrecognized arguments: --x"


def test_the_reason_is_read_once_the_streams_are_quiet_not_after_the_whole_bound(monkeypatch):
    """fvboot keeps the write ends of the tree's streams for the next tree, so they do not end
    while it runs: the reason is read once no line has come for a moment, not after the whole
    bound (every exit's line came 2 s late; found by review, 2026-12-06). Lines that keep
    coming are waited for, within the bound."""
    import threading
    import time

    tail = Tail()
    monkeypatch.setattr(vllm_log, "recent", tail)
    tail.stream_started()
    tail.add(b"ValueError: the first reason\n")
    t0 = time.monotonic()
    assert exited("exited", wait=5) == "exited; vLLM said: ValueError: the first reason"
    assert time.monotonic() - t0 < 1.5

    def late() -> None:
        for i in range(5):
            time.sleep(0.1)
            tail.add(f"RuntimeError: line {i}\n".encode())

    writer = threading.Thread(target=late)
    writer.start()
    assert exited("exited", wait=5) == "exited; vLLM said: RuntimeError: line 4"
    writer.join()
