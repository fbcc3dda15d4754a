"""Unit tests for the raw weight dump format (fvboot.weights.fileformat) through the public
API (write_weights, read_index, load_into) on CPU tensors."""

from __future__ import annotations

import json
import os
import struct

import pytest

from conftest import need

torch = need("torch", "the weight file reads into torch tensors")

from fvboot import weights as wf
from fvboot.weights import fileformat
from weights_testdata import write_dump


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(37, 16, generator=g).to(torch.bfloat16),
        "norm": torch.randn(16, generator=g),  # float32
        "half": torch.randn(3, 5, 7, generator=g).to(torch.float16),
        "ids": torch.randint(-(2**40), 2**40, (11,), generator=g, dtype=torch.int64),
        "mask": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "u8": torch.randint(0, 255, (5000,), generator=g, dtype=torch.uint8),
    }


def _blank(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in src.items()}


@pytest.fixture(params=["blake3", "crc32", "xxh3"])
def written(tmp_path, request):
    src = _tensors()
    path = tmp_path / "rank0.fvw"
    info = write_dump(path, src, request.param, meta={"rank": 0})
    return path, src, info


def test_round_trip_all_dtypes(written):
    path, src, info = written
    assert info.tensors == len(src)
    assert info.bytes == sum(t.numel() * t.element_size() for t in src.values())
    dst = _blank(src)
    ptrs = {k: t.data_ptr() for k, t in dst.items()}
    stats = wf.load_into(path, dst, verify=True)
    assert stats.bytes == info.bytes and stats.verified
    for k, t in src.items():
        assert dst[k].dtype == t.dtype and dst[k].shape == t.shape
        assert torch.equal(dst[k], t), k
        assert dst[k].data_ptr() == ptrs[k], f"{k} was not filled in place"


def test_index_alignment_and_meta(written):
    path, src, info = written
    idx = wf.read_index(path)
    assert idx.meta == {"rank": 0}
    assert idx.index_sha256 == info.index_sha256
    assert list(idx.entries) == list(src)
    assert idx.entries["embed"].dtype == "bfloat16" and idx.entries["embed"].shape == (37, 16)
    assert all(e.offset % 4096 == 0 for e in idx.entries.values())
    assert os.path.getsize(path) % 4096 == 0
    spans = sorted((e.offset, e.offset + e.nbytes) for e in idx.entries.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_large_tensor_multi_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(fileformat, "CHUNK", 4096 * 3)  # force many chunks through the thread pool
    big = torch.arange(100_003, dtype=torch.float32)
    path = tmp_path / "big.fvw"
    wf.write_weights(path, [("big", big)])
    dst = {"big": torch.empty_like(big)}
    wf.load_into(path, dst, verify=True, threads=4)
    assert torch.equal(dst["big"], big)


def test_short_writes_are_written_on(tmp_path, monkeypatch):
    """A file system may write less than asked; each chunk was written once and its checksum
    recorded over the whole, so the file held zeros where the index said otherwise (found by
    review, 2026-12-06). Every writer of the file writes on until all is written: the big
    tensors' pipeline, the CPU and deferred ones, the header."""
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, memoryview(data)[:1000], off))
    tensors = [("big", torch.arange(300_007, dtype=torch.float32)), ("small", torch.arange(77, dtype=torch.int64)),
               ("half", torch.randn(513, dtype=torch.float16))]
    path = tmp_path / "short.fvw"
    wf.write_weights(path, tensors)
    dst = {k: torch.empty_like(t) for k, t in tensors}
    wf.load_into(path, dst, verify=True, threads=2)
    assert all(torch.equal(dst[k], t) for k, t in tensors)


def test_corrupt_tensor_byte_is_checksum_error(written):
    path, src, _ = written
    e = wf.read_index(path).entries["half"]
    with open(path, "r+b") as f:
        f.seek(e.offset + 17)
        b = f.read(1)
        f.seek(e.offset + 17)
        f.write(bytes([b[0] ^ 0xFF]))
    dst = _blank(src)
    wf.load_into(path, dst, verify=False)  # without verify the flip goes unnoticed
    with pytest.raises(wf.ChecksumMismatchError, match=r"half .*offset"):
        wf.load_into(path, _blank(src), verify=True)


def test_corrupt_index_byte_and_magic(written):
    path, _, _ = written
    raw = bytearray(path.read_bytes())
    raw[fileformat.HEADER_SIZE + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(wf.CorruptHeaderError, match="index sha256 mismatch"):
        wf.read_index(path)
    raw[0:8] = b"NOTAFILE"
    path.write_bytes(bytes(raw))
    with pytest.raises(wf.CorruptHeaderError, match="not a weight file"):
        wf.read_index(path)


def test_unknown_version(written):
    path, _, _ = written
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, 8, 99)
    path.write_bytes(bytes(raw))
    with pytest.raises(wf.CorruptHeaderError, match="version 99"):
        wf.read_index(path)


def test_truncated_file(written):
    path, src, _ = written
    last = max(wf.read_index(path).entries.values(), key=lambda e: e.offset + e.nbytes)
    os.truncate(path, last.offset + last.nbytes - 1)
    with pytest.raises(wf.TruncatedFileError, match=f"{last.key} ends at byte"):
        wf.load_into(path, _blank(src))
    os.truncate(path, 10)
    with pytest.raises(wf.TruncatedFileError, match="header"):
        wf.read_index(path)


def test_wrong_shape_dtype_and_keys(written):
    path, src, _ = written
    dst = _blank(src)
    dst["embed"] = torch.zeros(16, 37, dtype=torch.bfloat16)
    with pytest.raises(wf.TensorMismatchError, match=r"embed: file has bfloat16\[37, 16\], target is bfloat16\[16, 37\]"):
        wf.load_into(path, dst)
    dst = _blank(src)
    dst["norm"] = torch.zeros(16, dtype=torch.float16)
    with pytest.raises(wf.TensorMismatchError, match="float32.*float16"):
        wf.load_into(path, dst)
    dst = _blank(src)
    dst["half"] = torch.zeros(7, 5, 3, dtype=torch.float16).permute(2, 1, 0)
    with pytest.raises(wf.TensorMismatchError, match="not contiguous"):
        wf.load_into(path, dst)
    dst = _blank(src)
    del dst["norm"]
    dst["stray"] = torch.zeros(1)
    with pytest.raises(wf.MissingKeyError, match=r"no target for \['norm'\].*not in file: \['stray'\]"):
        wf.load_into(path, dst)


def test_atomic_write_leaves_no_temp_on_error(tmp_path, monkeypatch):
    path = tmp_path / "x.fvw"
    wf.write_weights(path, [("a", torch.ones(3))])
    before = path.read_bytes()

    def boom(fd):
        raise OSError("boom")

    monkeypatch.setattr(os, "fsync", boom)  # fail after the data went to the temp file
    with pytest.raises(OSError, match="boom"):
        wf.write_weights(path, [("a", torch.zeros(3))])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.fvw"]
    with pytest.raises(ValueError, match="duplicate"):
        wf.write_weights(path, [("a", torch.ones(1)), ("a", torch.ones(1))])


def test_index_is_plain_json(written):
    path, _, _ = written
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw, 16)[0]
    doc = json.loads(raw[fileformat.HEADER_SIZE:fileformat.HEADER_SIZE + n])
    assert doc["version"] == fileformat.VERSION and len(doc["entries"]) == 8


def test_resizable_storage_survives_load(tmp_path):
    """The worker extension frees and regrows storages: loading must not pin them."""
    w = torch.randn(64, 32).to(torch.bfloat16)
    path = tmp_path / "w.fvw"
    wf.write_weights(path, [("w", w)])
    target = w.clone()
    st = target.untyped_storage()
    nbytes = st.nbytes()
    st.resize_(0)
    st.resize_(nbytes)
    wf.load_into(path, {"w": target}, verify=True)
    assert torch.equal(target, w)
    target.untyped_storage().resize_(0)  # would raise if the load had made it non-resizable
    assert target.untyped_storage().nbytes() == 0
