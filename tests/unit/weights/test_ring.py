"""Unit tests for fvboot.weights.ring and .pipeline that need no CUDA: the threaded load
pipeline run with the host-only copy engine."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

torch = need("torch", "the GPU loader works on torch tensors")

from fvboot import weights as wf
from fvboot.weights import pipeline, ring
from fvboot.weights.load import load_tensors
from fvboot.weights.settings import Config, GpuLoaderError
from weights_testdata import MIB, fvw, small_config  # noqa: F401 - fvw is a fixture


def _opened(fvw):
    """The dump's path and source tensors, its index and entries, and zeroed targets."""
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    return path, src, idx, entries, dst


def test_import_without_cuda_and_clear_error():
    repo = Path(__file__).resolve().parents[2]
    code = ("import torch, fvboot.weights.pipeline as g\n"
            "try:\n"
            "    g.CudaEngine(torch.device('cuda'), 2)\n"
            "except g.GpuLoaderError as e:\n"
            "    print('ERR', e)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert "ERR CUDA is not available" in out.stdout
    with pytest.raises(GpuLoaderError, match="moves CUDA tensors"):
        pipeline.engine_for(torch.device("cpu"), Config(), None)


@pytest.mark.parametrize("kw", [dict(), dict(buffers=2, threads=1), dict(buffers=8, threads=8),
                                dict(buffer_mb=16, threads=2), dict(odirect=True)])
def test_pipeline_load_is_exact_and_verifies(fvw, kw):
    path, src, idx, entries, dst = _opened(fvw)
    st = load_tensors(path, entries, [dst[e.key] for e in entries], checksum=idx.checksum,
                      config=small_config(**kw), engine=pipeline.HostEngine())
    for k, t in src.items():
        assert torch.equal(dst[k].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), k
    assert st.verified and st.bytes == idx.total_bytes and st.tensors == len(entries)
    assert st.io_bytes >= st.bytes and st.chunks >= 1
    assert 1 <= st.buffers <= small_config(**kw).buffers and st.threads <= small_config(**kw).buffers
    if kw.get("odirect"):
        assert st.odirect or st.notes  # tmpfs refuses O_DIRECT: falls back and says so
    d = st.as_dict()
    assert d["direction"] == "load" and d["gb_per_s"] >= 0


def test_pipeline_detects_corruption(fvw):
    path, src = fvw
    idx = wf.read_index(path)
    e = idx.entries["huge"]
    with open(path, "r+b") as f:  # a byte in the entry's third MiB: a later chunk
        f.seek(e.offset + 2 * MIB + 9)
        b = f.read(1)
        f.seek(e.offset + 2 * MIB + 9)
        f.write(bytes([b[0] ^ 0x40]))
    entries = list(idx.entries.values())
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    with pytest.raises(wf.ChecksumMismatchError, match=r"huge .*offset"):
        load_tensors(path, entries, [dst[x.key] for x in entries], checksum=idx.checksum,
                     config=small_config(), engine=pipeline.HostEngine())
    load_tensors(path, entries, [dst[x.key] for x in entries], checksum=None, config=small_config(),
                 engine=pipeline.HostEngine())  # unverified: goes through


def test_pipeline_truncated_file(fvw):
    path, src, idx, entries, dst = _opened(fvw)
    last = max(entries, key=lambda e: e.offset + e.nbytes)
    os.truncate(path, last.offset + last.nbytes - 3)
    with pytest.raises(wf.TruncatedFileError):
        load_tensors(path, entries, [dst[x.key] for x in entries], config=small_config(),
                     engine=pipeline.HostEngine())


def test_worker_error_stops_everyone(fvw, monkeypatch):
    path, src, idx, entries, dst = _opened(fvw)
    eng = pipeline.HostEngine()
    calls = []

    def copies(pairs, slot):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("copy failed")
        for d, s in pairs:
            d.copy_(s)

    monkeypatch.setattr(eng, "copies", copies)
    with pytest.raises(RuntimeError, match="copy failed"):
        load_tensors(path, entries, [dst[x.key] for x in entries], checksum=idx.checksum,
                     config=small_config(buffers=4, threads=4), engine=eng)


@pytest.mark.parametrize("fail_from", [1, 2])
def test_buffer_allocation_failure_propagates(fvw, fail_from):
    path, src, idx, entries, dst = _opened(fvw)
    eng = pipeline.HostEngine()
    real, calls = eng.alloc, []

    def alloc(nbytes, k):
        calls.append(k)
        if len(calls) >= fail_from:
            raise RuntimeError("cudaHostAlloc failed")
        return real(nbytes, k)

    eng.alloc = alloc
    try:
        load_tensors(path, entries, [dst[x.key] for x in entries], config=small_config(buffers=4, threads=4),
                     engine=eng)
    except RuntimeError as exc:
        assert "cudaHostAlloc failed" in str(exc)
    else:  # buffers are pinned lazily: one may have been enough; then it must be right
        assert fail_from > 1
        assert all(torch.equal(dst[k], t) for k, t in src.items())


def test_odirect_refused_at_read_falls_back(fvw, monkeypatch):
    path, src, idx, entries, dst = _opened(fvw)
    real = os.preadv

    def preadv(fd, bufs, off):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # opened with O_DIRECT: refuse
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(ring.os, "preadv", preadv)
    st = load_tensors(path, entries, [dst[x.key] for x in entries], checksum=idx.checksum,
                      config=small_config(odirect=True), engine=pipeline.HostEngine())
    assert not st.odirect and any("O_DIRECT" in n for n in st.notes)
    assert all(torch.equal(dst[k], t) for k, t in src.items())
