"""Unit tests for fvboot.weights.load and .write: the glue that routes device tensors to the
GPU paths and the rest to the plain loop."""

from __future__ import annotations

import pytest

from conftest import need

torch = need("torch", "the weight path works on torch tensors")

from fvboot import weights as wf
from fvboot.weights import pipeline, settings
from weights_testdata import flip_bit, fvw, sample_tensors  # noqa: F401 - fvw is a fixture


def test_write_and_load_route_gpu_tensors_through_pipeline(tmp_path, monkeypatch):
    """The glue in write_weights/load_into, with CPU tensors standing in for CUDA ones."""
    monkeypatch.setattr(settings, "GPU_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(pipeline, "engine_for", lambda device, cfg, engine: pipeline.HostEngine())
    monkeypatch.setenv("FV_LOAD_BUFFER_MB", "1")
    monkeypatch.setenv("FV_LOAD_BUFFERS", "3")
    src = sample_tensors(1)
    items = list(src.items())
    items.insert(3, ("deferred", wf.Deferred((5, 7), torch.float32, lambda: torch.ones(5, 7))))
    path = tmp_path / "w.fvw"
    info = wf.write_weights(path, items)
    assert info.details["gpu"][0]["direction"] == "dump" and "fsync_seconds" in info.details
    want = dict(items)
    want["deferred"] = torch.ones(5, 7)
    dst = {k: torch.zeros_like(v) for k, v in want.items()}
    stats = wf.load_into(path, dst, verify=True)
    assert stats.verified and stats.details["gpu"][0]["verified"]
    for k, t in want.items():
        assert torch.equal(dst[k], t), k
    monkeypatch.undo()
    dst = {k: torch.zeros_like(v) for k, v in want.items()}  # and the plain reader agrees
    wf.load_into(path, dst, verify=True)
    assert all(torch.equal(dst[k], t) for k, t in want.items())


def test_a_deferred_check_returns_with_the_bytes_in_place_and_passes_later(fvw):
    """FV_WEIGHT_CHECK=overlap's load: the tensors are filled when load_into returns, the check
    of the host tensors is left running, and its result comes when asked."""
    path, src = fvw
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = wf.load_into(path, dst, verify=True, defer_check=True)
    assert all(torch.equal(dst[k], t) for k, t in src.items())
    assert len(stats.pending) == 1
    assert stats.pending[0].result(timeout=60) >= 0


def test_a_deferred_check_still_finds_a_damaged_byte(fvw):
    """The damage is in the bytes loaded: the load returns, the pending check raises the
    mismatch with the tensor's name, which is what keeps the restore's gate shut."""
    path, src = fvw
    idx = wf.read_index(path)
    e = idx.entries["big"]
    flip_bit(path, e.offset + e.nbytes // 2)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = wf.load_into(path, dst, verify=True, defer_check=True)
    with pytest.raises(wf.ChecksumMismatchError, match="big"):
        stats.pending[0].result(timeout=60)


def test_without_verify_nothing_is_deferred(fvw):
    path, src = fvw
    stats = wf.load_into(path, {k: torch.zeros_like(v) for k, v in src.items()}, defer_check=True)
    assert stats.pending == () and not stats.verified


def test_a_check_that_does_not_end_is_a_bounded_error():
    import threading

    from fvboot.weights.pending import PendingCheck

    release = threading.Event()
    pending = PendingCheck(lambda: release.wait(30), "a stuck file")
    with pytest.raises(wf.WeightFileError, match="the check of a stuck file did not end within 0.2 s"):
        pending.result(timeout=0.2)
    release.set()
    assert pending.result(timeout=30) >= 0
