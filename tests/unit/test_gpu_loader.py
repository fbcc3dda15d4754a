"""Unit tests for fvboot.gpu_loader that need no CUDA: the chunk plan (pure Python), the
settings, and the threaded pipeline itself run with the host-only copy engine."""

from __future__ import annotations

import fcntl
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need

torch = need("torch", "the GPU loader works on torch tensors")

from fvboot import gpu_loader as gl
from fvboot import weightfile as wf

KIB, MIB = 1 << 10, 1 << 20


def _check_invariants(spans, chunks, chunk_bytes, align=4096):
    """Every byte of every span lands exactly once, in order; chunks are aligned reads."""
    seen = {i: [] for i, (_, n) in enumerate(spans) if n}
    last_end = -1
    for c in chunks:
        assert c.offset % align == 0
        assert c.offset >= last_end, "chunks overlap or go backwards"
        last_end = c.offset + c.length
        assert 0 < c.length <= chunk_bytes
        assert c.read_length % align == 0 and c.length <= c.read_length <= chunk_bytes
        assert c.pieces and c.length == c.pieces[-1].buf + c.pieces[-1].length
        at = 0
        for p in c.pieces:
            assert p.buf >= at, "pieces overlap inside a buffer"
            at = p.buf + p.length
            off, n = spans[p.entry]
            assert c.offset + p.buf == off + p.src, "buffer position != file position"
            assert p.length > 0 and p.src + p.length <= n
            seen[p.entry].append(p)
    for i, ps in seen.items():
        assert [p.seq for p in ps] == list(range(len(ps)))
        pos = 0
        for p in ps:
            assert p.src == pos
            pos += p.length
        assert pos == spans[i][1]


def _layout(sizes, align=4096, start=4096):
    spans, off = [], start
    for n in sizes:
        spans.append((off, n))
        off = (off + n + align - 1) // align * align
    return spans


# ------------------------------------------------------------------------------- plan


def test_small_entries_share_one_chunk():
    spans = _layout([100, 5000, 10])  # offsets 4096, 8192, 16384
    chunks = gl.plan(spans, 64 * KIB)
    assert len(chunks) == 1
    c = chunks[0]
    assert c.offset == 4096 and c.length == 16384 + 10 - 4096 and c.read_length == 16384
    assert [(p.entry, p.buf, p.length) for p in c.pieces] == [(0, 0, 100), (1, 4096, 5000),
                                                              (2, 12288, 10)]
    assert c.gaps() == [(100, 4096), (9096, 12288)]
    _check_invariants(spans, chunks, 64 * KIB)


def test_long_entry_spans_chunks_with_tail():
    spans = [(4096, 3 * 16 * KIB + 7)]
    chunks = gl.plan(spans, 16 * KIB)
    assert [(c.offset, c.length, c.read_length) for c in chunks] == [
        (4096, 16384, 16384), (20480, 16384, 16384), (36864, 16384, 16384), (53248, 7, 4096)]
    assert [(p.seq, p.src) for c in chunks for p in c.pieces] == [
        (0, 0), (1, 16384), (2, 32768), (3, 49152)]
    _check_invariants(spans, chunks, 16 * KIB)


def test_entry_straddles_chunk_boundary():
    # 2 small entries, then a big one whose head fills the first chunk's rest
    spans = _layout([1000, 1000, 40 * KIB])  # 4096, 8192, 12288
    chunks = gl.plan(spans, 16 * KIB)
    first = chunks[0]
    assert [p.entry for p in first.pieces] == [0, 1, 2]
    head = first.pieces[2]
    assert head.buf == 8192 and head.length == 8192 and head.seq == 0
    assert chunks[1].offset == first.offset + 16 * KIB  # the rest continues right after
    assert chunks[1].pieces[0].src == 8192 and chunks[1].pieces[0].seq == 1
    _check_invariants(spans, chunks, 16 * KIB)


def test_exact_fit_and_chunk_size_equal_to_entry():
    spans = _layout([16 * KIB, 16 * KIB, 1])
    chunks = gl.plan(spans, 16 * KIB)
    assert [len(c.pieces) for c in chunks] == [1, 1, 1]
    assert chunks[2].read_length == 4096
    _check_invariants(spans, chunks, 16 * KIB)


def test_gap_larger_than_max_gap_splits():
    spans = [(4096, 10), (4096 * 100, 10)]  # a 396 KiB hole (e.g. entries loaded elsewhere)
    assert len(gl.plan(spans, 4 * MIB, max_gap=256 * KIB)) == 2
    assert len(gl.plan(spans, 4 * MIB, max_gap=1 * MIB)) == 1
    # the dump plans with max_gap < one block: only padding is bridged
    assert len(gl.plan(_layout([10, 10]), 4 * MIB, max_gap=4095)) == 1
    assert len(gl.plan([(4096, 10), (12288, 10)], 4 * MIB, max_gap=4095)) == 2


def test_unsorted_input_and_empty_entries():
    spans = [(12288, 50), (4096, 0), (4096, 4000), (8192, 0)]
    chunks = gl.plan(spans, 64 * KIB)
    assert [p.entry for c in chunks for p in c.pieces] == [2, 0]
    assert gl.piece_counts(chunks, len(spans)) == [1, 0, 1, 0]
    assert gl.plan([(4096, 0)], 4096) == [] and gl.plan([], 4096) == []


def test_bad_input_raises():
    with pytest.raises(ValueError, match="not 4096-aligned"):
        gl.plan([(4097, 10)], 64 * KIB)
    with pytest.raises(ValueError, match="overlap"):
        gl.plan([(4096, 5000), (8192, 10)], 64 * KIB)
    for bad in (0, 1000, 4096 * 3 + 1):
        with pytest.raises(ValueError, match="multiple of 4096"):
            gl.plan([(4096, 10)], bad)


def test_random_layouts_keep_invariants():
    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 2, 4095, 4096, 4097, rng.randint(1, 200_000),
                             rng.randint(1, 3 * MIB)]) for _ in range(rng.randint(1, 25))]
        spans = _layout(sizes, start=rng.choice([4096, 8192, 40960]))
        chunk = rng.choice([4096, 8192, 64 * KIB, 1 * MIB])
        chunks = gl.plan(spans, chunk, max_gap=rng.choice([0, 4095, 256 * KIB]))
        _check_invariants(spans, chunks, chunk)


# ------------------------------------------------------------------------------- settings


def test_config_from_env_and_errors():
    c = gl.Config.from_env({})
    assert (c.buffers, c.buffer_mb, c.streams, c.odirect) == (gl.DEFAULT_BUFFERS, gl.DEFAULT_BUFFER_MB, gl.DEFAULT_STREAMS, False)
    assert c.buffer_bytes == gl.DEFAULT_BUFFER_MB * MIB and 1 <= c.reader_threads() <= 8
    c = gl.Config.from_env({"FV_LOAD_BUFFERS": "4", "FV_LOAD_BUFFER_MB": "32",
                            "FV_LOAD_THREADS": "16", "FV_LOAD_STREAMS": "3",
                            "FV_LOAD_ODIRECT": "1"})
    assert (c.buffers, c.buffer_mb, c.streams, c.odirect) == (4, 32, 3, True)
    assert c.reader_threads() == 4  # never more readers than buffers
    assert gl.Config.from_env({"FV_LOAD_THREADS": "5"}, threads=None).threads == 5
    assert gl.Config.from_env({"FV_LOAD_THREADS": "5"}, threads=2).threads == 2
    with pytest.raises(gl.GpuLoaderError, match=r"FV_LOAD_BUFFER_MB='lots'"):
        gl.Config.from_env({"FV_LOAD_BUFFER_MB": "lots"})
    with pytest.raises(gl.GpuLoaderError, match=r"FV_LOAD_BUFFERS='0'.*\[1, 256\]"):
        gl.Config.from_env({"FV_LOAD_BUFFERS": "0"})
    with pytest.raises(gl.GpuLoaderError, match="FV_LOAD_ODIRECT"):
        gl.Config.from_env({"FV_LOAD_ODIRECT": "maybe"})
    assert gl.enabled({}) and not gl.enabled({"FV_GPU_LOADER": "0"})


def test_auto_threads():
    assert gl.auto_threads(8, cpus=16) == 6
    assert gl.auto_threads(16, cpus=16) == 8
    assert gl.auto_threads(8, cpus=2) == 2
    assert gl.auto_threads(2, cpus=64) == 1 and gl.auto_threads(1, cpus=64) == 1


def test_import_without_cuda_and_clear_error():
    repo = Path(__file__).resolve().parents[2]
    code = ("import torch, fvboot.gpu_loader as g\n"
            "try:\n"
            "    g._CudaEngine(torch.device('cuda'), 2)\n"
            "except g.GpuLoaderError as e:\n"
            "    print('ERR', e)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    if not torch.cuda.is_available():
        assert "ERR CUDA is not available" in out.stdout
    with pytest.raises(gl.GpuLoaderError, match="moves CUDA tensors"):
        gl._engine_for(torch.device("cpu"), gl.Config(), None)


# ------------------------------------------------------------------------------- pipeline


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(3 * MIB // 2 + 333, generator=g).to(torch.bfloat16),  # ~3 MiB
        "norm": torch.randn(77, generator=g),
        "mid": torch.randint(0, 255, (MIB + 5,), generator=g, dtype=torch.uint8),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "huge": torch.randn(5 * MIB // 4 + 1, generator=g),  # ~5 MiB float32
        **{f"small{i}": torch.randn(i + 1, generator=g) for i in range(20)},
    }


@pytest.fixture(params=["blake3", "crc32"])
def fvw(tmp_path, request):
    if request.param == "blake3" and wf._blake3 is None:
        pytest.skip("the blake3 package is not installed (vLLM's images bring it)")
    src = _tensors()
    path = tmp_path / "rank0.fvw"
    wf.write_weights(path, src.items(), checksum=request.param)
    return path, src


def _cfg(**kw):
    base = dict(buffers=3, buffer_mb=1, threads=3, streams=2)
    base.update(kw)
    return gl.Config(**base)


@pytest.mark.parametrize("kw", [dict(), dict(buffers=2, threads=1), dict(buffers=8, threads=8),
                                dict(buffer_mb=16, threads=2), dict(odirect=True)])
def test_pipeline_load_is_exact_and_verifies(fvw, kw):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    st = gl.load(path, entries, [dst[e.key] for e in entries], checksum=idx.checksum,
                 config=_cfg(**kw), engine=gl._HostEngine())
    for k, t in src.items():
        assert torch.equal(dst[k].view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), k
    assert st.verified and st.bytes == idx.total_bytes and st.tensors == len(entries)
    assert st.io_bytes >= st.bytes and st.chunks >= 1
    assert 1 <= st.buffers <= _cfg(**kw).buffers and st.threads <= _cfg(**kw).buffers
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
        gl.load(path, entries, [dst[x.key] for x in entries], checksum=idx.checksum,
                config=_cfg(), engine=gl._HostEngine())
    gl.load(path, entries, [dst[x.key] for x in entries], checksum=None, config=_cfg(),
            engine=gl._HostEngine())  # unverified: goes through


def test_pipeline_truncated_file(fvw):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    last = max(entries, key=lambda e: e.offset + e.nbytes)
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    os.truncate(path, last.offset + last.nbytes - 3)
    with pytest.raises(wf.TruncatedFileError):
        gl.load(path, entries, [dst[x.key] for x in entries], config=_cfg(),
                engine=gl._HostEngine())


def test_worker_error_stops_everyone(fvw, monkeypatch):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    eng = gl._HostEngine()
    calls = []

    def copies(pairs, slot):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("copy failed")
        for d, s in pairs:
            d.copy_(s)

    monkeypatch.setattr(eng, "copies", copies)
    with pytest.raises(RuntimeError, match="copy failed"):
        gl.load(path, entries, [dst[x.key] for x in entries], checksum=idx.checksum,
                config=_cfg(buffers=4, threads=4), engine=eng)


@pytest.mark.parametrize("fail_from", [1, 2])
def test_buffer_allocation_failure_propagates(fvw, fail_from):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    eng = gl._HostEngine()
    real, calls = eng.alloc, []

    def alloc(nbytes, k):
        calls.append(k)
        if len(calls) >= fail_from:
            raise RuntimeError("cudaHostAlloc failed")
        return real(nbytes, k)

    eng.alloc = alloc
    try:
        gl.load(path, entries, [dst[x.key] for x in entries], config=_cfg(buffers=4, threads=4),
                engine=eng)
    except RuntimeError as exc:
        assert "cudaHostAlloc failed" in str(exc)
    else:  # buffers are pinned lazily: one may have been enough; then it must be right
        assert fail_from > 1
        assert all(torch.equal(dst[k], t) for k, t in src.items())


@pytest.mark.parametrize("kw", [dict(), dict(buffers=1, threads=1), dict(buffers=6, threads=6)])
def test_pipeline_dump_matches_plain_writer(fvw, tmp_path, kw):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    out = tmp_path / "dumped.bin"
    out.write_bytes(b"\xff" * idx.file_size)  # the padding inside chunks must come out zero
    fd = os.open(out, os.O_RDWR)
    try:
        digests, st = gl.dump(fd, [(e.offset, e.nbytes) for e in entries],
                              [src[e.key].contiguous() for e in entries], idx.checksum,
                              config=_cfg(**kw), engine=gl._HostEngine())
    finally:
        os.close(fd)
    assert digests == [e.checksum for e in entries]
    a, b = path.read_bytes(), out.read_bytes()
    for e in entries:
        assert a[e.offset:e.offset + e.nbytes] == b[e.offset:e.offset + e.nbytes], e.key
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries if e.nbytes)
    for (_, end), (nxt, _) in zip(spans, spans[1:]):
        assert b[end:nxt] == bytes(nxt - end), "padding between entries not zeroed"
    assert st.direction == "dump" and st.bytes == idx.total_bytes


def test_weightfile_routes_gpu_tensors_through_pipeline(tmp_path, monkeypatch):
    """The glue in write_weights/load_into, with CPU tensors standing in for CUDA ones."""
    monkeypatch.setattr(wf, "GPU_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(gl, "_engine_for", lambda device, cfg, engine: gl._HostEngine())
    monkeypatch.setenv("FV_LOAD_BUFFER_MB", "1")
    monkeypatch.setenv("FV_LOAD_BUFFERS", "3")
    src = _tensors(1)
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


# ------------------------------------------------------------------------------- GpuWeights
# The bookkeeping of worker_extension.GpuWeights, on CPU tensors with a fake CuMemAllocator.


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
    from fvboot import worker_extension as wx

    class CpuGpuWeights(wx.GpuWeights):
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
    return wx, CpuGpuWeights, m, alloc


def test_gpu_weights_storages_and_coverage():
    wx, cls, m, alloc = _gpu_weights_fixture()
    w = cls({"": m}, pool=wx.CuMemPool(alloc))
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

    alloc.allocator_and_pools.clear()  # no snapshot: falls back to reserved segment sizes
    cov = w.coverage()
    assert cov["measured_against"].startswith("reserved segments") and cov["coverage"] < 0.9


def test_gpu_weights_state_machine():
    wx, cls, m, alloc = _gpu_weights_fixture()
    w = cls({"": m}, pool=wx.CuMemPool(alloc))
    before = wx.fingerprint([(s.key, s.tensor) for s in w.storages.values()])
    assert dict(w.items()).keys() == w.targets().keys() and not w.released
    assert w.release() == 0 and w.released
    with pytest.raises(wx.WeightCollectionError, match="released"):
        list(w.items())
    for d in alloc.pointer_to_data.values():  # /sleep?level=2
        d.is_asleep = True
    with pytest.raises(wx.WeightCollectionError, match="asleep.*wake_up\\?tags=weights"):
        w.targets()
    for d in alloc.pointer_to_data.values():  # /wake_up?tags=weights
        d.is_asleep = False
    t = w.targets()
    assert all(t[k] is s.tensor for k, s in ((s.key, s) for s in w.storages.values()))
    w.finish_load()
    assert not w.released and dict(w.items())
    assert wx.fingerprint([(s.key, s.tensor) for s in w.storages.values()]) == before
    with torch.no_grad():
        m.lin.weight[3, 4] += 1
    after = wx.fingerprint([(s.key, s.tensor) for s in w.storages.values()], detail=True)
    assert after["fingerprint"] != before["fingerprint"] and "lin.weight" in after["per_key"]


def test_gpu_weights_without_allocator_warns():
    wx, cls, m, _ = _gpu_weights_fixture()
    w = cls({"": m}, pool=None)
    assert "workspace" not in {s.key for s in w.storages.values()}  # attributes need the pool
    assert "--enable-sleep-mode" in w.coverage()["warning"]


def test_odirect_refused_at_read_falls_back(fvw, monkeypatch):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    real = os.preadv

    def preadv(fd, bufs, off):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # opened with O_DIRECT: refuse
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(gl.os, "preadv", preadv)
    st = gl.load(path, entries, [dst[x.key] for x in entries], checksum=idx.checksum,
                 config=_cfg(odirect=True), engine=gl._HostEngine())
    assert not st.odirect and any("O_DIRECT" in n for n in st.notes)
    assert all(torch.equal(dst[k], t) for k, t in src.items())


# ---------------------------------------------------------------------------------------------
# The page-cache path's planning and residency check (the copies themselves need a GPU:
# bench/gpu_register_load.py and every GPU restore run them)

def _entry(key, offset, nbytes):
    return wf.WeightEntry(key=key, dtype="uint8", shape=(nbytes,), offset=offset, nbytes=nbytes,
                          checksum="")


def test_register_windows_cover_every_byte_once():
    entries = [_entry("a", 0, 5000), _entry("b", 8192, 3 << 20), _entry("c", (4 << 20), 100)]
    windows = gl._windows(entries, 1 << 20)
    got = {}
    for woff, wlen, pieces in windows:
        assert woff % (1 << 20) == 0 and wlen <= 1 << 20
        for i, eoff, hoff, n in pieces:
            assert 0 <= hoff and hoff + n <= wlen
            got.setdefault(i, []).append((eoff, n))
    for i, e in enumerate(entries):
        spans = sorted(got[i])
        assert spans[0][0] == 0 and sum(n for _, n in spans) == e.nbytes
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))


def test_file_mapping_residency(tmp_path):
    """A file never read is not resident (its pages are holes, nothing cached); once read, it is."""
    path = tmp_path / "w.bin"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = gl._FileMapping(fd, 1 << 20)
        try:
            assert not m.resident()
            while os.read(fd, 1 << 16):
                pass
            assert m.resident()
        finally:
            m.close()
    finally:
        os.close(fd)


def test_residency_without_cachestat_uses_mincore(tmp_path, monkeypatch):
    monkeypatch.setattr(gl, "_cachestat_pages", lambda *a: None)
    test_file_mapping_residency(tmp_path)


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _verify_all_mapped(path, threads: int = 3) -> float:
    idx = wf.read_index(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = gl._FileMapping(fd, os.fstat(fd).st_size)
        try:
            with gl._MappedVerifier(m, list(idx.entries.values()), idx.checksum, str(path), threads) as v:
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
        _flip(path, off)
        with pytest.raises(wf.ChecksumMismatchError, match=rf"{e.key} \({e.nbytes} bytes"):
            _verify_all_mapped(path)
        _flip(path, off)  # back as it was
    _verify_all_mapped(path)


def test_verify_threads_leave_cores_for_the_copies():
    assert gl.verify_threads(16) == 12 and gl.verify_threads(8) == 6 and gl.verify_threads(2) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_page_cache_path_and_refused_registration(tmp_path, monkeypatch):
    """On a GPU: a cached dump loads through the page-cache path, bit-exact; when the driver
    refuses the registration (forced with invalid flags), the ring loads it instead and no
    CUDA error is left behind for torch's next kernel launch to report."""
    from fvboot import weightfile

    src = {f"w{i}": torch.randn(1 << 20, device="cuda", dtype=torch.bfloat16) for i in range(6)}
    path = tmp_path / "rank0.fvw"
    weightfile.write_weights(path, src.items())
    path.read_bytes()  # all in the page cache
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = weightfile.load_into(path, dst)
    assert any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    assert all(torch.equal(dst[k], src[k]) for k in src)

    # verified (what a restore does): still the page-cache path, and a flipped bit is refused
    stats = weightfile.load_into(path, dst, verify=True)
    assert stats.verified and all(run["verified"] for run in stats.details["gpu"])
    assert any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    e = weightfile.read_index(path).entries["w3"]
    _flip(path, e.offset + 12345)
    path.read_bytes()
    with pytest.raises(weightfile.ChecksumMismatchError, match="w3"):
        weightfile.load_into(path, dst, verify=True)
    _flip(path, e.offset + 12345)

    monkeypatch.setattr(gl, "_HOST_REGISTER_READ_ONLY", 0x7FFF0000)  # cudaErrorInvalidValue
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    stats = weightfile.load_into(path, dst)
    assert not any("page cache registered" in n for run in stats.details["gpu"] for n in run["notes"])
    assert all(torch.equal(dst[k], src[k]) for k in src)
    x = torch.ones(4, device="cuda") + 1  # would raise "invalid argument" if the error lingered
    torch.cuda.synchronize()
    assert x.sum().item() == 8
