"""Fast ``.fvw`` <-> GPU transfers: threaded reads into a ring of pinned buffers, async copies.

Used by :mod:`fvboot.weightfile` when the tensors live on a CUDA device (the CPU path reads
straight into the tensors and stays there).

Plan (pure Python, :func:`plan`): the entries, sorted by file offset, are packed into chunks of
at most one buffer. Entries start on 4096-byte boundaries and follow each other with less than
4096 bytes of padding, so a chunk is one large read that may hold the tail of one tensor, many
small tensors and the head of the next (the padding between them is read too: cheaper than a
second call). Each chunk lists its pieces: (entry, byte offset in the entry, byte offset in the
buffer, length, and the piece's number within its entry).

Load (:func:`load`), per device:
  * B pinned host buffers of M MiB (``FV_LOAD_BUFFERS``, ``FV_LOAD_BUFFER_MB``), each bound to
    one of S CUDA streams (``FV_LOAD_STREAMS``, round robin) and owning one CUDA event;
  * T reader threads (``FV_LOAD_THREADS``). A thread takes a free buffer from the ring (FIFO),
    waits on that buffer's event (its previous H2D copy is done), *then* takes the next chunk in
    file order, fills the buffer with ``os.preadv`` (O_DIRECT with ``FV_LOAD_ODIRECT=1``, the
    page cache otherwise), queues one ``copy_(non_blocking=True)`` per piece on the buffer's
    stream, records the event and hands the buffer back to the ring. Reads, hashing and DMA of
    different chunks overlap; the GIL is free during preadv, copies and hashing.
  * verify: each entry's checksum is computed over the bytes as they sit in the pinned buffer
    (what is DMA'd to the GPU, so no read-back), while the copy runs. Pieces of one entry are
    hashed strictly in order (a per-entry counter under a condition variable); different
    entries hash in parallel, and big entries use blake3's own threads. No deadlock: a thread
    holds a buffer before it takes a chunk number, so the lowest unfinished chunk always owns a
    buffer and can finish.
  * before: the device is synchronized (anything queued that writes the targets lands first);
    after: every stream is synchronized before the pinned buffers are freed and the cached
    pinned blocks are handed back (``torch._C._host_emptyCache``: a CRIU image would carry
    them otherwise).

Dump (:func:`dump`), the reverse for ``write_weights``: T threads, each with its own pinned
buffer and stream; a thread takes the next chunk, queues D2H copies of its pieces, waits on the
event, zeroes the padding between pieces, hashes the pieces (per-entry order as above) and
``pwrite``s the chunk, then starts its writeback (``sync_file_range``; ``FV_DUMP_WRITEBACK=0``
turns that off) so the caller's fsync overlaps the dump. No ``.cpu()`` temporaries, no pageable
copies. Writer threads: as many as readers (``FV_LOAD_THREADS``, auto by default).

``FV_GPU_LOADER=0`` makes ``weightfile`` use its simple per-chunk path for CUDA tensors too.

Importing this module needs torch but not CUDA; CUDA is touched only when a transfer runs.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from fvboot import weightfile as wf

ALIGN = wf.ALIGN
MAX_GAP = 256 << 10  # padding/holes up to this size are read through rather than split around
BIG_ENTRY = 16 << 20  # entries this large hash with blake3's own thread pool too

DEFAULT_BUFFERS = 16  # measured best on an H100 box (bench/results/gpu_weight_load_h100.json)
DEFAULT_BUFFER_MB = 32
DEFAULT_STREAMS = 4


class GpuLoaderError(wf.WeightFileError):
    """A GPU transfer could not run (no CUDA, bad settings, unusable file system)."""


class _ODirectRefused(GpuLoaderError):
    """The file system opened the file with O_DIRECT but refuses the reads (EINVAL)."""


# --------------------------------------------------------------------------------------------
# settings


def _env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise GpuLoaderError(f"{name}={raw!r}: expected an integer in [{lo}, {hi}]") from None
    if not lo <= v <= hi:
        raise GpuLoaderError(f"{name}={raw!r}: expected an integer in [{lo}, {hi}]")
    return v


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise GpuLoaderError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def auto_threads(buffers: int, cpus: int | None = None) -> int:
    """Reader threads when none are asked for: half the cores (2..8), leaving >= 2 buffers in
    flight to the GPU while every reader holds one."""
    cpus = cpus or os.cpu_count() or 1
    want = min(8, max(2, cpus // 2))
    return max(1, min(want, buffers - 2 if buffers > 3 else buffers - 1 or 1))


@dataclass(frozen=True)
class Config:
    buffers: int = DEFAULT_BUFFERS  # pinned staging buffers in the ring
    buffer_mb: int = DEFAULT_BUFFER_MB  # MiB each (a multiple of 4 KiB, so any whole MiB)
    threads: int = 0  # reader/writer threads; 0 = auto_threads()
    streams: int = DEFAULT_STREAMS  # CUDA streams the copies are spread over
    odirect: bool = False  # O_DIRECT reads (bypass the page cache)
    register: bool = True  # a file all in the page cache goes to the GPU without a CPU copy

    def __post_init__(self) -> None:
        if self.buffers < 1 or self.buffer_mb < 1 or self.threads < 0 or self.streams < 1:
            raise GpuLoaderError(f"bad transfer settings: {self}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        """Settings from ``FV_LOAD_*``; keyword arguments that are not None win."""
        env = os.environ if env is None else env
        vals = dict(buffers=_env_int(env, "FV_LOAD_BUFFERS", DEFAULT_BUFFERS, 1, 256),
                    buffer_mb=_env_int(env, "FV_LOAD_BUFFER_MB", DEFAULT_BUFFER_MB, 1, 4096),
                    threads=_env_int(env, "FV_LOAD_THREADS", 0, 0, 256),
                    streams=_env_int(env, "FV_LOAD_STREAMS", DEFAULT_STREAMS, 1, 64),
                    odirect=_env_bool(env, "FV_LOAD_ODIRECT", False),
                    register=_env_bool(env, "FV_LOAD_REGISTER", True))
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**vals)

    @property
    def buffer_bytes(self) -> int:
        return self.buffer_mb << 20

    def reader_threads(self) -> int:
        """Threads a load uses: never more than buffers (a reader holds one while it reads)."""
        return min(self.threads or auto_threads(self.buffers), self.buffers)


def verify_threads(cpus: int | None = None) -> int:
    """Hashing threads beside the page-cache load: all cores but two (the copy loop and the
    driver need one each), 2..12."""
    cpus = cpus or os.cpu_count() or 1
    return max(2, min(12, cpus - 2))


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """``FV_GPU_LOADER=0`` turns the fast paths off (weightfile's simple loop is used)."""
    return _env_bool(os.environ if env is None else env, "FV_GPU_LOADER", True)


# --------------------------------------------------------------------------------------------
# planning (pure Python: no torch, no CUDA)


@dataclass(frozen=True)
class Piece:
    entry: int  # index into the spans given to plan()
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


def _align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


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
        chunks.append(Chunk(start, length, _align_up(length, align), tuple(pieces)))
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


# --------------------------------------------------------------------------------------------
# stats


@dataclass
class TransferStats:
    direction: str  # "load" or "dump"
    bytes: int  # tensor bytes moved
    io_bytes: int  # bytes read/written on the file (with the padding inside chunks)
    tensors: int
    chunks: int
    seconds: float  # whole call: setup, transfer, synchronize, teardown
    setup_seconds: float  # pinned buffers, streams
    transfer_seconds: float  # first chunk taken to last copy synchronized
    threads: int
    buffers: int
    buffer_mb: int
    streams: int
    odirect: bool
    verified: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = round(self.gb_per_s, 3)
        d["transfer_gb_per_s"] = round(self.bytes / self.transfer_seconds / 1e9, 3) \
            if self.transfer_seconds else 0.0
        for k in ("seconds", "setup_seconds", "transfer_seconds"):
            d[k] = round(d[k], 4)
        return d


# --------------------------------------------------------------------------------------------
# copy engines: CUDA for real, host-only for the unit tests (same pipeline, plain copies)


@dataclass
class _Slot:
    tensor: torch.Tensor  # uint8 staging buffer (pinned on CUDA)
    view: memoryview  # its bytes, for preadv/pwrite/hashing
    stream: Any
    event: Any
    used: bool = False  # an event was recorded on it


class _CudaEngine:
    """Pinned buffers, side streams, events: the real thing."""

    def __init__(self, device: torch.device, streams: int) -> None:
        if not torch.cuda.is_available():
            raise GpuLoaderError("CUDA is not available in this process (torch "
                                 f"{torch.__version__}); the GPU weight loader cannot run")
        self.device = device if device.index is not None else \
            torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self.streams = [torch.cuda.Stream(device=self.device) for _ in range(streams)]
        self.pinned = True

    def thread_init(self) -> None:
        torch.cuda.set_device(self.device)

    def begin(self) -> None:
        torch.cuda.synchronize(self.device)  # writes already queued on any stream land first

    def alloc(self, nbytes: int, stream_no: int) -> _Slot:
        t = _aligned_empty(nbytes, pin=True)
        with torch.cuda.device(self.device):
            ev = torch.cuda.Event()
        return _Slot(t, wf._host_view(t), self.streams[stream_no % len(self.streams)], ev)

    def copies(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: _Slot) -> None:
        with torch.cuda.stream(slot.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

    def record(self, slot: _Slot) -> None:
        slot.event.record(slot.stream)
        slot.used = True

    def wait(self, slot: _Slot) -> None:
        if slot.used:
            slot.event.synchronize()  # releases the GIL

    def finish(self) -> None:
        for s in self.streams:
            s.synchronize()
        torch.cuda.synchronize(self.device)

    def release(self) -> None:
        release_pinned_cache()


def release_pinned_cache() -> None:
    """Hand torch's cached pinned host blocks back: they would stay in the process (and in a
    CRIU image) otherwise."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class _HostEngine:
    """Same pipeline with synchronous host copies: lets the unit tests run it without CUDA."""

    pinned = False

    def __init__(self, device: torch.device | None = None, streams: int = 1) -> None:
        self.device = device or torch.device("cpu")
        self.streams = [None] * streams

    def thread_init(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def alloc(self, nbytes: int, stream_no: int) -> _Slot:
        t = _aligned_empty(nbytes, pin=False)
        return _Slot(t, wf._host_view(t), None, None)

    def copies(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: _Slot) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def record(self, slot: _Slot) -> None:
        slot.used = True

    def wait(self, slot: _Slot) -> None:
        pass

    def finish(self) -> None:
        pass

    def release(self) -> None:
        pass


def _aligned_empty(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of ``nbytes`` whose first byte is ALIGN-aligned (O_DIRECT needs it;
    cudaHostAlloc memory always is, plain CPU allocations may not be)."""
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if t.data_ptr() % ALIGN == 0:
        return t
    del t
    t = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -t.data_ptr() % ALIGN
    return t[skip:skip + nbytes]  # the view keeps the whole block alive


def _engine_for(device: torch.device, cfg: Config, engine: Any):
    if engine is not None:
        return engine
    if device.type != "cuda":
        raise GpuLoaderError(f"the GPU loader moves CUDA tensors, got a {device.type} tensor")
    return _CudaEngine(device, cfg.streams)


# --------------------------------------------------------------------------------------------
# ordered hashing


class _Aborted(Exception):
    """Another worker failed: stop quietly (the first error is re-raised)."""


class _OrderedHashes:
    """One hasher per entry, fed strictly in piece order, entries in parallel."""

    def __init__(self, alg: str, sizes: Sequence[int], abort: threading.Event) -> None:
        self.hashers = [_entry_hasher(alg, n) for n in sizes]
        self.next = [0] * len(sizes)
        self.cond = threading.Condition()
        self.abort = abort

    def update(self, p: Piece, data: memoryview) -> None:
        with self.cond:
            while self.next[p.entry] != p.seq:
                if self.abort.is_set():
                    raise _Aborted()
                self.cond.wait(0.25)
        self.hashers[p.entry].update(data)  # outside the lock: other entries hash meanwhile
        with self.cond:
            self.next[p.entry] += 1
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def digests(self) -> list[str]:
        return [h.hexdigest() for h in self.hashers]


def _entry_hasher(alg: str, nbytes: int):
    b3 = wf._blake3
    if alg == "blake3" and b3 is not None and nbytes >= BIG_ENTRY:
        auto = getattr(b3.blake3, "AUTO", None)
        if auto is not None:
            return b3.blake3(max_threads=auto)  # same digest, several cores on one big tensor
    return wf._hasher(alg)


# --------------------------------------------------------------------------------------------
# the worker pool


def _run_workers(n: int, body: Callable[[], None], abort: threading.Event,
                 on_abort: Callable[[], None]) -> None:
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            body()
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
            with lock:
                errors.append(exc)
            abort.set()
            on_abort()

    threads = [threading.Thread(target=run, name=f"fv-xfer-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def _one_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise GpuLoaderError(f"one transfer moves tensors of one device, got {sorted(map(str, devs))}")
    return devs.pop()


# --------------------------------------------------------------------------------------------
# load


def _pread_full(fd: int, mv: memoryview, offset: int, need: int, odirect: bool, path: str) -> int:
    """Read into ``mv`` from ``offset`` until at least ``need`` bytes are there."""
    got = 0
    while got < need:
        try:
            n = os.preadv(fd, [mv[got:]], offset + got)
        except OSError as exc:
            if odirect and exc.errno == 22:
                raise _ODirectRefused(f"{path}: O_DIRECT read of {len(mv) - got} bytes at "
                                      f"{offset + got} refused ({exc}); set FV_LOAD_ODIRECT=0") from exc
            raise
        if n == 0:
            raise wf.TruncatedFileError(f"{path}: unexpected end of file at byte {offset + got} "
                                        f"(needed {need - got} more bytes from {offset})")
        got += n
        if odirect and got < need and got % ALIGN:
            raise wf.TruncatedFileError(f"{path}: file ends at byte {offset + got}, inside data "
                                        f"that should reach {offset + need}")
    return got


def _open_for_read(path: str, odirect: bool) -> tuple[int, bool, str | None]:
    if odirect:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return os.open(path, os.O_RDONLY), False, "O_DIRECT is not available on this OS"
        try:
            return os.open(path, os.O_RDONLY | flag), True, None
        except OSError as exc:
            if exc.errno != 22:  # EINVAL: the file system does not do O_DIRECT (tmpfs...)
                raise
            return (os.open(path, os.O_RDONLY), False,
                    f"O_DIRECT refused by the file system ({exc.strerror}): read through the page cache")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (AttributeError, OSError):
        pass
    return fd, False, None


def _finish(eng: Any, run: Callable[[], None]) -> None:
    """Run the workers, then always synchronize the copies; the first error wins."""
    err: BaseException | None = None
    try:
        run()
    except BaseException as exc:  # noqa: BLE001
        err = exc
    try:
        eng.finish()  # nothing may still be copying out of/into buffers we are about to free
    except BaseException:
        if err is None:
            raise
    if err is not None:
        raise err


# --------------------------------------------------------------------------------------------
# load straight from the page cache (no CPU copy)

REGISTER_WINDOW = 1 << 30  # measured best of 64 MiB / 256 MiB / 1 GiB (bench/gpu_register_load.py)
_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly
_PROT_READ, _MAP_SHARED = 1, 1
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _RegisterRefused(GpuLoaderError):
    """The driver would not page-lock the mapped file: use the pinned ring."""


_LOW_BIT = bytes(b & 1 for b in range(256))
_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451}.get(os.uname().machine)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


def _cachestat_pages(libc: Any, fd: int, size: int) -> int | None:
    """Pages of the file's first SIZE bytes in the page cache, or None where cachestat(2) is
    missing (kernel < 6.5) or filtered (seccomp)."""
    if _SYS_CACHESTAT is None:
        return None
    rng, st = _CachestatRange(0, size), _Cachestat()
    if libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        return None
    return int(st.nr_cache)


class _FileMapping:
    """A read-only shared mapping of a whole file (libc mmap: Python's mmap object cannot hand
    out the address of a read-only mapping)."""

    def __init__(self, fd: int, size: int) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.fd, self.size = fd, size
        addr = self.libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap of the weight file failed")
        self.addr: int = addr

    def resident(self) -> bool:
        """Is every page of the file in the page cache? cachestat(2) (Linux 6.5+) counts them in
        one call; mincore(2) over the mapping is the fallback (~85 ms for 7 GB on an H100 host)."""
        pages = (self.size + _PAGE - 1) // _PAGE
        counted = _cachestat_pages(self.libc, self.fd, self.size)
        if counted is not None:
            return counted >= pages
        vec = (ctypes.c_ubyte * pages)()
        if self.libc.mincore(self.addr, self.size, vec) != 0:
            return False
        # bit 0 of each byte: that page is resident (the other bits are reserved)
        return bytes(vec).translate(_LOW_BIT).count(0) == 0

    def close(self) -> None:
        self.libc.munmap(self.addr, self.size)


def _clear_last_cuda_error() -> None:
    """cudaGetLastError() on this thread. A failed runtime call stays this thread's "last error"
    until read, and torch reads it after its kernel launches (C10_CUDA_KERNEL_LAUNCH_CHECK): a
    refused registration must not surface later as the error of some unrelated kernel. torch's
    cudart binding has no cudaGetLastError, so it is called in the libcudart torch loaded."""
    fn = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if fn is None:
        try:
            with open("/proc/self/maps") as maps:
                path = next((line.split()[-1] for line in maps if "libcudart.so" in line), None)
            fn = ctypes.CDLL(path).cudaGetLastError if path else None
        except (OSError, AttributeError):
            fn = None
    if fn is not None:
        fn()


def _windows(entries: Sequence[wf.WeightEntry], window: int) -> list[tuple[int, int, list]]:
    """(file offset, length, pieces) per window; a piece is (entry index, offset in the entry,
    offset in the window, length). Windows are page aligned, entries may straddle them."""
    if not entries:
        return []
    end = max(e.offset + e.nbytes for e in entries)
    out = []
    for woff in range(0, end, window):
        wend = min(woff + window, end)
        pieces = []
        for i, e in enumerate(entries):
            a, b = max(e.offset, woff), min(e.offset + e.nbytes, wend)
            if a < b:
                pieces.append((i, a - e.offset, a - woff, b - a))
        if pieces:
            out.append((woff, wend - woff, pieces))
    return out


def _load_registered(entries: Sequence[wf.WeightEntry], tensors: Sequence[torch.Tensor],
                     mapping: _FileMapping, device: torch.device, streams: int = 2,
                     window: int = REGISTER_WINDOW) -> tuple[float, int]:
    """Page-lock each window of the mapped file in place (cudaHostRegister, read-only) and let
    the GPU copy the tensors out of it; registering window i+1 overlaps the copies of window i.
    Returns (transfer seconds, windows)."""
    cudart = torch.cuda.cudart()
    flats = [_flat(t) for t in tensors]
    plan_ = _windows(entries, window)
    with torch.cuda.device(device):
        ss = [torch.cuda.Stream(device=device) for _ in range(streams)]
    torch.cuda.synchronize(device)
    inflight: list[tuple[int, Any, torch.Tensor]] = []
    t0 = time.perf_counter()
    try:
        for k, (woff, wlen, pieces) in enumerate(plan_):
            span = min(-(-wlen // _PAGE) * _PAGE, -(-mapping.size // _PAGE) * _PAGE - woff)
            err = int(cudart.cudaHostRegister(mapping.addr + woff, span, _HOST_REGISTER_READ_ONLY))
            if err != 0:
                _clear_last_cuda_error()  # else torch's next launch check reports this error
                raise _RegisterRefused(f"cudaHostRegister of the mapped weight file failed (error {err})")
            host = torch.frombuffer((ctypes.c_ubyte * span).from_address(mapping.addr + woff),
                                    dtype=torch.uint8)
            inflight.append((mapping.addr + woff, None, host))
            s = ss[k % streams]
            with torch.cuda.stream(s):
                for i, eoff, hoff, n in pieces:
                    flats[i][eoff:eoff + n].copy_(host[hoff:hoff + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
            inflight[-1] = (mapping.addr + woff, ev, host)
            while len(inflight) > streams:
                addr, ev, _ = inflight.pop(0)
                ev.synchronize()
                cudart.cudaHostUnregister(addr)
    finally:
        torch.cuda.synchronize(device)  # no copy may still read what we unregister and unmap
        for addr, _, _ in inflight:
            cudart.cudaHostUnregister(addr)
    return time.perf_counter() - t0, len(plan_)


def load(path: str | os.PathLike, entries: Sequence[wf.WeightEntry],
         tensors: Sequence[torch.Tensor], checksum: str | None = None,
         config: Config | None = None, engine: Any = None) -> TransferStats:
    """Fill ``tensors`` (contiguous, one CUDA device, already checked against ``entries``) from
    the file; with ``checksum`` (the index's algorithm) verify every entry on the way.

    When the whole file is in the page cache, the GPU copies straight out of the page cache
    (``_load_registered``: no CPU copy, ~21 GB/s against ~12 for the pinned ring on an H100;
    ``FV_LOAD_REGISTER=0`` turns it off) while CPU threads check the same pages against the
    index (``_verify_mapped``). Otherwise, and if the driver refuses, the pinned ring reads the
    file and hashes what it puts in its buffers.

    With O_DIRECT asked for, a file system that refuses it (at open or at the first reads)
    gets the page-cache path instead, and the stats' notes say so."""
    cfg = config or Config.from_env()
    if engine is None and not cfg.odirect and cfg.register and entries:
        st = _try_registered(path, entries, tensors, checksum, cfg.threads or verify_threads())
        if st is not None:
            return st
    try:
        return _load(path, entries, tensors, checksum, cfg, engine)
    except _ODirectRefused as exc:
        if not cfg.odirect:
            raise
        st = _load(path, entries, tensors, checksum, replace(cfg, odirect=False), engine)
        st.notes.append(f"O_DIRECT reads refused, fell back to the page cache: {exc}")
        return st


def _try_registered(path: str | os.PathLike, entries: Sequence[wf.WeightEntry],
                    tensors: Sequence[torch.Tensor], checksum: str | None = None,
                    threads: int = 4) -> TransferStats | None:
    """The page-cache path, or None when the file is not all in the page cache (the ring
    then reads it: faster from disk) or the driver refuses to register it. With CHECKSUM,
    THREADS hash the mapped entries while the GPU copies them; a mismatch raises."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    device = _one_device(tensors)
    if device.type != "cuda":
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mapping = _FileMapping(fd, size)
        try:
            if not mapping.resident():
                return None
            t1 = time.perf_counter()
            with _MappedVerifier(mapping, entries, checksum, path, threads) as verifier:
                took, windows = _load_registered(entries, tensors, mapping, device)
                verifier.result()  # before the mapping goes: raises on a mismatch
        except _RegisterRefused:
            return None
        finally:
            mapping.close()
    finally:
        os.close(fd)
    nbytes = sum(e.nbytes for e in entries)
    notes = ["page cache registered in place (cudaHostRegister, read-only windows)"]
    if checksum:
        notes.append(f"{checksum} of every entry checked from the page cache in {verifier.seconds:.3f} s")
    return TransferStats("load", nbytes, nbytes, len(entries), windows, time.perf_counter() - t0,
                         t1 - t0, took, 0, 0, REGISTER_WINDOW >> 20, 2, False, checksum is not None,
                         notes)


class _MappedVerifier:
    """Checks every entry of a mapped weight file against its recorded checksum in background
    threads (the hashes release the GIL), so verification overlaps the GPU copies of the same
    pages instead of adding a pass. Largest entries first: they bound the wall time. On exit
    it always waits for its threads: the mapping must outlive them."""

    def __init__(self, mapping: "_FileMapping", entries: Sequence[wf.WeightEntry],
                 alg: str | None, path: str, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._pool = ThreadPoolExecutor(max(1, threads)) if alg else None
        self._jobs = [self._pool.submit(_verify_mapped, mapping, e, alg, path)
                      for e in sorted(entries, key=lambda e: -e.nbytes)] if self._pool else []

    def result(self) -> None:
        for job in self._jobs:
            job.result()
        self.seconds = time.perf_counter() - self._t0

    def __enter__(self) -> "_MappedVerifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            for job in self._jobs:
                job.cancel()
            self._pool.shutdown(wait=True)


def _verify_mapped(mapping: "_FileMapping", e: wf.WeightEntry, alg: str, path: str) -> None:
    h = _entry_hasher(alg, e.nbytes)
    if e.nbytes:
        h.update(memoryview((ctypes.c_char * e.nbytes).from_address(mapping.addr + e.offset)).cast("B"))
    if h.hexdigest() != e.checksum:
        raise wf.ChecksumMismatchError(f"{path}: {e.key} ({e.nbytes} bytes at offset {e.offset}): "
                                       f"{alg} {h.hexdigest()} != recorded {e.checksum}")


def _load(path: str | os.PathLike, entries: Sequence[wf.WeightEntry],
          tensors: Sequence[torch.Tensor], checksum: str | None, cfg: Config,
          engine: Any) -> TransferStats:
    t0 = time.perf_counter()
    path = os.fspath(path)
    if len(entries) != len(tensors):
        raise GpuLoaderError(f"{len(entries)} entries but {len(tensors)} tensors")
    for e, t in zip(entries, tensors):
        if t.numel() * t.element_size() != e.nbytes or not t.is_contiguous():
            raise GpuLoaderError(f"{e.key}: target does not hold exactly {e.nbytes} contiguous bytes")
    chunks = plan([(e.offset, e.nbytes) for e in entries], cfg.buffer_bytes)
    abort = threading.Event()
    hashes = _OrderedHashes(checksum, [e.nbytes for e in entries], abort) if checksum else None
    n_threads = n_buffers = n_streams = 0
    odirect, notes = False, []
    t_xfer0 = t_xfer1 = time.perf_counter()
    io_bytes = [0]
    if chunks:  # else every entry is empty: nothing to move (their digests are checked below)
        device = _one_device(tensors)
        n_threads = max(1, min(cfg.reader_threads(), len(chunks)))
        n_buffers = max(n_threads, min(cfg.buffers, len(chunks)))
        flats = [_flat(t) for t in tensors]
        eng = _engine_for(device, cfg, engine)
        n_streams = len(eng.streams)
        fd, odirect, note = _open_for_read(path, cfg.odirect)
        if note:
            notes.append(note)
        ring: queue.Queue[_Slot] = queue.Queue()
        made = [0]  # buffers are pinned lazily, by the readers: reading starts after the first
        try:
            eng.begin()
            taken = [0]
            lock = threading.Lock()

            def acquire() -> _Slot:
                try:
                    return ring.get_nowait()
                except queue.Empty:
                    pass
                with lock:
                    k = made[0] if made[0] < n_buffers else -1
                    made[0] += k >= 0
                if k < 0:
                    return ring.get()
                try:
                    return eng.alloc(cfg.buffer_bytes, k)
                except BaseException:
                    with lock:
                        made[0] -= 1
                    raise

            def reader() -> None:
                eng.thread_init()
                while not abort.is_set():
                    slot = acquire()
                    try:
                        eng.wait(slot)  # its last H2D copy is done: the buffer may be refilled
                        with lock:  # chunk numbers only go to threads that hold a buffer
                            i = taken[0]
                            taken[0] += 1
                        if i >= len(chunks):
                            return
                        c = chunks[i]
                        n = c.read_length if odirect else c.length
                        got = _pread_full(fd, slot.view[:n], c.offset, c.length, odirect, path)
                        with lock:
                            io_bytes[0] += got
                        eng.copies([(flats[p.entry][p.src:p.src + p.length],
                                     slot.tensor[p.buf:p.buf + p.length]) for p in c.pieces], slot)
                        eng.record(slot)
                        if hashes is not None:  # the bytes being DMA'd, while they are
                            for p in c.pieces:
                                hashes.update(p, slot.view[p.buf:p.buf + p.length])
                    finally:
                        ring.put(slot)

            t_xfer0 = time.perf_counter()
            _finish(eng, lambda: _run_workers(n_threads, reader, abort,
                                              hashes.wake if hashes else (lambda: None)))
            t_xfer1 = time.perf_counter()
        finally:
            os.close(fd)
            n_buffers = made[0]  # how many the readers really pinned
            while not ring.empty():  # drop the last references to the pinned buffers
                ring.get_nowait()
            eng.release()

    if hashes is not None:
        for e, got in zip(entries, hashes.digests()):
            if got != e.checksum:
                raise wf.ChecksumMismatchError(
                    f"{path}: {e.key} ({e.nbytes} bytes at offset {e.offset}): "
                    f"{checksum} {got} != recorded {e.checksum}")
    return TransferStats("load", sum(e.nbytes for e in entries), io_bytes[0], len(entries),
                         len(chunks), time.perf_counter() - t0, t_xfer0 - t0, t_xfer1 - t_xfer0,
                         n_threads, n_buffers, cfg.buffer_mb, n_streams, odirect,
                         hashes is not None, notes)


# --------------------------------------------------------------------------------------------
# dump


def _pwrite_full(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = False  # resolved on first use; None where libc lacks it


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these dirty pages now (``sync_file_range(WRITE)``), so
    the caller's final fsync finds most of the file on disk already: the disk works while
    the rest is still being copied and hashed. Best effort; errors are ignored."""
    global _sync_file_range
    if _sync_file_range is False:
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (AttributeError, OSError):
            _sync_file_range = None
    if _sync_file_range is not None and os.environ.get("FV_DUMP_WRITEBACK", "1") != "0":
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def dump(fd: int, spans: Sequence[tuple[int, int]], tensors: Sequence[torch.Tensor],
         checksum: str, config: Config | None = None,
         engine: Any = None) -> tuple[list[str], TransferStats]:
    """Write contiguous same-device tensors to ``fd`` at the given (offset, nbytes) spans.

    Returns each tensor's checksum (``checksum`` algorithm) and the stats. The padding between
    spans that share a chunk is written as zeros; padding at the end is left to the caller
    (``write_weights`` truncates the file to its full size).
    """
    t0 = time.perf_counter()
    cfg = config or Config.from_env()
    if len(spans) != len(tensors):
        raise GpuLoaderError(f"{len(spans)} spans but {len(tensors)} tensors")
    for (off, n), t in zip(spans, tensors):
        if t.numel() * t.element_size() != n or not t.is_contiguous():
            raise GpuLoaderError(f"tensor for span at {off} does not hold exactly {n} contiguous bytes")
    chunks = plan(spans, cfg.buffer_bytes, max_gap=ALIGN - 1)  # only padding: see write_weights
    abort = threading.Event()
    hashes = _OrderedHashes(checksum, [n for _, n in spans], abort)
    n_threads = n_streams = 0
    t_xfer0 = t_xfer1 = time.perf_counter()
    if chunks:
        device = _one_device(tensors)
        n_threads = max(1, min(cfg.reader_threads(), len(chunks)))
        flats = [_flat(t) for t in tensors]
        eng = _engine_for(device, cfg, engine)
        n_streams = len(eng.streams)
        free: queue.Queue[_Slot] = queue.Queue()
        try:
            eng.begin()  # kernels still writing the weights finish before we copy them out
            taken = [0]
            lock = threading.Lock()
            numbers: queue.Queue[int] = queue.Queue()
            for i in range(n_threads):
                numbers.put(i)

            def writer() -> None:
                eng.thread_init()
                slot = eng.alloc(cfg.buffer_bytes, numbers.get())  # its own buffer, pinned here
                try:
                    base = slot.tensor.data_ptr()
                    while not abort.is_set():
                        with lock:
                            i = taken[0]
                            taken[0] += 1
                        if i >= len(chunks):
                            return
                        c = chunks[i]
                        eng.copies([(slot.tensor[p.buf:p.buf + p.length],
                                     flats[p.entry][p.src:p.src + p.length]) for p in c.pieces],
                                   slot)
                        eng.record(slot)
                        eng.wait(slot)
                        for a, b in c.gaps():
                            ctypes.memset(base + a, 0, b - a)
                        for p in c.pieces:
                            hashes.update(p, slot.view[p.buf:p.buf + p.length])
                        _pwrite_full(fd, slot.view[:c.length], c.offset)
                        _start_writeback(fd, c.offset, c.length)
                finally:
                    free.put(slot)

            t_xfer0 = time.perf_counter()
            _finish(eng, lambda: _run_workers(n_threads, writer, abort, hashes.wake))
            t_xfer1 = time.perf_counter()
        finally:
            while not free.empty():
                free.get_nowait()
            eng.release()
    stats = TransferStats("dump", sum(n for _, n in spans), sum(c.length for c in chunks),
                          len(spans), len(chunks), time.perf_counter() - t0, t_xfer0 - t0,
                          t_xfer1 - t_xfer0, n_threads, n_threads, cfg.buffer_mb, n_streams,
                          False)
    return hashes.digests(), stats
