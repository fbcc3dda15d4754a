"""Unit tests for fvboot.weights.plan: the chunk plan and the page-cache windows (pure Python)."""

from __future__ import annotations

import random

import pytest

from conftest import need

torch = need("torch", "the weight path works on torch tensors")

from fvboot.weights.plan import piece_counts, plan, windows
from weights_testdata import KIB, MIB, check_invariants, entry, layout


def test_small_entries_share_one_chunk():
    spans = layout([100, 5000, 10])  # offsets 4096, 8192, 16384
    chunks = plan(spans, 64 * KIB)
    assert len(chunks) == 1
    c = chunks[0]
    assert c.offset == 4096 and c.length == 16384 + 10 - 4096 and c.read_length == 16384
    assert [(p.entry, p.buf, p.length) for p in c.pieces] == [(0, 0, 100), (1, 4096, 5000),
                                                              (2, 12288, 10)]
    assert c.gaps() == [(100, 4096), (9096, 12288)]
    check_invariants(spans, chunks, 64 * KIB)


def test_long_entry_spans_chunks_with_tail():
    spans = [(4096, 3 * 16 * KIB + 7)]
    chunks = plan(spans, 16 * KIB)
    assert [(c.offset, c.length, c.read_length) for c in chunks] == [
        (4096, 16384, 16384), (20480, 16384, 16384), (36864, 16384, 16384), (53248, 7, 4096)]
    assert [(p.seq, p.src) for c in chunks for p in c.pieces] == [
        (0, 0), (1, 16384), (2, 32768), (3, 49152)]
    check_invariants(spans, chunks, 16 * KIB)


def test_entry_straddles_chunk_boundary():
    # 2 small entries, then a big one whose head fills the first chunk's rest
    spans = layout([1000, 1000, 40 * KIB])  # 4096, 8192, 12288
    chunks = plan(spans, 16 * KIB)
    first = chunks[0]
    assert [p.entry for p in first.pieces] == [0, 1, 2]
    head = first.pieces[2]
    assert head.buf == 8192 and head.length == 8192 and head.seq == 0
    assert chunks[1].offset == first.offset + 16 * KIB  # the rest continues right after
    assert chunks[1].pieces[0].src == 8192 and chunks[1].pieces[0].seq == 1
    check_invariants(spans, chunks, 16 * KIB)


def test_exact_fit_and_chunk_size_equal_to_entry():
    spans = layout([16 * KIB, 16 * KIB, 1])
    chunks = plan(spans, 16 * KIB)
    assert [len(c.pieces) for c in chunks] == [1, 1, 1]
    assert chunks[2].read_length == 4096
    check_invariants(spans, chunks, 16 * KIB)


def test_gap_larger_than_max_gap_splits():
    spans = [(4096, 10), (4096 * 100, 10)]  # a 396 KiB hole (e.g. entries loaded elsewhere)
    assert len(plan(spans, 4 * MIB, max_gap=256 * KIB)) == 2
    assert len(plan(spans, 4 * MIB, max_gap=1 * MIB)) == 1
    # the dump plans with max_gap < one block: only padding is bridged
    assert len(plan(layout([10, 10]), 4 * MIB, max_gap=4095)) == 1
    assert len(plan([(4096, 10), (12288, 10)], 4 * MIB, max_gap=4095)) == 2


def test_unsorted_input_and_empty_entries():
    spans = [(12288, 50), (4096, 0), (4096, 4000), (8192, 0)]
    chunks = plan(spans, 64 * KIB)
    assert [p.entry for c in chunks for p in c.pieces] == [2, 0]
    assert piece_counts(chunks, len(spans)) == [1, 0, 1, 0]
    assert plan([(4096, 0)], 4096) == [] and plan([], 4096) == []


def test_bad_input_raises():
    with pytest.raises(ValueError, match="not 4096-aligned"):
        plan([(4097, 10)], 64 * KIB)
    with pytest.raises(ValueError, match="overlap"):
        plan([(4096, 5000), (8192, 10)], 64 * KIB)
    for bad in (0, 1000, 4096 * 3 + 1):
        with pytest.raises(ValueError, match="multiple of 4096"):
            plan([(4096, 10)], bad)


def test_random_layouts_keep_invariants():
    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 2, 4095, 4096, 4097, rng.randint(1, 200_000),
                             rng.randint(1, 3 * MIB)]) for _ in range(rng.randint(1, 25))]
        spans = layout(sizes, start=rng.choice([4096, 8192, 40960]))
        chunk = rng.choice([4096, 8192, 64 * KIB, 1 * MIB])
        chunks = plan(spans, chunk, max_gap=rng.choice([0, 4095, 256 * KIB]))
        check_invariants(spans, chunks, chunk)


def test_register_windows_cover_every_byte_once():
    entries = [entry("a", 0, 5000), entry("b", 8192, 3 << 20), entry("c", (4 << 20), 100)]
    wins = windows([(e.offset, e.nbytes) for e in entries], 1 << 20)
    got = {}
    for w in wins:
        assert w.offset % (1 << 20) == 0 and w.length <= 1 << 20
        for p in w.pieces:
            assert 0 <= p.buf and p.buf + p.length <= w.length
            got.setdefault(p.entry, []).append((p.src, p.length))
    for i, e in enumerate(entries):
        spans = sorted(got[i])
        assert spans[0][0] == 0 and sum(n for _, n in spans) == e.nbytes
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
