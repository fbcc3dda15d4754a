"""FV_GRAPH_POOL=sleep: vLLM's CUDA graphs captured into memory of its CuMemAllocator, which
sleeps with the engine. The setting is checked before the bake starts vLLM; the hook acts only
where asked, in an engine on CUDA in sleep mode (vLLM's CUDA platform and config stood in for:
CPU CI runs vLLM's CPU build, which has neither); on a GPU, a graph captured into that pool replays the same bytes after
the pool slept and woke under its tag (the real allocator and driver)."""

from __future__ import annotations

import sys
import types

import pytest

from fvboot import graph_pool
from fvboot.errors import BakeFailed


def test_the_bake_refuses_a_graph_pool_setting_it_does_not_know(monkeypatch, tmp_path):
    """Before anything starts (the model is not even looked at), with every other bad setting."""
    from fvboot.bake import bake
    from fvboot.layout import Layout

    monkeypatch.delenv(graph_pool.ENV, raising=False)
    assert not graph_pool.asked()
    monkeypatch.setenv(graph_pool.ENV, " Sleep ")
    assert graph_pool.asked()
    monkeypatch.setenv(graph_pool.ENV, "cumem")
    monkeypatch.setenv("FV_CRIU_DUMP_TIMEOUT_S", "never")
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(BakeFailed) as e:
        bake(Layout(tmp_path / "fv"), "/no/such/model", [], 1, 0)
    assert str(e.value) == ("FV_CRIU_DUMP_TIMEOUT_S='never' is not a number of seconds above 0 (and at most"
                            " 604800, a week); FV_GRAPH_POOL='cumem': expected vllm or sleep")


class _Platform:  # vLLM's platform interface as graph_pool uses it (vLLM cannot run in CPU CI)
    _global_graph_pool = None
    cuda = True

    def is_cuda(self):
        return self.cuda

    def graph_pool_handle(self):
        return ("vllm's", 1)

    def get_global_graph_pool(self):
        cls = self.__class__
        if cls._global_graph_pool is None:
            cls._global_graph_pool = self.graph_pool_handle()
        return cls._global_graph_pool


def _outside_a_config_context():
    raise AssertionError("Current vLLM config is not set.")  # vLLM's, where its compile builds wrappers


def _fake_vllm(monkeypatch, sleep_mode: bool, cuda: bool = True):
    """vLLM as graph_pool meets it: its CuMemAllocator exists only in sleep mode (made when the
    model loads), and its current config is not set where the compile builds graph wrappers."""
    platform_cls = type("CudaPlatform", (_Platform,), {"cuda": cuda, "_global_graph_pool": None})
    allocator = types.SimpleNamespace(instance=object() if sleep_mode else None)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms",
                        types.SimpleNamespace(current_platform=platform_cls()))
    monkeypatch.setitem(sys.modules, "vllm.config",
                        types.SimpleNamespace(get_current_vllm_config=_outside_a_config_context))
    monkeypatch.setitem(sys.modules, "vllm.device_allocator", types.ModuleType("vllm.device_allocator"))
    monkeypatch.setitem(sys.modules, "vllm.device_allocator.cumem",
                        types.SimpleNamespace(CuMemAllocator=allocator))
    monkeypatch.setattr(graph_pool, "_make_pool", lambda: ("fast-vllm's", 2))
    return platform_cls


@pytest.mark.parametrize("asked, sleep_mode, cuda, pool", [
    ("sleep", True, True, ("fast-vllm's", 2)),  # the bake on a GPU: the graphs' memory sleeps
    ("sleep", False, True, ("vllm's", 1)),  # a normal start (no sleep mode): vLLM's own pool
    ("", True, True, ("vllm's", 1)),  # not asked
    ("sleep", True, False, ("vllm's", 1)),  # not CUDA: nothing hooked
])
def test_the_global_graph_pool_sleeps_only_where_asked_in_a_sleep_mode_engine_on_cuda(monkeypatch, asked,
                                                                                     sleep_mode, cuda, pool):
    platform_cls = _fake_vllm(monkeypatch, sleep_mode, cuda)
    monkeypatch.setenv(graph_pool.ENV, asked)
    assert graph_pool.install() == (asked == "sleep" and cuda)
    assert graph_pool.install() == (asked == "sleep" and cuda)  # twice: hooked once
    platform = sys.modules["vllm.platforms"].current_platform
    assert platform.get_global_graph_pool() == pool
    assert platform.get_global_graph_pool() == pool and platform_cls._global_graph_pool == pool


def test_with_no_pool_made_there_is_nothing_to_tag(monkeypatch):
    monkeypatch.setattr(graph_pool, "_pool", None)
    assert graph_pool.tag_graph_memory() == 0


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
        allocator.wake_up(["kv_cache"])  # as the restore wakes it
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)


def test_the_bake_says_when_the_graphs_memory_asked_to_sleep_does_not(capsys):
    from fvboot import bake

    bake._say_graph_pool([{"graph_pool_allocations": 15}])
    bake._say_graph_pool([{"gpu_used_bytes": 1}])  # not asked
    assert capsys.readouterr().out == ""
    bake._say_graph_pool([{"graph_pool_allocations": 0}])
    assert "FV_GRAPH_POOL=sleep: vLLM's CUDA graphs stayed in its own pool" in capsys.readouterr().out
