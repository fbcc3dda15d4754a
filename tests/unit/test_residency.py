"""Unit tests for fvboot.residency: is a file in the page cache (cachestat, else mincore over a
mapping)? The restore's prefetch and the GPU weight loader both ask it; the e2e suite asks it of
an image layer (overlayfs) too."""

from __future__ import annotations

import os

import pytest

from fvboot import residency

MIB = 1 << 20


def test_file_mapping_residency(tmp_path):
    """A file never read is not resident (its pages are holes, nothing cached); once read, it is."""
    path = tmp_path / "w.bin"
    with path.open("wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = residency.FileMapping(fd, 1 << 20)
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
        m = residency.FileMapping(fd, 3 * MIB + 1)
        try:
            assert m.missing_pages() == m.pages == 3 * MIB // residency.PAGE + 1
        finally:
            m.close()
    finally:
        os.close(fd)


def test_residency_without_cachestat_uses_mincore(tmp_path, monkeypatch):
    monkeypatch.setattr(residency, "cachestat_pages", lambda *a: None)
    test_file_mapping_residency(tmp_path)


def test_a_cachestat_that_sees_nothing_is_checked_with_mincore(tmp_path, monkeypatch):
    """cachestat of an overlayfs file (a container's image layer) counts 0 cached pages whatever
    is cached; mincore over the mapping decides then (the e2e test runs the real overlayfs)."""
    monkeypatch.setattr(residency, "cachestat_pages", lambda *a: 0)
    test_file_mapping_residency(tmp_path)


@pytest.mark.parametrize("size", [5 * MIB + 4096 + 1, 3 * MIB])
def test_mincore_in_spans_sees_the_end_missing(tmp_path, size):
    """The threaded mincore checks every span, the last (short) one included. (The last MiB is
    dropped, not one page: the page cache may hold the file in folios larger than a page.)"""
    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        m = residency.FileMapping(fd, size)
        try:
            assert m.mincore_missing(span=MIB) == 0
            os.fsync(fd)  # written pages are dirty until then, and a dirty page is not dropped
            start = (size - MIB) // 4096 * 4096
            os.posix_fadvise(fd, start, size - start, os.POSIX_FADV_DONTNEED)
            assert m.mincore_missing(span=MIB) > 0
        finally:
            m.close()
    finally:
        os.close(fd)


def test_missing_pages_of_a_path(tmp_path):
    """The prefetch's question, by path: an empty file is all cached, a sparse one is not, a
    read one is; a file that is not there is an OSError (the prefetch then reads as before)."""
    empty, sparse = tmp_path / "empty", tmp_path / "sparse"
    empty.write_bytes(b"")
    with sparse.open("wb") as f:
        f.truncate(2 * MIB)
    assert residency.missing_pages(empty) == 0
    assert residency.missing_pages(sparse) == 2 * MIB // residency.PAGE
    sparse.read_bytes()
    assert residency.missing_pages(sparse) == 0
    with pytest.raises(OSError):
        residency.missing_pages(tmp_path / "nothing")
