"""Unit tests for fvboot.weights.dump without CUDA: the threaded dump run with the host-only
copy engine, against the plain writer."""

from __future__ import annotations

import os

import pytest

from conftest import need

torch = need("torch", "the GPU dump works on torch tensors")

from fvboot import weights as wf
from fvboot.weights import pipeline
from fvboot.weights.dump import dump
from weights_testdata import fvw, small_config  # noqa: F401 - fvw is a fixture


@pytest.mark.parametrize("kw", [dict(), dict(buffers=1, threads=1), dict(buffers=6, threads=6)])
def test_pipeline_dump_matches_plain_writer(fvw, tmp_path, kw):
    path, src = fvw
    idx = wf.read_index(path)
    entries = list(idx.entries.values())
    out = tmp_path / "dumped.bin"
    out.write_bytes(b"\xff" * idx.file_size)  # the padding inside chunks must come out zero
    fd = os.open(out, os.O_RDWR)
    try:
        digests, st = dump(fd, [(e.offset, e.nbytes) for e in entries],
                           [src[e.key].contiguous() for e in entries], idx.checksum,
                           config=small_config(**kw), engine=pipeline.HostEngine())
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
