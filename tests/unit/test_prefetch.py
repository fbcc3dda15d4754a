"""The prefetch's reading order on real files (the check it feeds: test_pagecheck.py)."""

from __future__ import annotations

import pytest


def test_prefetch_reads_the_biggest_memory_image_first_then_the_weights(tmp_path):
    from fvboot import prefetch

    images, weights = tmp_path / "checkpoint" / "images", tmp_path / "weights"
    images.mkdir(parents=True)
    weights.mkdir()
    big = prefetch.PREFETCH_SMALL
    for name, size in (("pages-1.img", big), ("pages-2.img", 3 * big), ("core-1.img", 4096)):
        with (images / name).open("wb") as f:
            f.truncate(size)
    with (weights / "rank0.fvw").open("wb") as f:
        f.truncate(2 * big + 5)
    work = prefetch.plan([images, weights])
    order = list(dict.fromkeys(path.rsplit("/", 1)[1] for path, _, _ in work))
    assert order == ["pages-2.img", "pages-1.img", "rank0.fvw"]  # small images: CRIU reads them
    w = [(off, n) for path, off, n in work if path.endswith("rank0.fvw")]
    assert w[0] == (0, prefetch.PREFETCH_CHUNK) and w[-1][0] + w[-1][1] == 2 * big + 5
    assert all(n <= prefetch.PREFETCH_CHUNK for _, _, n in work)



def test_the_readers_yield_the_cpu_to_criu_and_the_engine(tmp_path):
    """Every reader hashes at the lowest CPU priority (its own thread's nice value), the thread
    that started them keeps its own."""
    import os
    import threading

    from fvboot import prefetch

    images = tmp_path / "images"
    images.mkdir()
    (images / "pages-1.img").write_bytes(b"\1" * prefetch.PREFETCH_SMALL * 2)
    seen = []

    class Check:
        def paths(self):
            return [str(images / "pages-1.img")]

        def piece_size(self, path):
            return prefetch.PREFETCH_SMALL

        def piece(self, path, off, view):
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

        def unreadable(self, path, off, e):
            raise AssertionError(e)

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    prefetch._read_ahead(prefetch.plan([images], Check()), Check(), None, None)
    assert seen == [prefetch.READER_NICE] * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def _dump_folders(tmp_path, cached: bool):
    """An images folder with one big memory image and a weights folder whose dump is cached
    (read once) or not (written, synced and dropped from the page cache)."""
    import os

    from fvboot import prefetch

    images, weights = tmp_path / "checkpoint" / "images", tmp_path / "weights"
    images.mkdir(parents=True)
    weights.mkdir()
    (images / "pages-1.img").write_bytes(b"\1" * prefetch.PREFETCH_SMALL)
    dump = weights / "rank0.fvw"
    dump.write_bytes(os.urandom(prefetch.PREFETCH_SMALL + 4096))
    fd = os.open(dump, os.O_RDONLY)
    try:
        os.fsync(fd)  # a dirty page is not dropped
        if cached:
            while os.read(fd, 1 << 20):
                pass
        else:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return images, weights, dump


def _files_read(monkeypatch, images, weights, residency=None):
    """The files the prefetch's readers read, with the weights' residency found as a restore does
    (or by RESIDENCY)."""
    import os

    from fvboot import prefetch

    read: list[str] = []
    real = os.preadv

    def preadv(fd, bufs, off):
        read.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, bufs, off)

    monkeypatch.setattr(prefetch.os, "preadv", preadv)
    residency = residency or prefetch.WeightsResidency(weights)
    prefetch._read_ahead(prefetch.plan([images, weights]), None, None, residency)
    return set(read), residency


def test_a_cached_weight_dump_is_not_read_again(tmp_path, monkeypatch):
    """A warm start: the dump is all in the page cache, so the prefetch leaves it alone (7 GB of
    copies would compete with CRIU and the CUDA resume) and says so to the loader."""
    images, weights, dump = _dump_folders(tmp_path, cached=True)
    read, residency = _files_read(monkeypatch, images, weights)
    assert read == {str(images / "pages-1.img")}
    assert residency.resident()


def test_a_weight_dump_not_cached_is_read_ahead(tmp_path, monkeypatch):
    """A cold start: the dump is read ahead of the loader, and the loader is not told it is cached."""
    images, weights, dump = _dump_folders(tmp_path, cached=False)
    read, residency = _files_read(monkeypatch, images, weights)
    assert read == {str(images / "pages-1.img"), str(dump)}
    assert not residency.resident()


def test_no_weights_folder_is_not_resident(tmp_path):
    from fvboot import prefetch

    assert not prefetch.WeightsResidency(tmp_path / "absent").resident(timeout=5)



@pytest.mark.parametrize("cached", [True, False])
def test_the_weight_stagers_finding_serves_the_prefetch(tmp_path, monkeypatch, cached):
    """With a stager (GPU images), fvboot does not scan the dump's residency itself: the real
    stager process says what its own mincore found (first thing, whatever follows: here it
    then fails on a file that is no weight dump, or finds no CUDA driver), and the prefetch
    reads the dump or leaves it alone on that word."""
    from fvboot import weight_stager

    images, weights, dump = _dump_folders(tmp_path, cached=cached)
    stager = weight_stager.Stager(str(dump), "GPU-00000000-0000-0000-0000-000000000000")
    try:
        read, residency = _files_read(monkeypatch, images, weights, weight_stager.StagerResidency(stager))
    finally:
        stager.stop()
    assert read == ({str(images / "pages-1.img")} | (set() if cached else {str(dump)}))
    assert residency.resident() is cached and residency.files == {str(dump)}


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def test_cached_memory_images_checked_in_place_do_not_stay_in_fvboots_memory(tmp_path):
    """A piece hashed from the page cache through fvboot's mapping is let go at once: pages read
    through a mapping count in fvboot's resident set, and under a container memory limit the OOM
    killer chose fvboot (0.5 GB of checked images) over the server it supervises, silently."""
    import os

    from fvboot import prefetch

    images = tmp_path / "images"
    images.mkdir()
    piece, pieces = 4 << 20, 32
    path = images / "pages-1.img"
    path.write_bytes(os.urandom(piece) * pieces)  # written: in the page cache
    grown = []
    base = _rss_bytes()

    class Check:
        def paths(self):
            return [str(path)]

        def piece_size(self, _path):
            return piece

        def piece(self, _path, _off, view):
            bytes(view[::4096])  # read every page, as a hash does
            grown.append(_rss_bytes() - base)

        def unreadable(self, _path, _off, e):
            raise AssertionError(e)

    prefetch._read_ahead(prefetch.plan([images], Check()), Check(), None, None)
    assert len(grown) == pieces
    # at most the pieces the readers hold at once; kept, it would reach the whole 128 MiB
    assert max(grown) < (prefetch.PREFETCH_THREADS + 4) * piece, [g >> 20 for g in grown]
