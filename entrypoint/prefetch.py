"""Page-cache prefetch for a restore: the checkpoint's memory images, then the weights, read
while CRIU restores so that each is in memory when its reader gets there (what a cold start
waits on is the disk: 11 GB at ~1.3 GB/s for a 3B model on an H100 host). A weight dump that
is already all cached (a warm start) is not read again: 7 GB of copies would compete with CRIU
and the CUDA resume for memory bandwidth, and the loader is told it is cached."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional, Protocol, Sequence

from . import runenv
from .layout import Layout
from .pagecheck import PageCheck
from .residency import FileMapping, missing_pages

PREFETCH_CHUNK = 8 << 20
PREFETCH_THREADS = 4
PREFETCH_SMALL = 16 << 20  # CRIU reads these itself, first; queuing them again only delays it


RESIDENCY_WAIT_S = 5.0  # a reader waits this long for the weights' residency before reading them anyway


class Residency(Protocol):
    """Whoever finds out whether the weight files are all cached: WeightsResidency, or the
    weight stager (weight_stager.StagerResidency), which looks anyway."""

    files: set[str]

    def resident(self, timeout: float = 0.0) -> bool: ...


class WeightsResidency:
    """Whether every weight file was in the page cache when the restore began, found in a thread
    of its own (mincore over 7 GB takes ~85 ms) while CRIU runs. The prefetch skips a cached dump
    and the loader does not check it again; until the answer is in, both act as if it were not
    cached (the prefetch waits at most RESIDENCY_WAIT_S)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: set[str] = set()
        self._resident: Optional[bool] = None
        self._done = threading.Event()
        threading.Thread(target=self._find, name="fv-residency", daemon=True).start()

    def _find(self) -> None:
        try:
            files = [p for p in self.folder.rglob("*") if p.is_file()]
            self.files = {str(p) for p in files}
            self._resident = bool(files) and all(missing_pages(p) == 0 for p in files)
        except OSError:
            self._resident = False  # unreadable here: the readers and the loader find out themselves
        finally:
            self._done.set()

    def resident(self, timeout: float = 0.0) -> bool:
        """True once the check found every weight file cached; False if it did not, or has not
        answered within TIMEOUT seconds."""
        self._done.wait(timeout)
        return bool(self._resident)


class Prefetch:
    """What a prefetch started: the vmtouch processes (FV_PREFETCH=vmtouch) and the weights'
    residency."""

    def __init__(self, procs: list[subprocess.Popen], weights: Residency) -> None:
        self.procs, self.weights = procs, weights


def prefetch(layout: Layout, check: Optional[PageCheck] = None,
             stop: Optional[threading.Event] = None, weights: Optional[Residency] = None) -> Prefetch:
    """Bring the checkpoint's memory images, then the weights, into the page cache while CRIU
    restores, so each is in memory by the time its reader gets there; hand every piece of a
    memory image read to CHECK, which compares it with the bake's digest.

    FV_PREFETCH=read (default): 4 threads read each file in 8 MiB pieces, the biggest memory
    image first (the engine's: the restore waits on it), then the weights: the disk works at
    full speed in the order the restore needs, and no more than 32 MiB is ever queued ahead of
    CRIU's own reads. FV_PREFETCH=vmtouch: `vmtouch -t` of both folders at once (the way of
    earlier versions). FV_PREFETCH=off: nothing ahead of the readers. With either of the last
    two, the threads still read the memory images for CHECK. A weight file found all cached
    (WEIGHTS: who finds that out, a WeightsResidency of its own by default) is not read. Setting
    STOP ends the reads (a normal start after a failed restore must not share the disk with them)."""
    mode = runenv.value("FV_PREFETCH")
    folders = (layout.images_dir, layout.weights_dir)
    weights = weights or WeightsResidency(layout.weights_dir)
    procs: list[subprocess.Popen] = []
    if mode == "vmtouch" and shutil.which("vmtouch"):
        procs = [subprocess.Popen(["vmtouch", "-qt", str(d)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for d in folders]
    work = plan(folders if mode == "read" else (), check)
    if work:
        threading.Thread(target=_read_ahead, args=(work, check, stop, weights), name="fv-prefetch",
                         daemon=True).start()
    return Prefetch(procs, weights)


def plan(folders: Sequence[Path], check: Optional[PageCheck] = None) -> list[tuple[str, int, int]]:
    """(path, offset, length) pieces in reading order: folder by folder, the largest file first,
    files under PREFETCH_SMALL left to their readers unless CHECK needs them (then they come
    after the large ones); whatever CHECK needs that no folder holds, last."""
    needed = list(check.paths()) if check else []
    checked = set(needed)
    files: list[str] = []
    for folder in folders:
        try:
            found = [(p.stat().st_size, str(p)) for p in folder.rglob("*") if p.is_file()]
        except OSError:
            continue
        files += [path for size, path in sorted(found, key=lambda f: (-f[0], f[1]))
                  if size >= PREFETCH_SMALL or path in checked]
    files += [path for path in needed if path not in files]
    work: list[tuple[str, int, int]] = []
    for path in files:
        try:
            size = os.stat(path).st_size
        except OSError as e:
            if check:
                check.unreadable(path, 0, e)
            continue
        step = check.piece_size(path) if path in checked else PREFETCH_CHUNK
        work += [(path, off, min(step, size - off)) for off in range(0, size, step)]
    return work


# The readers' nice value. On a machine with few cores their hashing (every memory-image piece,
# checked before the gate opens) competed with CRIU and the engine for the CPU: on the 2-core
# CPU machine `criu restore` took 0.186 s instead of 0.288 with them at 19, the probe 0.126
# instead of 0.109, and the check was still done before the probe (bench/fvboot_ab.py, 8 of 9
# pairs faster; page cache dropped: no slower, 4 of 6). Idle cores run them at once all the same.
READER_NICE = 19


def yield_the_cpu() -> None:
    """This thread at the lowest CPU priority (READER_NICE): Linux gives each thread its own nice
    value. Best effort: where it cannot be set, the thread runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READER_NICE)
    except OSError:
        pass


def _read_ahead(work: Sequence[tuple[str, int, int]], check: Optional[PageCheck],
                stop: Optional[threading.Event] = None, weights: Optional[Residency] = None) -> None:
    jobs = iter(work)
    lock = threading.Lock()
    size = max(n for _, _, n in work)
    checked = set(check.paths()) if check else set()

    def cached(path: str) -> bool:
        """A weight file nobody checks, found all cached: reading it again only costs bandwidth."""
        if weights is None or path in checked:
            return False
        return weights.resident(RESIDENCY_WAIT_S) and path in weights.files

    mappings = _Mappings()

    def reader() -> None:
        yield_the_cpu()
        buf: Optional[bytearray] = None  # made at the first piece to read: a warm start reads none
        fds: dict[str, int] = {}
        try:
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None or (stop is not None and stop.is_set()):
                    return
                path, off, n = job
                if cached(path):
                    continue
                try:
                    if path in checked:  # a piece already cached is checked where it lies
                        m = mappings.get(path)
                        if m is not None and off + n <= m.size and m.missing_in(off, n) == 0:
                            check.piece(path, off, m.view(off, n))
                            m.let_go(off, n)
                            continue
                    fd = fds.get(path)
                    if fd is None:
                        fd = fds[path] = os.open(path, os.O_RDONLY)
                    if buf is None:
                        buf = bytearray(size)
                    got = _read_full(fd, memoryview(buf)[:n], off)
                    if check:
                        check.piece(path, off, memoryview(buf)[:got])
                except Exception as e:  # noqa: BLE001 -- a reader that dies loses its piece: the gate would wait
                    if check:  # for the check an unreadable piece is a failure; for a prefetch only a hint
                        check.unreadable(path, off, e)
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(PREFETCH_THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:  # (in the prefetch's own thread: nothing else waits on this)
            t.join()
    finally:
        mappings.close()


def _read_full(fd: int, view: memoryview, off: int) -> int:
    """Read VIEW's length from OFF, or up to the file's end: a file system may return less
    than asked (a lazily pulled image layer over FUSE), which is not the end of the piece."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], off + got)
        if n == 0:
            break
        got += n
    return got


class _Mappings:
    """Read-only mappings of the checked memory images, one per file, shared by the readers: a
    piece the page cache already holds (a warm start) is hashed from the cache's own pages,
    without the 8 MiB copy a read makes (on a 2-core machine the readers' copies and hashes
    took the CPU CRIU needed). A file that cannot be mapped is read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, Optional[FileMapping]] = {}

    def get(self, path: str) -> Optional[FileMapping]:
        with self._lock:
            if path not in self._maps:
                self._maps[path] = self._open(path)
            return self._maps[path]

    @staticmethod
    def _open(path: str) -> Optional[FileMapping]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size:
                return FileMapping(fd, size)
        except OSError:
            pass
        os.close(fd)
        return None

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                if m is not None:
                    m.close()
                    os.close(m.fd)
            self._maps.clear()
