"""What both directions of the pinned-buffer pipeline share (``ring`` loads, ``dump`` writes):
the copy engines, the per-entry ordered hashing, and the worker pool.

Copy engines: :class:`CudaEngine` is the real thing (pinned host buffers, side streams,
events); :class:`HostEngine` runs the same pipeline with plain host copies, so the unit tests
(and a CPU-only benchmark) exercise it without CUDA. :func:`engine_for` picks one; tests swap
it by assigning ``pipeline.engine_for``.

Ordered hashing: each entry's checksum is computed over the bytes as they sit in a buffer.
Pieces of one entry are hashed strictly in order (a per-entry counter under a condition
variable); different entries hash in parallel, and big entries use blake3's own threads.

Importing this module needs torch but not CUDA; CUDA is touched only when a transfer runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..worker_threads import Aborted
from .fileformat import ALIGN, entry_hasher, host_view
from .plan import Piece
from .settings import Config, GpuLoaderError


@dataclass
class Slot:
    tensor: torch.Tensor  # uint8 staging buffer (pinned on CUDA)
    view: memoryview  # its bytes, for preadv/pwrite/hashing
    stream: Any
    event: Any
    used: bool = False  # an event was recorded on it


class CudaEngine:
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

    def alloc(self, nbytes: int, stream_no: int) -> Slot:
        t = aligned_empty(nbytes, pin=True)
        with torch.cuda.device(self.device):
            ev = torch.cuda.Event()
        return Slot(t, host_view(t), self.streams[stream_no % len(self.streams)], ev)

    def copies(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: Slot) -> None:
        with torch.cuda.stream(slot.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

    def record(self, slot: Slot) -> None:
        slot.event.record(slot.stream)
        slot.used = True

    def wait(self, slot: Slot) -> None:
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


class HostEngine:
    """Same pipeline with synchronous host copies: lets the unit tests run it without CUDA."""

    pinned = False

    def __init__(self, device: torch.device | None = None, streams: int = 1) -> None:
        self.device = device or torch.device("cpu")
        self.streams = [None] * streams

    def thread_init(self) -> None:
        pass

    def begin(self) -> None:
        pass

    def alloc(self, nbytes: int, stream_no: int) -> Slot:
        t = aligned_empty(nbytes, pin=False)
        return Slot(t, host_view(t), None, None)

    def copies(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: Slot) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def record(self, slot: Slot) -> None:
        slot.used = True

    def wait(self, slot: Slot) -> None:
        pass

    def finish(self) -> None:
        pass

    def release(self) -> None:
        pass


def aligned_empty(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host tensor of ``nbytes`` whose first byte is ALIGN-aligned (O_DIRECT needs it;
    cudaHostAlloc memory always is, plain CPU allocations may not be)."""
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if t.data_ptr() % ALIGN == 0:
        return t
    del t
    t = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -t.data_ptr() % ALIGN
    return t[skip:skip + nbytes]  # the view keeps the whole block alive


def engine_for(device: torch.device, cfg: Config, engine: Any):
    if engine is not None:
        return engine
    if device.type != "cuda":
        raise GpuLoaderError(f"the GPU loader moves CUDA tensors, got a {device.type} tensor")
    return CudaEngine(device, cfg.streams)


def one_device(tensors: Sequence[torch.Tensor]) -> torch.device:
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        raise GpuLoaderError(f"one transfer moves tensors of one device, got {sorted(map(str, devs))}")
    return devs.pop()


# --------------------------------------------------------------------------------------------
# ordered hashing


class OrderedHashes:
    """One hasher per entry, fed strictly in piece order, entries in parallel."""

    def __init__(self, alg: str, sizes: Sequence[int], abort: threading.Event) -> None:
        self.hashers = [entry_hasher(alg, n) for n in sizes]
        self.next = [0] * len(sizes)
        self.cond = threading.Condition()
        self.abort = abort

    def update(self, p: Piece, data: memoryview) -> None:
        with self.cond:
            while self.next[p.entry] != p.seq:
                if self.abort.is_set():
                    raise Aborted()
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


# --------------------------------------------------------------------------------------------
# the worker pool


def finish(eng: Any, run: Callable[[], None]) -> None:
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
