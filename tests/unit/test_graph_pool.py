"""FV_GRAPH_POOL=sleep: vLLM's CUDA graphs captured into memory of its CuMemAllocator, which
sleeps with the engine. The setting is checked before the bake starts vLLM; the hook acts only
where asked, on CUDA; on a GPU, a graph captured into that pool replays the same bytes after the
pool slept and woke under its tag (the real allocator and driver)."""

from __future__ import annotations

import pytest

from fvboot import graph_pool
from fvboot.errors import BakeFailed


def test_the_bake_refuses_a_graph_pool_setting_it_does_not_know(monkeypatch):
    monkeypatch.delenv(graph_pool.ENV, raising=False)
    assert graph_pool.graph_pool_setting() == "vllm" and not graph_pool.asked()
    monkeypatch.setenv(graph_pool.ENV, " Sleep ")
    assert graph_pool.graph_pool_setting() == "sleep" and graph_pool.asked()
    monkeypatch.setenv(graph_pool.ENV, "cumem")
    with pytest.raises(BakeFailed, match="FV_GRAPH_POOL='cumem': expected vllm or sleep"):
        graph_pool.graph_pool_setting()


def test_nothing_is_hooked_unless_asked_and_on_cuda(monkeypatch):
    monkeypatch.delenv(graph_pool.ENV, raising=False)
    assert graph_pool.install() is False
    vllm = pytest.importorskip("vllm.platforms", reason="needs vLLM")
    platform = type(vllm.current_platform)
    before = platform.get_global_graph_pool
    monkeypatch.setenv(graph_pool.ENV, "sleep")
    installed = graph_pool.install()
    assert installed == vllm.current_platform.is_cuda()
    if not installed:
        assert platform.get_global_graph_pool is before
    assert graph_pool.tag_graph_memory() == 0  # no pool made: nothing to tag


def test_gpu_a_graph_in_the_sleeping_pool_replays_the_same_after_a_sleep_and_a_wake():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cumem = pytest.importorskip("vllm.device_allocator.cumem", reason="needs vLLM's CUDA build")
    allocator = cumem.CuMemAllocator.get_instance()
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, dtype=torch.bfloat16, device=dev) for _ in range(4)])
    x = torch.randn(64, 1024, dtype=torch.bfloat16, device=dev)
    with torch.inference_mode():
        layers(x)
        torch.cuda.synchronize()
        pool = graph_pool._make_pool()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            y = layers(x)
        graph.replay()
        torch.cuda.synchronize()
        want = y.clone()
        assert graph_pool.tag_graph_memory() > 0
        tags = {d.tag for d in allocator.pointer_to_data.values()}
        assert graph_pool.TAG in tags
        allocator.sleep(offload_tags=())
        allocator.wake_up(["kv_cache", graph_pool.TAG])  # as the restore wakes it
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)
