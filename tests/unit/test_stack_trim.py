"""FV_TRIM_STACK_BYTES: the CUDA context's per-thread stack lowered before the checkpoint, so the
local memory it reserves is not copied out and back by every restore. The setting is checked
before vLLM starts; the trim only gives memory back; the real driver's part runs on a GPU
(test_gpu_*, in `.ci/gpu-run unit`)."""

from __future__ import annotations

import pytest

from fvboot import stack_trim
from fvboot.cuda_driver import CudaError
from fvboot.errors import BakeFailed


class _Driver:
    """The three calls trim() makes, on a GPU of SMS x THREADS threads whose free memory follows
    the stack reservation."""

    def __init__(self, stack: int = 1024, sms: int = 132, threads: int = 2048, refuse: bool = False):
        self.stack, self.threads, self.refuse = stack, sms * threads, refuse
        self.total = 140 << 30

    def context_limits(self) -> dict[str, int]:
        return {"stack_bytes": self.stack, "local_memory_bytes": self.stack * self.threads}

    def mem_get_info(self) -> tuple[int, int]:
        return self.total - (1 << 30) - self.stack * self.threads, self.total

    def set_limit(self, name: str, value: int) -> None:
        assert name == "stack_bytes"
        if self.refuse:
            raise CudaError("cuCtxSetLimit: CUDA_ERROR_INVALID_VALUE")
        self.stack = value


@pytest.mark.parametrize("raw, want", [(None, None), ("", None), ("  ", None), ("256", 256), (" 0 ", 0),
                                       (str(1 << 20), 1 << 20)])
def test_the_setting_is_a_stack_size_in_bytes_or_nothing(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv(stack_trim.ENV, raising=False)
    else:
        monkeypatch.setenv(stack_trim.ENV, raw)
    assert stack_trim.setting() == want


@pytest.mark.parametrize("raw", ["1k", "-1", "2097152", "256.0", "yes"])
def test_the_bake_refuses_a_stack_setting_that_is_not_a_size(monkeypatch, raw):
    monkeypatch.setenv(stack_trim.ENV, raw)
    with pytest.raises(BakeFailed, match=rf"FV_TRIM_STACK_BYTES='{raw}': expected the per-thread stack in bytes, 0 to 1048576"):
        stack_trim.bake_setting()


def test_a_smaller_stack_gives_its_reservation_back_and_says_how_much():
    d = _Driver(stack=1024)
    out = stack_trim.trim(d, 256)
    assert out == {"stack_bytes_before": 1024, "stack_bytes_after": 256, "gpu_freed_bytes": 768 * 132 * 2048}
    assert d.stack == 256


def test_a_stack_already_as_small_is_left_alone():
    d = _Driver(stack=256)
    assert stack_trim.trim(d, 1024) == {"stack_bytes_before": 256, "stack_bytes_after": 256, "gpu_freed_bytes": 0}
    assert d.stack == 256


def test_a_driver_that_refuses_leaves_the_checkpoint_as_it_was_and_says_why():
    d = _Driver(stack=1024, refuse=True)
    assert stack_trim.trim(d, 0) == {"error": "cuCtxSetLimit: CUDA_ERROR_INVALID_VALUE"}
    assert d.stack == 1024


def test_gpu_the_stack_reservation_comes_back_and_a_kernel_runs_after_it():
    """The real driver: lowering the stack frees memory (or nothing, if the driver keeps it),
    and work launched after still runs and gives the same result (the driver raises the stack
    again where a kernel needs it)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fvboot.cuda_driver import Driver

    x = torch.randn(512, 512, device="cuda")
    want = (x @ x).sum().item()
    torch.cuda.synchronize()
    out = stack_trim.trim(Driver(), 256)  # the value `.ci/gpu-run stack` bakes with
    assert "error" not in out, out
    assert out["stack_bytes_before"] > 256 and out["stack_bytes_after"] == 256, out
    assert out["gpu_freed_bytes"] >= 0
    assert (x @ x).sum().item() == want
