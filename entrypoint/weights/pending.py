"""A weight check still running after its load returned. The copies are what the engine needs
before it can wake the KV cache and answer the probe; the checksums are what the gate needs
before a client is served. With the check overlapped (``FV_WEIGHT_CHECK=overlap``), the load
returns after the copies and the hashing goes on beside the KV wake and the probe; the restore
asks for the result (:meth:`PendingCheck.result`) before the gate opens, and a mismatch then
ends in the normal start as an inline one does."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from .fileformat import WeightFileError


class PendingCheck:
    """WORK (raises on a mismatch) runs in a thread of its own from now on."""

    def __init__(self, work: Callable[[], None], what: str) -> None:
        self.what = what
        self._t0 = time.perf_counter()
        self.seconds: float | None = None
        pool = ThreadPoolExecutor(1, thread_name_prefix="fv-weight-check")
        self._future = pool.submit(self._run, work)
        pool.shutdown(wait=False)

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        finally:
            self.seconds = time.perf_counter() - self._t0

    def result(self, timeout: float) -> float:
        """Wait at most TIMEOUT seconds; the seconds the check took, or its error (a checksum
        mismatch names the tensor), or WeightFileError when it did not end in time."""
        try:
            self._future.result(timeout)
        except FutureTimeout:
            raise WeightFileError(f"the check of {self.what} did not end within {timeout:g} s") from None
        return self.seconds or 0.0
