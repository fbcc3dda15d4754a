"""Unit tests for fvboot.weights.cpu without vLLM: the storage bookkeeping of CpuWeights (a
stand-in ``vllm._custom_ops`` whose oneDNN handler type no module uses; the handlers themselves
need vLLM's CPU kernels: the CPU e2e suite runs them)."""

from __future__ import annotations

import sys
import types

import pytest

from conftest import need

torch = need("torch", "the weight collections work on torch tensors")

from fvboot.weights.collection import WeightCollectionError  # noqa: E402
from fvboot.weights.cpu import CpuWeights  # noqa: E402


@pytest.fixture
def onednn_handler_type(monkeypatch):
    """Only the handler type CpuWeights looks for (vllm._custom_ops is not importable without
    vLLM's CPU build; the real handlers run in the CPU e2e suite)."""
    ops = types.ModuleType("vllm._custom_ops")
    ops.CPUDNNLGEMMHandler = type("CPUDNNLGEMMHandler", (), {})
    vllm = types.ModuleType("vllm")
    vllm._custom_ops = ops
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", ops)


def test_cpu_weights_release_and_refill_storages(onednn_handler_type):
    m = torch.nn.Module()
    m.lin = torch.nn.Linear(8, 4)
    backing = torch.randn(50)
    m.register_buffer("strided", backing[::2])  # a view: dumped as its whole storage
    w_before = m.lin.weight.detach().clone()
    w = CpuWeights(m)
    keys = sorted(k for k, _ in w.items())
    assert keys == ["lin.bias", "lin.weight", "strided#storage"]
    assert w.release() == (32 + 4) * 4 + 50 * 4 and w.released
    with pytest.raises(WeightCollectionError, match="released"):
        list(w.items())
    targets = w.targets()
    assert sorted(targets) == keys and targets["lin.weight"].shape == (4, 8)
    targets["lin.weight"].copy_(w_before)
    w.finish_load()
    assert torch.equal(m.lin.weight, w_before)
    assert w.info()["storages"] == 3 and w.info()["onednn_handlers"] == 0


def test_cpu_weights_refuse_an_unknown_capture(onednn_handler_type):
    m = torch.nn.Linear(2, 2)

    class Packed:
        pass

    obj = Packed()
    m.cpu_linear = lambda x: (obj, x)
    with pytest.raises(WeightCollectionError, match="captures a .*Packed.*unknown to fast-vllm"):
        CpuWeights(m)
