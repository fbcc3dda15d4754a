"""Unit tests for fvboot.weights.gpu: the bookkeeping of GpuWeights, on CPU tensors with a fake
CuMemAllocator."""

from __future__ import annotations

import pytest

from conftest import need

torch = need("torch", "the weight collections work on torch tensors")

from fvboot.weights.collection import WeightCollectionError, fingerprint  # noqa: E402
from fvboot.weights.gpu import KV_ROOM_MARGIN, CuMemPool, GpuWeights, kv_room  # noqa: E402


class _FakeData:  # vllm.device_allocator.AllocationData
    def __init__(self, size, tag):
        self.handle = (0, size, 0, 0)
        self.tag = tag
        self.cpu_backup_tensor = None
        self.is_asleep = False


class _FakeMemPool:
    def __init__(self, segments):
        self.segments = segments

    def snapshot(self):
        return self.segments


class _FakeAllocator:
    def __init__(self):
        self.pointer_to_data = {}
        self.allocator_and_pools = {}
        self.segments = []

    def add(self, t, tag, slack=512):
        ptr = t.untyped_storage().data_ptr()
        n = t.untyped_storage().nbytes()
        self.pointer_to_data[ptr] = _FakeData(n + slack, tag)
        if tag == "weights":
            self.segments.append({"address": ptr, "total_size": n + slack, "blocks": [
                {"address": ptr, "size": n, "state": "active_allocated"},
                {"address": ptr + n, "size": slack, "state": "inactive"}]})
            self.allocator_and_pools["weights"] = (_FakeMemPool(self.segments), None)


def _gpu_weights_fixture():
    class CpuGpuWeights(GpuWeights):
        device_type = "cpu"

    m = torch.nn.Module()
    m.lin = torch.nn.Linear(16, 32)
    m.embed = torch.nn.Embedding(100, 16)
    m.head = torch.nn.Module()
    m.head.weight = m.embed.weight  # tied: one storage
    backing = torch.randn(100)
    m.register_buffer("strided", backing[::2])  # a view: dumped as its whole storage
    kv = torch.zeros(40)
    m.register_buffer("kvbuf", kv)  # lives in another pool: not ours
    m.workspace = torch.zeros(64)  # plain attribute inside the weights pool: included
    # plain attribute outside every pool: left alone. Big enough for its own mapping: a small
    # one could land in the heap right after a pool tensor, inside the fake allocation's slack.
    m.scratch = [torch.zeros(1 << 20)]
    alloc = _FakeAllocator()
    for t in (m.lin.weight, m.lin.bias, m.embed.weight, backing, m.workspace):
        alloc.add(t, "weights")
    alloc.add(kv, "kv_cache")
    return CpuGpuWeights, m, alloc


def test_gpu_weights_storages_and_coverage():
    cls, m, alloc = _gpu_weights_fixture()
    w = cls({"": m}, pool=CuMemPool(alloc))
    keys = sorted(s.key for s in w.storages.values())
    assert keys == ["embed.weight", "lin.bias", "lin.weight", "strided#storage", "workspace"]
    half = next(s for s in w.storages.values() if s.key == "strided#storage")
    assert half.tensor.dtype == torch.uint8 and half.nbytes == 400
    assert w.skipped["other_pools"] == {"kv_cache": 160}
    cov = w.coverage()
    assert cov["coverage"] == 1.0 and "warning" not in cov, cov
    assert cov["weights_pool_bytes"] == sum(s.nbytes for s in w.storages.values())
    assert cov["measured_against"].startswith("allocated blocks")

    lost = torch.zeros(1000)  # allocated during load, kept by something we do not see
    alloc.add(lost, "weights")
    cov = w.coverage()
    assert cov["coverage"] < 0.99 and cov["uncovered_blocks"] == 1
    assert "weights coverage" in cov["warning"] and "4000 B" in cov["warning"]
    assert w.info()["storages"] == 5

    report = w.dump_report()  # the lost block is dumped raw: no warning, complete
    assert "warning" not in report and not report.get("incomplete")

    alloc.allocator_and_pools.clear()  # no snapshot: falls back to reserved segment sizes
    cov = w.coverage()
    assert cov["measured_against"].startswith("reserved segments") and cov["coverage"] < 0.9
    # nothing is dumped raw then: the bake must fail, not drop the warning (found by review)
    report = w.dump_report()
    assert report["incomplete"] and "come back as garbage after restore" in report["warning"]


def test_gpu_weights_state_machine():
    cls, m, alloc = _gpu_weights_fixture()
    w = cls({"": m}, pool=CuMemPool(alloc))
    before = fingerprint([(s.key, s.tensor) for s in w.storages.values()])
    assert dict(w.items()).keys() == w.targets().keys() and not w.released
    assert w.release() == 0 and w.released
    with pytest.raises(WeightCollectionError, match="released"):
        list(w.items())
    for d in alloc.pointer_to_data.values():  # /sleep?level=2
        d.is_asleep = True
    with pytest.raises(WeightCollectionError, match="asleep.*wake_up\\?tags=weights"):
        w.targets()
    for d in alloc.pointer_to_data.values():  # /wake_up?tags=weights
        d.is_asleep = False
    t = w.targets()
    assert all(t[k] is s.tensor for k, s in ((s.key, s) for s in w.storages.values()))
    w.finish_load()
    assert not w.released and dict(w.items())
    assert fingerprint([(s.key, s.tensor) for s in w.storages.values()]) == before
    with torch.no_grad():
        m.lin.weight[3, 4] += 1
    after = fingerprint([(s.key, s.tensor) for s in w.storages.values()], detail=True)
    assert after["fingerprint"] != before["fingerprint"] and "lin.weight" in after["per_key"]


def test_gpu_weights_without_allocator_warns():
    cls, m, _ = _gpu_weights_fixture()
    w = cls({"": m}, pool=None)
    assert "workspace" not in {s.key for s in w.storages.values()}  # attributes need the pool
    assert "--enable-sleep-mode" in w.coverage()["warning"]


def test_the_kv_cache_wakes_beside_a_staged_copy_only_where_the_gpu_holds_both():
    """What is still asleep in the pool (the KV cache, the weights being awake) must fit in the
    free memory with a margin; otherwise the stager's buffer is freed first, and the answer
    says why with the sizes."""
    alloc = _FakeAllocator()
    kv, weights = torch.zeros(8), torch.zeros(8)
    alloc.add(kv, "kv_cache", slack=(4 << 30) - 32)
    alloc.add(weights, "weights")
    alloc.pointer_to_data[kv.untyped_storage().data_ptr()].is_asleep = True
    pool = CuMemPool(alloc)
    room = kv_room(pool, free=(4 << 30) + KV_ROOM_MARGIN)
    assert room == {"room": True, "free_bytes": (4 << 30) + KV_ROOM_MARGIN, "asleep_bytes": 4 << 30}
    short = kv_room(pool, free=(4 << 30) + KV_ROOM_MARGIN - 1)
    assert short["room"] is False
    assert short["why"] == "5.4 GB of GPU memory free, the KV cache takes 4.3 GB and 1.1 GB beside it"


def test_without_vllms_allocator_there_is_no_room_to_claim(monkeypatch):
    monkeypatch.setattr(CuMemPool, "current", classmethod(lambda cls: None))
    assert kv_room(free=1 << 40) == {"room": False, "why": "no CuMemAllocator in this process"}


def test_a_restore_brings_back_a_buffer_in_the_dump_or_outside_the_sleeping_pool():
    cls, m, alloc = _gpu_weights_fixture()
    w = cls({"": m}, pool=CuMemPool(alloc))
    assert w.restores(m.lin.weight) and w.restores(m.strided)  # in the dump (a view: its storage)
    assert w.restores(m.scratch[0])  # outside every pool: kept through the sleep
    assert not w.restores(m.kvbuf)  # the KV cache's pool: wiped by the sleep, not in the dump
    assert not cls({"": m}, pool=None).restores(m.lin.weight)  # no pool known: cannot say


def test_vllms_cpu_copies_of_buffers_a_restore_brings_back_are_dropped_before_the_checkpoint():
    """vLLM's level-2 sleep keeps a CPU copy of every model buffer for its wake (the rotary
    cache among them): in the checkpoint, and redundant where the dump or the checkpoint brings
    the buffer back. Those go; a copy of a buffer nothing else brings back stays."""
    import types

    from fvboot.worker_extension import FastVllmWorkerExtension

    cls, m, alloc = _gpu_weights_fixture()
    worker = FastVllmWorkerExtension()
    worker.model_runner = types.SimpleNamespace(model=m)
    worker._fv_weight_set = cls({"": m}, pool=CuMemPool(alloc))
    worker._sleep_saved_buffers = {name: b.cpu().clone() for name, b in m.named_buffers()}
    out = worker._fv_drop_saved_buffers()
    assert list(worker._sleep_saved_buffers) == ["kvbuf"]
    assert out == {"bytes": 200 + 160, "dropped_bytes": 200, "kept": 1}
    assert FastVllmWorkerExtension()._fv_drop_saved_buffers() == {}  # CPU, or no level-2 sleep


def test_a_block_a_dumped_storage_only_starts_in_is_dumped_raw_whole():
    """A live block of the weights pool reached only through a storage that views part of it
    (a workspace imported through DLPack): it counted as dumped whole, and the rest of it came
    back as garbage after the level-2 sleep (found by review, 2026-12-06)."""
    cls, m, alloc = _gpu_weights_fixture()
    block = torch.zeros(1 << 18)  # 1 MiB, live in the weights pool
    alloc.add(block, "weights")
    part = torch.empty(0)
    part.set_(block.untyped_storage(), 0, (16,))  # its first 64 bytes, dumped as a storage of 64 bytes
    w = cls({"": m}, pool=CuMemPool(alloc))
    w.storages[id(part)] = type(next(iter(w.storages.values())))(key="small", tensor=part.view(torch.uint8), nbytes=64,
                                                                 storage=part.untyped_storage())
    cov = w.coverage()
    assert cov["uncovered_blocks"] == 1 and cov["largest_uncovered"][0]["bytes"] == 1 << 20, cov
    assert "warning" not in w.dump_report()  # dumped raw, whole: complete
