"""Is a file in the page cache? Without torch: the restore's prefetch asks it of the weight dump
while CRIU runs (a dump already cached is not read again, and the loader is told so), and the
GPU weight loader's page-cache path (``weights.pagecache``) asks it before page-locking a file.

cachestat(2) (Linux 6.5+) counts a file's cached pages in one call; where it cannot tell
(older kernels, seccomp, and overlayfs, i.e. every container's image layer), mincore(2) over a
read-only mapping of the file decides.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

MINCORE_SPAN = 1 << 30  # bytes per mincore(2) call when residency is checked that way
# bytes of a cached file page-locked (cudaHostRegister) and copied to a GPU at a time, by the
# worker's page-cache load and by the weight stager: the measured best of 64 MiB / 256 MiB /
# 1 GiB (bench/gpu_register_load.py); a window's copy runs while the next one is locked
REGISTER_WINDOW = 1 << 30
_PROT_READ, _MAP_SHARED = 1, 1
_MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_LOW_BIT = bytes(b & 1 for b in range(256))
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


def cachestat_pages(libc: ctypes.CDLL, fd: int, size: int) -> int | None:
    """Pages of the file's first SIZE bytes in the page cache, or None where cachestat(2) is
    missing (kernel < 6.5) or filtered (seccomp)."""
    if _SYS_CACHESTAT is None:
        return None
    rng, st = _CachestatRange(0, size), _Cachestat()
    if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        return None
    return int(st.nr_cache)


class FileMapping:
    """A read-only shared mapping of a whole file (libc mmap: Python's mmap object cannot hand
    out the address of a read-only mapping)."""

    def __init__(self, fd: int, size: int) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.fd, self.size = fd, size
        addr = self.libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        self.addr: int = addr

    @property
    def pages(self) -> int:
        return (self.size + PAGE - 1) // PAGE

    def resident(self) -> bool:
        """Is every page of the file in the page cache?"""
        return self.missing_pages() == 0

    def missing_pages(self) -> int:
        """Pages of the file not in the page cache. cachestat(2) counts the cache of the file it
        is given, and a file of a container's image layer is an overlayfs file, which has none:
        its pages are cached under the layer's own file, so there cachestat says 0 whatever is
        cached (every GPU restore in a container took the slower pinned ring because of it).
        mincore(2) over the mapping sees the pages the mapping reads, overlayfs or not: it
        decides whenever cachestat does not say "all"."""
        counted = cachestat_pages(self.libc, self.fd, self.size)
        if counted is not None and counted >= self.pages:
            return 0
        return self.mincore_missing()

    def mincore_missing(self, span: int = MINCORE_SPAN) -> int:
        """mincore(2) over the mapping, SPAN bytes per call in threads (~85 ms for 7 GB on an
        H200 host; the calls release the GIL). A span mincore refuses counts whole."""
        offsets = range(0, self.size, span)
        if len(offsets) <= 1:
            return self.missing_in(0, self.size) if self.size else 0
        with ThreadPoolExecutor(min(8, len(offsets))) as pool:
            return sum(pool.map(lambda off: self.missing_in(off, min(span, self.size - off)), offsets))

    def missing_in(self, off: int, length: int) -> int:
        """Pages of the LENGTH bytes at OFF not in the page cache, by one mincore(2) call; all
        of them where mincore refuses."""
        start = off - off % PAGE
        n = (off + length - start + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * n)()
        if self.libc.mincore(self.addr + start, off + length - start, vec) != 0:
            return n
        # bit 0 of each byte: that page is resident (the other bits are reserved)
        return bytes(vec).translate(_LOW_BIT).count(0)

    def view(self, off: int, length: int) -> memoryview:
        """The LENGTH bytes at OFF, read in place from the page cache (no copy); valid until
        close()."""
        return memoryview((ctypes.c_char * length).from_address(self.addr + off)).cast("B")

    def let_go(self, off: int, length: int) -> None:
        """Unmap from this process the pages of the LENGTH bytes at OFF that a view read; the page
        cache keeps them. A page read through the mapping counts in the process's resident set
        until then, and the kernel's OOM killer chooses by it: under a container memory limit,
        fvboot holding 0.5 GB of checked memory images was killed before the server it
        supervises, silently. Best effort."""
        start = off - off % PAGE
        self.libc.madvise(self.addr + start, off + length - start, _MADV_DONTNEED)

    def close(self) -> None:
        self.libc.munmap(self.addr, self.size)


def missing_pages(path: str | os.PathLike) -> int:
    """Pages of the file at PATH not in the page cache (0: all cached). OSError if it cannot
    be opened or mapped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        mapping = FileMapping(fd, size)
        try:
            return mapping.missing_pages()
        finally:
            mapping.close()
    finally:
        os.close(fd)
