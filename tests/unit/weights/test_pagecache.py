"""Unit tests for fvboot.weights.pagecache: residency, the mapped verifier; on a GPU, the
registered load itself (the copies need CUDA: bench/gpu_register_load.py and every GPU restore
run them too)."""

from __future__ import annotations

import os

import pytest

from conftest import need

torch = need("torch", "the page-cache path works on torch tensors")

from fvboot import weights as wf
from fvboot.weights import pagecache
from weights_testdata import MIB, flip_bit, fvw  # noqa: F401 - fvw is a fixture


def test_the_page_cache_path_says_why_it_cannot_load(fvw):
    path, src = fvw
    idx = wf.read_index(path)
    with pytest.raises(pagecache.PageCachePathUnavailable, match="on cpu, not on a CUDA device"):
        pagecache.load_registered(path, list(idx.entries.values()), [torch.zeros_like(t) for t in src.values()])


def _verify_all_mapped(path, threads: int = 3) -> float:
    idx = wf.read_index(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = pagecache.FileMapping(fd, os.fstat(fd).st_size)
        try:
            with pagecache.MappedVerifier(m, list(idx.entries.values()), idx.checksum, str(path), threads) as v:
                v.result()
            return v.seconds
        finally:
            m.close()
    finally:
        os.close(fd)


def test_mapped_verifier_passes_an_intact_dump_and_names_a_flipped_bit(fvw):
    """The page-cache path's check (hashing the mapped file beside the GPU copies) passes the
    dump as written and refuses one flipped bit anywhere: the first byte of a small entry, the
    last byte of the biggest, and a byte in the middle of a big one."""
    path, _ = fvw
    assert _verify_all_mapped(path) >= 0
    idx = wf.read_index(path)
    big, small = idx.entries["huge"], idx.entries["small3"]
    for e, off in ((small, small.offset), (big, big.offset + big.nbytes - 1),
                   (idx.entries["mid"], idx.entries["mid"].offset + MIB // 2)):
        flip_bit(path, off)
        with pytest.raises(wf.ChecksumMismatchError, match=rf"{e.key} \({e.nbytes} bytes"):
            _verify_all_mapped(path)
        flip_bit(path, off)  # back as it was
    _verify_all_mapped(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_page_cache_path_and_refused_registration(tmp_path, monkeypatch):
    """On a GPU: a cached dump loads through the page-cache path, bit-exact; when the driver
    refuses the registration (forced with invalid flags), the ring loads it instead and no
    CUDA error is left behind for torch's next kernel launch to report."""
    src = {f"w{i}": torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16) for i in range(6)}
    path = tmp_path / "rank0.fvw"
    wf.write_weights(path, src.items())
    path.read_bytes()  # all in the page cache
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = wf.load_into(path, dst)
    assert any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    assert all(torch.equal(dst[k], src[k]) for k in src)

    # verified (what a restore does): still the page-cache path, and a flipped bit is refused
    stats = wf.load_into(path, dst, verify=True)
    assert stats.verified and all(run["verified"] for run in stats.details["gpu"])
    assert any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    e = wf.read_index(path).entries["w3"]
    flip_bit(path, e.offset + 12345)
    path.read_bytes()
    with pytest.raises(wf.ChecksumMismatchError, match="w3"):
        wf.load_into(path, dst, verify=True)
    # the check overlapped (FV_WEIGHT_CHECK=overlap): the load returns, the pending check refuses
    stats = wf.load_into(path, dst, verify=True, defer_check=True, known_resident=True)
    assert any("after the copies" in n for run in stats.details["gpu"] for n in run["notes"])
    with pytest.raises(wf.ChecksumMismatchError, match="w3"):
        stats.pending[0].result(timeout=60)
    flip_bit(path, e.offset + 12345)
    path.read_bytes()
    stats = wf.load_into(path, dst, verify=True, defer_check=True)
    assert stats.pending[0].result(timeout=60) >= 0 and all(torch.equal(dst[k], src[k]) for k in src)

    monkeypatch.setattr(pagecache, "_HOST_REGISTER_READ_ONLY", 0x7FFF0000)  # cudaErrorInvalidValue
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = wf.load_into(path, dst)
    assert not any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    assert all(torch.equal(dst[k], src[k]) for k in src)
    x = torch.ones(4, device="cuda") + 1  # would raise "invalid argument" if the error lingered
    torch.cuda.synchronize()
    assert x.sum().item() == 8
