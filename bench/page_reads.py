#!/usr/bin/env python3
"""How fast can a restore read memory back? CRIU's restorer preadv()s each process's pages from
the checkpoint (in the page cache) into fresh anonymous memory; this measures that one step on
this machine, three ways: plain 4 KiB faults (stock CRIU), MADV_POPULATE_WRITE first, and
MADV_HUGEPAGE first (criu-patches/0002, CRIU_RESTORE_THP=1). Prints JSON; $OUT gets a copy.

    python3 bench/page_reads.py [--gib 1] [--file /var/tmp/fv-page-reads.bin]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import platform
import time
from pathlib import Path

from harness import record

MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23
HUGE = 2 << 20


def read_into_fresh_memory(fd: int, size: int, advice: int | None) -> float:
    m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = (base + HUGE - 1) & ~(HUGE - 1)  # 2 MiB aligned, as large VMAs' insides are
    view = memoryview(m)[start - base:start - base + size]
    t = time.perf_counter()
    if advice is not None:
        if ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), advice) != 0:
            raise OSError(ctypes.get_errno(), f"madvise({advice}) failed")
    done = 0
    while done < size:
        done += os.preadv(fd, [view[done:]], done)
    took = time.perf_counter() - t
    view.release()
    m.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--file", default="/var/tmp/fv-page-reads.bin")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    size = int(a.gib * (1 << 30)) // HUGE * HUGE
    path = Path(a.file)
    if not path.exists() or path.stat().st_size != size:
        with path.open("wb") as f:
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
    buf = bytearray(1 << 24)
    for off in range(0, size, 1 << 24):  # in the page cache, as a warm restore finds it
        os.preadv(fd, [buf], off)
    modes = {"4k-faults": None, "populate": MADV_POPULATE_WRITE, "thp": MADV_HUGEPAGE}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(a.rounds):
        for name, advice in modes.items():
            runs[name].append(round(size / read_into_fresh_memory(fd, size, advice) / 1e9, 2))
    os.close(fd)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    res = {"what": "preadv from page cache into fresh anonymous memory, GB/s per round",
           "bytes": size, "kernel": platform.release(), "thp_enabled": thp,
           "cpus": os.cpu_count(), "gb_per_s": runs,
           "best": {k: max(v) for k, v in runs.items()}}
    record("page_reads", res)


if __name__ == "__main__":
    main()
