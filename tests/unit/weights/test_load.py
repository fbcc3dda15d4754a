"""Unit tests for fvboot.weights.load and .write: the glue that routes device tensors to the
GPU paths and the rest to the plain loop."""

from __future__ import annotations

from conftest import need

torch = need("torch", "the weight path works on torch tensors")

from fvboot import weights as wf
from fvboot.weights import pipeline, settings
from weights_testdata import sample_tensors


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
