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


def test_file_mapping_residency(tmp_path):
    """A file never read is not resident (its pages are holes, nothing cached); once read, it is."""
    path = tmp_path / "w.bin"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = pagecache.FileMapping(fd, 1 << 20)
        try:
            assert not m.resident()
            while os.read(fd, 1 << 16):
                pass
            assert m.resident()
        finally:
            m.close()
    finally:
        os.close(fd)


def test_missing_pages_are_counted(tmp_path):
    """A file never read misses every page; the load's note says how many (why the ring ran)."""
    path = tmp_path / "w.bin"
    with path.open("wb") as f:
        f.truncate(3 * MIB + 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = pagecache.FileMapping(fd, 3 * MIB + 1)
        try:
            assert m.missing_pages() == m.pages == 3 * MIB // pagecache._PAGE + 1
        finally:
            m.close()
    finally:
        os.close(fd)


def test_the_page_cache_path_says_why_it_cannot_load(fvw):
    path, src = fvw
    idx = wf.read_index(path)
    with pytest.raises(pagecache.PageCachePathUnavailable, match="on cpu, not on a CUDA device"):
        pagecache.load_registered(path, list(idx.entries.values()), [torch.zeros_like(t) for t in src.values()])


def test_residency_without_cachestat_uses_mincore(tmp_path, monkeypatch):
    monkeypatch.setattr(pagecache, "_cachestat_pages", lambda *a: None)
    test_file_mapping_residency(tmp_path)


def test_a_cachestat_that_sees_nothing_is_checked_with_mincore(tmp_path, monkeypatch):
    """cachestat of an overlayfs file (a container's image layer) counts 0 cached pages whatever
    is cached; mincore over the mapping decides then (the e2e test runs the real overlayfs)."""
    monkeypatch.setattr(pagecache, "_cachestat_pages", lambda *a: 0)
    test_file_mapping_residency(tmp_path)


@pytest.mark.parametrize("size", [5 * MIB + 4096 + 1, 3 * MIB])
def test_mincore_in_spans_sees_the_end_missing(tmp_path, size):
    """The threaded mincore checks every span, the last (short) one included. (The last MiB is
    dropped, not one page: the page cache may hold the file in folios larger than a page.)"""
    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        m = pagecache.FileMapping(fd, size)
        try:
            assert m._mincore_missing(span=MIB) == 0
            os.fsync(fd)  # written pages are dirty until then, and a dirty page is not dropped
            start = (size - MIB) // 4096 * 4096
            os.posix_fadvise(fd, start, size - start, os.POSIX_FADV_DONTNEED)
            assert m._mincore_missing(span=MIB) > 0
        finally:
            m.close()
    finally:
        os.close(fd)


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
    flip_bit(path, e.offset + 12345)

    monkeypatch.setattr(pagecache, "_HOST_REGISTER_READ_ONLY", 0x7FFF0000)  # cudaErrorInvalidValue
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = wf.load_into(path, dst)
    assert not any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    assert all(torch.equal(dst[k], src[k]) for k in src)
    x = torch.ones(4, device="cuda") + 1  # would raise "invalid argument" if the error lingered
    torch.cuda.synchronize()
    assert x.sum().item() == 8
