"""Leave the all-zero pages of private anonymous memory out of a CRIU dump's memory images.

CRIU stores every page a process has written, zeros included. In a GPU image most of them are the
device memory a sleeping vLLM keeps allocated (CUDA graph pool, workspaces), which the CUDA
checkpoint holds in host memory: 1.66 GB of zeros in the 3B image's 4.06 GB of pages. A restore
read them from disk, copied them, and the image stored them.

Why a zero page may be left out: CRIU restores a private anonymous area as a fresh anonymous
mapping, which reads as zeros, and in an area a child inherited from its parent it drops
(MADV_DONTNEED) every page the child's pagemap does not list, which again reads as zeros
(criu/mem.c, restore_priv_vma_content). So a page missing from the images comes back as zeros,
exactly what was dumped. Only areas that are private, anonymous and nothing else are touched: in a
file-backed area a missing page means the file's content, and shared, vDSO, AIO-ring, memfd and
plugin areas are restored by other code. Entries whose pages are (also) in a parent image are
kept as they are; CRIU's "may be restored lazily" flag, on nearly every anonymous page, is kept.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

from .criu import PE_PARENT, PE_PRESENT, encode_fields, image_entries, image_magic, proto_fields, tree_pids
from .errors import FvBootError

PAGE = os.sysconf("SC_PAGE_SIZE")  # CRIU's images are in the dumping host's pages: this host's
ZERO = bytes(PAGE)
CHUNK = 64 << 20  # bytes read at a time: a run can be gigabytes

# VmaEntry.status bits (criu/include/image.h)
VMA_AREA_REGULAR = 1 << 0
VMA_ANON_PRIVATE = 1 << 9
# any of these makes an area something other than plain private anonymous memory
OTHER_KINDS = {
    "vsyscall": 1 << 2, "vdso": 1 << 3, "file private": 1 << 6, "file shared": 1 << 7,
    "anon shared": 1 << 8, "sysv ipc": 1 << 10, "socket": 1 << 11, "vvar": 1 << 12,
    "aio ring": 1 << 13, "memfd": 1 << 14, "shadow stack": 1 << 15, "guard": 1 << 16,
    "uprobes": 1 << 17, "plugin": 1 << 27, "unsupported": 1 << 31,
}
OTHER_KINDS_MASK = sum(OTHER_KINDS.values())
# PagemapEntry fields (images/pagemap.proto): vaddr, compat_nr_pages, in_parent, flags, nr_pages
KNOWN_ENTRY_FIELDS = {1, 2, 3, 4, 5}


class ZeroPagesError(FvBootError):
    """The memory images are not what this module understands; they were left unchanged."""


@dataclass(frozen=True)
class Dropped:
    """What one process's images lost: pages (4 KiB) and the pagemap entries before and after."""

    pid: int
    pages: int
    entries_before: int
    entries_after: int

    @property
    def nbytes(self) -> int:
        return self.pages * PAGE


def anon_private_areas(mm_image: Path) -> list[tuple[int, int]]:
    """(start, end) of each area of MM_IMAGE (MmEntry.vmas, field 14) that is private anonymous
    memory and nothing else, sorted."""
    entries = image_entries(mm_image)
    if not entries:
        raise ZeroPagesError(f"{mm_image.name} holds no entry")
    out = []
    for number, value in proto_fields(entries[0]):
        if number != 14:
            continue
        f = dict(proto_fields(value))
        status = f.get(7, 0)
        if status & VMA_AREA_REGULAR and status & VMA_ANON_PRIVATE and not status & OTHER_KINDS_MASK:
            out.append((f[1], f[2]))
    return sorted(out)


def _runs_kept(vaddr: int, data: bytes, areas: list[tuple[int, int]], starts: list[int]):
    """Yield (offset in DATA, length) of each span of DATA (pages from VADDR on) to keep, and
    count the pages dropped; a page is dropped when it is all zeros inside one of AREAS."""
    span_start, dropped = None, 0
    for off in range(0, len(data), PAGE):
        addr = vaddr + off
        i = bisect.bisect_right(starts, addr) - 1
        drop = i >= 0 and addr < areas[i][1] and data[off:off + PAGE] == ZERO
        if drop:
            dropped += 1
            if span_start is not None:
                yield span_start, off - span_start
                span_start = None
        elif span_start is None:
            span_start = off
    if span_start is not None:
        yield span_start, len(data) - span_start
    yield None, dropped


def drop_from_process(images: Path, pid: int) -> Dropped:
    """Rewrite pagemap-PID.img and its pages-N.img without the droppable zero pages. A first
    pass reads the pages and plans (nothing is written if nothing can be dropped, or if the two
    files disagree); the second moves the kept pages down within the same file (each page only
    ever moves to a lower offset), truncates it, and replaces the pagemap."""
    pagemap = images / f"pagemap-{pid}.img"
    head, *entries = image_entries(pagemap) or [b""]
    pages_id = dict(proto_fields(head)).get(1)
    if pages_id is None:
        raise ZeroPagesError(f"{pagemap.name} has no pagemap head")
    pages_path = images / f"pages-{pages_id}.img"
    areas = anon_private_areas(images / f"mm-{pid}.img")
    new_entries, kept, dropped = _plan(pagemap, pages_path, entries, areas)
    if dropped:
        _compact(pages_path, kept)
        tmp = pagemap.with_suffix(".img.fvtmp")
        try:
            with open(tmp, "wb") as out:
                out.write(image_magic(pagemap))
                for msg in (head, *new_entries):
                    out.write(len(msg).to_bytes(4, "little") + msg)
            os.replace(tmp, pagemap)
        finally:
            tmp.unlink(missing_ok=True)
    return Dropped(pid, dropped, len(entries), len(new_entries))


def _plan(pagemap: Path, pages_path: Path, entries: list[bytes],
          areas: list[tuple[int, int]]) -> tuple[list[bytes], list[tuple[int, int]], int]:
    """(the new pagemap entries, the (offset, length) of each byte range of the pages file to
    keep, in order, pages dropped)."""
    starts = [a[0] for a in areas]
    new_entries: list[bytes | list[int]] = []  # an entry kept as it was, or [vaddr, pages, flags]
    kept: list[tuple[int, int]] = []
    dropped = pos = 0
    with open(pages_path, "rb") as src:
        for msg in entries:
            fields = proto_fields(msg)
            f = dict(fields)
            flags = f.get(4, PE_PRESENT)
            if not flags & PE_PRESENT:
                new_entries.append(msg)  # no pages in the file (e.g. in a parent image)
                continue
            size = f.get(5, f.get(2, 0)) * PAGE
            if flags & PE_PARENT or f.get(3) or {n for n, _ in fields} - KNOWN_ENTRY_FIELDS:
                kept.append((pos, size))  # also in a parent image, or unknown: kept whole
                new_entries.append(msg)
                pos += size
                src.seek(pos)
                continue
            vaddr = f.get(1, 0)
            span: list[int] | None = None  # the span of this entry that reaches the end of the last read
            for base in range(0, size, CHUNK):
                want = min(CHUNK, size - base)
                data = src.read(want)
                if len(data) != want:
                    raise ZeroPagesError(f"{pages_path.name} is shorter than {pagemap.name} says")
                carried, span = span, None
                for off, length in _runs_kept(vaddr + base, data, areas, starts):
                    if off is None:
                        dropped += length
                        continue
                    if carried is not None and off == 0:
                        carried[1] += length // PAGE  # it goes on from the previous read
                        current = carried
                    else:
                        current = [vaddr + base + off, length // PAGE, flags]
                        new_entries.append(current)
                    kept.append((pos + base + off, length))
                    if off + length == len(data):
                        span = current
            pos += size
        if src.seek(0, os.SEEK_END) != pos:
            raise ZeroPagesError(f"{pages_path.name} is {'longer' if src.tell() > pos else 'shorter'}"
                                 f" than {pagemap.name} says")
    return [m if isinstance(m, bytes) else _entry(*m) for m in new_entries], kept, dropped


def _compact(pages_path: Path, kept: list[tuple[int, int]]) -> None:
    """Move the KEPT ranges of PAGES_PATH together at its start, in order, and cut off the rest.
    A range never moves up, so nothing is overwritten before it has been read."""
    with open(pages_path, "r+b") as f:
        dst = 0
        for src, length in kept:
            if src != dst:
                for off in range(0, length, CHUNK):
                    f.seek(src + off)
                    data = f.read(min(CHUNK, length - off))
                    f.seek(dst + off)
                    f.write(data)
            dst += length
        f.truncate(dst)


def drop_zero_pages(images: Path) -> list[Dropped]:
    """Leave the droppable zero pages of each process of the checkpointed tree out of IMAGES. A
    process without memory images (a zombie: CRIU keeps only its exit state) is passed over."""
    return [drop_from_process(images, pid) for pid in tree_pids(images)
            if (images / f"pagemap-{pid}.img").exists()]


def _entry(vaddr: int, nr_pages: int, flags: int) -> bytes:
    # as CRIU writes one (page-xfer.c): compat_nr_pages 0, the flags, nr_pages
    return encode_fields([(1, vaddr), (2, 0), (4, flags), (5, nr_pages)])
