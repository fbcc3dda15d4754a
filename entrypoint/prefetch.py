"""Page-cache prefetch for a restore: the checkpoint's memory images, then the weights, read
while CRIU restores so that each is in memory when its reader gets there (what a cold start
waits on is the disk: 11 GB at ~1.3 GB/s for a 3B model on an H100 host)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional, Sequence

from .layout import Layout
from .pagecheck import PageCheck

PREFETCH_CHUNK = 8 << 20
PREFETCH_THREADS = 4
PREFETCH_SMALL = 16 << 20  # CRIU reads these itself, first; queuing them again only delays it


def prefetch(layout: Layout, check: Optional[PageCheck] = None,
             stop: Optional[threading.Event] = None) -> list[subprocess.Popen]:
    """Bring the checkpoint's memory images, then the weights, into the page cache while CRIU
    restores, so each is in memory by the time its reader gets there; hand every piece of a
    memory image read to CHECK, which compares it with the bake's digest.

    FV_PREFETCH=read (default): 4 threads read each file in 8 MiB pieces, the biggest memory
    image first (the engine's: the restore waits on it), then the weights: the disk works at
    full speed in the order the restore needs, and no more than 32 MiB is ever queued ahead of
    CRIU's own reads. FV_PREFETCH=vmtouch: `vmtouch -t` of both folders at once (the way of
    earlier versions). FV_PREFETCH=off: nothing ahead of the readers. With either of the last
    two, the threads still read the memory images for CHECK. Setting STOP ends the reads (a
    normal start after a failed restore must not share the disk with them). Returns the
    processes started."""
    mode = os.environ.get("FV_PREFETCH", "read")
    folders = (layout.images_dir, layout.weights_dir)
    procs: list[subprocess.Popen] = []
    if mode == "vmtouch" and shutil.which("vmtouch"):
        procs = [subprocess.Popen(["vmtouch", "-qt", str(d)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for d in folders]
    work = plan(folders if mode == "read" else (), check)
    if work:
        threading.Thread(target=_read_ahead, args=(work, check, stop), name="fv-prefetch", daemon=True).start()
    return procs


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


def _read_ahead(work: Sequence[tuple[str, int, int]], check: Optional[PageCheck],
                stop: Optional[threading.Event] = None) -> None:
    jobs = iter(work)
    lock = threading.Lock()
    size = max(n for _, _, n in work)

    def reader() -> None:
        buf = bytearray(size)
        fds: dict[str, int] = {}
        try:
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None or (stop is not None and stop.is_set()):
                    return
                path, off, n = job
                try:
                    fd = fds.get(path)
                    if fd is None:
                        fd = fds[path] = os.open(path, os.O_RDONLY)
                    got = os.preadv(fd, [memoryview(buf)[:n]], off)
                except OSError as e:
                    if check:  # for the check an unreadable piece is a failure; for a prefetch only a hint
                        check.unreadable(path, off, e)
                    continue
                if check:
                    check.piece(path, off, memoryview(buf)[:got])
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(PREFETCH_THREADS)]
    for t in threads:
        t.start()
