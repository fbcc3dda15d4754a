"""N threads running one body, the first error re-raised in the caller's thread. Torch-free: the
weight loader's and dumper's pipelines use it, and so does the weight stager, which must start
within milliseconds."""

from __future__ import annotations

import threading
from typing import Callable


class Aborted(Exception):
    """Another worker failed: stop quietly (the first error is re-raised)."""


def run_workers(n: int, body: Callable[[], None], abort: threading.Event,
                on_abort: Callable[[], None]) -> None:
    """Run BODY in N threads and wait for them all. A worker's error sets ABORT (the others
    should stop at their next look) and calls ON_ABORT (to wake any of them waiting); the first
    error is re-raised here."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            body()
        except Aborted:
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
