"""The prefetch's reading order on real files (the check it feeds: test_pagecheck.py)."""

from __future__ import annotations


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

