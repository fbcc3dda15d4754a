"""N threads running one body, the first error re-raised in the caller's thread; one piece of
work left running in a thread whose result is asked for later. Torch-free: the weight loader's
and dumper's pipelines use it, and so does the weight stager, which must start within
milliseconds."""

from __future__ import annotations

import threading
from typing import Any, Callable


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


class InThread:
    """WORK runs in a daemon thread from now on; ``result`` waits for its value or its error."""

    def __init__(self, work: Callable[[], Any], name: str) -> None:
        self.name = name
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(work,), name=name, daemon=True).start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._value = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised by result() in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout: float) -> Any:
        """WORK's value, or its error re-raised; TimeoutError when it has not ended within
        TIMEOUT s (it goes on: a daemon thread cannot be stopped)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.name} did not end within {timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._value
