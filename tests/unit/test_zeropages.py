"""zeropages.py on hand-made CRIU images: a restore of the rewritten images must see the same
memory as one of the originals, with the zero pages of private anonymous areas gone from them."""

import os

import pytest

from fvboot import zeropages
from fvboot.criu import PE_LAZY, PE_PRESENT, encode_fields, image_entries, proto_fields, read_pagemap

PAGE = zeropages.PAGE
ANON = zeropages.VMA_AREA_REGULAR | zeropages.VMA_ANON_PRIVATE
HEAP = ANON | (1 << 5)
FILE_PRIVATE = zeropages.VMA_AREA_REGULAR | (1 << 6)
VDSO = zeropages.VMA_AREA_REGULAR | zeropages.VMA_ANON_PRIVATE | (1 << 3)
MAGIC = b"\x54\x56\x01\x00\x12\x34\x56\x78"
BASE = 0x7F0000000000


def _ld(number: int, msg: bytes) -> bytes:
    out = bytearray()
    for v in ((number << 3) | 2, len(msg)):
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out) + msg


def _image(path, entries):
    with open(path, "wb") as f:
        f.write(MAGIC)
        for msg in entries:
            f.write(len(msg).to_bytes(4, "little") + msg)


def _page(byte: int) -> bytes:
    return bytes([byte]) * PAGE


def make_images(tmp_path, pid, vmas, runs, extra_entries=(), flags=PE_PRESENT | PE_LAZY):
    """VMAS: (start page, end page, status); RUNS: (start page, [page bytes]) present entries,
    with FLAGS (CRIU's own dumps mark private anonymous pages lazy as well)."""
    mm = b"".join(_ld(14, encode_fields([(1, BASE + s * PAGE), (2, BASE + e * PAGE), (5, 3), (7, st)]))
                  for s, e, st in vmas)
    _image(tmp_path / f"mm-{pid}.img", [encode_fields([(1, 0)]) + mm])
    entries = [encode_fields([(1, BASE + s * PAGE), (2, 0), (4, flags), (5, len(pages))]) for s, pages in runs]
    _image(tmp_path / f"pagemap-{pid}.img", [encode_fields([(1, pid)]), *entries, *extra_entries])
    (tmp_path / f"pages-{pid}.img").write_bytes(b"".join(p for _, pages in runs for p in pages))
    return tmp_path


def memory(images, pid, vmas):
    """What a restore puts at each page of the VMAS: the image's page, else zeros (anonymous)."""
    pm = read_pagemap(images / f"pagemap-{pid}.img")
    data = (images / f"pages-{pm.pages_id}.img").read_bytes()
    have, off = {}, 0
    for vaddr, n in pm.runs:
        for k in range(n):
            have[vaddr + k * PAGE] = data[off:off + PAGE]
            off += PAGE
    assert off == len(data)
    return {BASE + p * PAGE: have.get(BASE + p * PAGE, "file" if st & (1 << 6) else bytes(PAGE))
            for s, e, st in vmas for p in range(s, e)}


@pytest.mark.parametrize("flags", [PE_PRESENT | PE_LAZY, PE_PRESENT])
def test_zero_pages_of_anonymous_memory_leave_the_images_and_restore_as_zeros(tmp_path, flags):
    vmas = [(0, 8, ANON), (8, 12, HEAP)]
    runs = [(0, [_page(1), _page(0), _page(0), _page(2), _page(0)]), (8, [_page(0), _page(3)])]
    images = make_images(tmp_path, 7, vmas, runs, flags=flags)
    before = memory(images, 7, vmas)
    [d] = [zeropages.drop_from_process(images, 7)]
    assert (d.pages, d.nbytes) == (4, 4 * PAGE)
    assert memory(images, 7, vmas) == before
    assert read_pagemap(images / "pagemap-7.img").runs == (
        (BASE, 1), (BASE + 3 * PAGE, 1), (BASE + 9 * PAGE, 1))
    assert (images / "pages-7.img").stat().st_size == 3 * PAGE
    assert {dict(proto_fields(m))[4] for m in image_entries(images / "pagemap-7.img")[1:]} == {flags}
    assert not list(images.glob("*.fvtmp"))


def test_zero_pages_of_file_backed_and_special_areas_stay(tmp_path):
    """In a file-backed area a missing page would mean the file's content, not zeros."""
    vmas = [(0, 2, FILE_PRIVATE), (2, 4, ANON), (4, 5, VDSO)]
    runs = [(0, [_page(0), _page(0), _page(0), _page(5), _page(0)])]  # one run across all three
    images = make_images(tmp_path, 3, vmas, runs)
    before = memory(images, 3, vmas)
    d = zeropages.drop_from_process(images, 3)
    assert d.pages == 1  # only the anonymous area's zero page
    assert memory(images, 3, vmas) == before
    assert read_pagemap(images / "pagemap-3.img").runs == ((BASE, 2), (BASE + 3 * PAGE, 2))


def test_a_run_longer_than_one_read_stays_one_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(zeropages, "CHUNK", 2 * PAGE)
    vmas = [(0, 16, ANON)]
    runs = [(0, [_page(i + 1) for i in range(7)] + [_page(0)] * 2 + [_page(9)] * 3)]
    images = make_images(tmp_path, 4, vmas, runs)
    before = memory(images, 4, vmas)
    d = zeropages.drop_from_process(images, 4)
    assert (d.pages, d.entries_before, d.entries_after) == (2, 1, 2)
    assert read_pagemap(images / "pagemap-4.img").runs == ((BASE, 7), (BASE + 9 * PAGE, 3))
    assert memory(images, 4, vmas) == before


def test_an_all_zero_run_vanishes_and_other_entries_are_kept_as_they_were(tmp_path):
    in_parent = encode_fields([(1, BASE + 20 * PAGE), (2, 0), (4, 1), (5, 2)])  # PE_PARENT: no pages here
    vmas = [(0, 4, ANON), (20, 22, ANON)]
    images = make_images(tmp_path, 5, vmas, [(0, [_page(0)] * 4)], extra_entries=[in_parent])
    d = zeropages.drop_from_process(images, 5)
    assert (d.pages, d.entries_after) == (4, 1)
    head, *entries = image_entries(images / "pagemap-5.img")
    assert entries == [in_parent] and dict(proto_fields(head))[1] == 5
    assert (images / "pages-5.img").read_bytes() == b""
    assert (images / "pagemap-5.img").read_bytes()[:8] == MAGIC


@pytest.mark.parametrize("size, says", [(PAGE, "shorter"), (3 * PAGE, "longer")])
def test_images_that_disagree_are_an_error_and_are_left_unchanged(tmp_path, size, says):
    images = make_images(tmp_path, 6, [(0, 4, ANON)], [(0, [_page(0), _page(1)])])
    with open(images / "pages-6.img", "r+b") as f:
        f.truncate(size)
    saved = {p.name: p.read_bytes() for p in images.iterdir()}
    with pytest.raises(zeropages.ZeroPagesError, match=says):
        zeropages.drop_from_process(images, 6)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == saved


def test_images_without_a_droppable_page_are_not_written(tmp_path):
    images = make_images(tmp_path, 2, [(0, 2, ANON), (2, 3, FILE_PRIVATE)], [(0, [_page(1), _page(2), _page(0)])])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.iterdir()}
    assert zeropages.drop_from_process(images, 2).pages == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images.iterdir()} == before


def test_the_whole_tree_is_rewritten(tmp_path):
    """Every process of pstree.img; a zombie (pid 4 here: CRIU dumps no memory for it) is passed over."""
    for pid in (1, 9):
        make_images(tmp_path, pid, [(0, 2, ANON)], [(0, [_page(pid), _page(0)])])
    _image(tmp_path / "pstree.img", [encode_fields([(1, 1), (2, 0)]), encode_fields([(1, 4), (2, 1)]),
                                     encode_fields([(1, 9), (2, 1)])])
    assert [(d.pid, d.pages) for d in zeropages.drop_zero_pages(tmp_path)] == [(1, 1), (9, 1)]
    assert os.path.getsize(tmp_path / "pages-9.img") == PAGE
