"""Where each byte goes: the file's entries cut into pieces of reads (pure Python: no torch,
no CUDA), so the transfer code only follows a plan and the plan can be tested alone.

One idea, two uses. A :class:`Piece` is a run of one entry's bytes inside a buffer; a
:class:`Chunk` is one read or write of the file holding some pieces.
  * :func:`plan` (the pinned ring and the dump): entries sorted by file offset are packed into
    chunks of at most one buffer. Entries start on 4096-byte boundaries and follow each other
    with less than 4096 bytes of padding, so a chunk is one large read that may hold the tail
    of one tensor, many small tensors and the head of the next (the padding between them is
    read too: cheaper than a second call).
  * :func:`windows` (the page-cache path): the file cut at fixed window boundaries, each window
    registered with the driver as a whole; entries may straddle windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .fileformat import ALIGN, align_up

MAX_GAP = 256 << 10  # padding/holes up to this size are read through rather than split around


@dataclass(frozen=True)
class Piece:
    entry: int  # index into the spans given to plan() / windows()
    seq: int  # number of this piece within its entry: hashing order
    src: int  # byte offset within the entry (the tensor)
    buf: int  # byte offset within the chunk's buffer
    length: int


@dataclass(frozen=True)
class Chunk:
    offset: int  # file offset of the buffer's first byte (ALIGN-aligned)
    length: int  # bytes up to the end of the last piece
    read_length: int  # length rounded up to ALIGN (what an O_DIRECT read asks for)
    pieces: tuple[Piece, ...]

    def gaps(self) -> list[tuple[int, int]]:
        """Buffer ranges [a, b) inside [0, length) that belong to no piece (padding)."""
        out, at = [], 0
        for p in self.pieces:
            if p.buf > at:
                out.append((at, p.buf))
            at = max(at, p.buf + p.length)
        return out


def plan(spans: Sequence[tuple[int, int]], chunk_bytes: int, align: int = ALIGN,
         max_gap: int = MAX_GAP) -> list[Chunk]:
    """Pack (file offset, nbytes) spans into reads of at most ``chunk_bytes``, in file order.

    A chunk starts on an ``align`` boundary (an entry's start, or where the previous full chunk
    ended inside a long entry) and grows while the next entry starts within ``max_gap`` bytes of
    the current end and fits at least partly; an entry longer than the room left continues in
    the next chunk(s). Zero-length spans get no pieces. Overlapping or unaligned spans raise
    ValueError (a corrupt index).
    """
    if chunk_bytes < align or chunk_bytes % align:
        raise ValueError(f"chunk size {chunk_bytes} is not a positive multiple of {align}")
    order = sorted((off, n, i) for i, (off, n) in enumerate(spans) if n > 0)
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    start = end = 0

    def close() -> None:
        length = end - start
        chunks.append(Chunk(start, length, align_up(length, align), tuple(pieces)))
        pieces.clear()

    prev_end = -1
    for off, n, i in order:
        if off < 0 or off % align:
            raise ValueError(f"entry {i}: offset {off} is not {align}-aligned")
        if off < prev_end:
            raise ValueError(f"entry {i}: bytes [{off}, {off + n}) overlap the previous entry "
                             f"(which ends at {prev_end})")
        prev_end = off + n
        pos = seq = 0
        while pos < n:
            at = off + pos
            if pieces and (at - end > max_gap or at >= start + chunk_bytes):
                close()
            if not pieces:
                start = at
                if start % align:  # cannot happen: continuations start where a full chunk ended
                    raise AssertionError(f"chunk start {start} not aligned")
            take = min(n - pos, start + chunk_bytes - at)
            pieces.append(Piece(i, seq, pos, at - start, take))
            end = at + take
            pos += take
            seq += 1
    if pieces:
        close()
    return chunks


def piece_counts(chunks: Sequence[Chunk], n_entries: int) -> list[int]:
    counts = [0] * n_entries
    for c in chunks:
        for p in c.pieces:
            counts[p.entry] += 1
    return counts


def windows(spans: Sequence[tuple[int, int]], window: int) -> list[Chunk]:
    """The file from byte 0 to the end of the last span cut into ``window``-byte chunks (the
    last one shorter), each with the pieces of the spans that fall in it; windows holding no
    piece are left out. Windows are page aligned, entries may straddle them."""
    if not spans:
        return []
    end = max(off + n for off, n in spans)
    out, seqs = [], [0] * len(spans)
    for woff in range(0, end, window):
        wend = min(woff + window, end)
        pieces = []
        for i, (off, n) in enumerate(spans):
            a, b = max(off, woff), min(off + n, wend)
            if a < b:
                pieces.append(Piece(i, seqs[i], a - off, a - woff, b - a))
                seqs[i] += 1
        if pieces:
            out.append(Chunk(woff, wend - woff, align_up(wend - woff), tuple(pieces)))
    return out
