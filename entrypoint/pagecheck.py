"""The checkpoint's memory images (CRIU's pages-*.img), checked while the restore reads them.

They are too big to hash before CRIU starts (3.3 GB for a 3B engine on a GPU), and a size check
alone lets a flipped bit be restored into the server, where only the probe might notice. So the
bake records a digest per 8 MiB piece (`piece_sums`), and at restore the prefetch threads, which
read every piece anyway to bring it into the page cache ahead of CRIU, hand each piece to a
`PageCheck`; the gate opens only once every piece matched (`PageCheck.result`). On a warm start
the pieces are hashed in parallel long before CRIU and the weights are done; on a cold one they
are the reads the prefetch makes anyway.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

from . import runenv
from .checksums import UnknownChecksum, digest, fastest_checksum
from .manifest import FileEntry, PieceSums

PIECE = 8 << 20  # the prefetch's read size: each piece it reads is one digest


def piece_sums(path: Path, alg: str = "", piece: int = PIECE) -> PieceSums:
    """The digests of PATH's consecutive PIECE-byte pieces (at bake), by ALG (default: the
    algorithm fastest on this machine, which the restore's machine most likely resembles)."""
    alg = alg or fastest_checksum()
    sums = []
    buf = bytearray(piece)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while True:
            n = 0
            while n < piece:  # a file system may return less than asked before the end (found by review, 2026-12-06)
                got = f.readinto(view[n:])
                if not got:
                    break
                n += got
            if not n:
                break
            sums.append(digest(alg, view[:n]))
            if n < piece:
                break
    return PieceSums(alg, piece, tuple(sums))


class PageCheck:
    """What the restore reads of the memory images, compared piece by piece with the bake's
    digests. Readers call `piece(path, offset, data)` (or `unreadable`) from any thread; the
    restore asks `result(timeout)` before it opens the gate."""

    def __init__(self, home: Path, files: Sequence[FileEntry]) -> None:
        self._expected: dict[str, tuple[FileEntry, PieceSums]] = {
            str(home / f.path): (f, f.pieces) for f in files if f.pieces is not None}
        self._left = sum(len(p.digests) for _, p in self._expected.values())
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.problem: Optional[str] = None
        for path, (f, p) in self._expected.items():
            if len(p.digests) != -(-f.size // p.piece):
                self._fail(f"{f.path}: the manifest has {len(p.digests)} piece digests for {f.size} bytes")
        if self._left == 0:
            self._done.set()

    def paths(self) -> list[str]:
        """The files to read, the largest first."""
        return sorted(self._expected, key=lambda p: -self._expected[p][0].size)

    def piece_size(self, path: str) -> int:
        return self._expected[path][1].piece

    def piece(self, path: str, offset: int, data) -> None:
        """DATA was read at OFFSET of PATH (a whole piece); compare it with the bake's digest."""
        entry = self._expected.get(path)
        if entry is None:
            return
        f, sums = entry
        i = offset // sums.piece
        try:
            got = digest(sums.alg, data)
        except UnknownChecksum as e:
            return self._fail(f"{f.path}: {e}")
        if got != sums.digests[i]:
            end = offset + len(data) - 1
            return self._fail(f"{f.path} is corrupt: bytes {offset}-{end} differ from the bake's ({sums.alg})")
        self._count()

    def unreadable(self, path: str, offset: int, err: BaseException) -> None:
        entry = self._expected.get(path)
        if entry is not None:
            said = getattr(err, "strerror", None) or f"{type(err).__name__}: {err}"
            self._fail(f"{entry[0].path} cannot be read at byte {offset}: {said}")

    def result(self, timeout: float) -> Optional[str]:
        """None once every piece matched; the first problem found; or, after TIMEOUT s, a line
        saying how much was left unchecked."""
        if not self._done.wait(timeout):
            return (f"the memory images were not checked within {timeout:.0f} s "
                    f"({self._left} pieces of {PIECE >> 20} MiB left)")
        return self.problem

    def _count(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left <= 0:
                self._done.set()

    def _fail(self, problem: str) -> None:
        with self._lock:
            if self.problem is None:
                self.problem = problem
        self._done.set()


def check_timeout() -> float:
    """FV_PAGE_CHECK_TIMEOUT_S (default 300): how long the gate waits for the check after the
    probe; reading 4 GB from a slow disk takes well under that."""
    return runenv.seconds("FV_PAGE_CHECK_TIMEOUT_S")

