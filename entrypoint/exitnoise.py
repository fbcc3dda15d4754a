"""What vLLM's libraries print when a stopped server exits, kept out of the container's log.

After `docker stop`, a healthy vLLM still prints pages of warnings on its way out: Triton's
nanobind bindings report hundreds of "leaked" types and functions, multiprocessing's resource
tracker reports "leaked" semaphores and shared memory it is about to clean up, and a restored GPU
server's API process logs an EngineDeadError traceback when its engine goes first. None of it is
a fault an operator can act on, and it buries the lines that matter. Only once fvboot has passed
a stop on (`stopping`) are these lines dropped; fvboot then says in one line how many it dropped.
Everything else, and all of it before a stop, passes unchanged.
"""

from __future__ import annotations

import re
import threading

stopping = threading.Event()  # set when fvboot passes SIGTERM/SIGINT on to the server


def forward_stops(root: int) -> None:
    """From now on SIGTERM/SIGINT go to ROOT, the serving tree's init, which shuts vLLM down
    gracefully (its --shutdown-timeout finishes the requests in flight): set once the server
    serves, the restore's gate open, and by fvboot's supervision. A stop in between, while fvboot
    still tidied up after the restore, had killed the serving tree at once (found by review,
    2026-12-06)."""
    import os
    import signal

    def stop(signum, _frame):
        stopping.set()
        try:
            os.kill(root, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

# vLLM prefixes each process's lines with "(APIServer pid=2) " and the like, and its logger each
# line of a record with "ERROR 12-02 17:50:30 [async_llm.py:906] ".
_PREFIX = re.compile(rb"^\([A-Za-z0-9_:]+ pid=\d+\) ")
_LOGGER = re.compile(rb"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] ")
_NOISE = (
    re.compile(rb"^nanobind: "),
    re.compile(rb"^ - (leaked [a-z]+ |\.\.\. skipped remainder)"),
    re.compile(rb"^AsyncLLM output_handler failed\.$"),
    re.compile(rb"^See https://nanobind\.readthedocs\.io/"),
    re.compile(rb"resource_tracker: There appear to be \d+ leaked "),
    re.compile(rb"^\s+warnings\.warn\('resource_tracker: "),
)
_TRACEBACK = b"Traceback (most recent call last):"
_QUIET_EXCEPTIONS = (b"EngineDeadError",)


_FILTERS: list["ExitFilter"] = []


def dropped() -> int:
    """Lines dropped so far, on every stream."""
    return sum(f.dropped for f in _FILTERS)


class ExitFilter:
    """Per stream: feed each line, write what comes back. A traceback that starts after the stop
    is held until its exception line: dropped if it is one of the quiet ones, else written whole."""

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self.dropped = 0
        _FILTERS.append(self)

    def feed(self, line: bytes) -> list[bytes]:
        if not stopping.is_set() and not self._held:
            return [line]
        body = _LOGGER.sub(b"", _PREFIX.sub(b"", line)).rstrip(b"\n")
        if self._held:
            self._held.append(line)
            if body[:1].isspace() or body.strip() == b"":
                return []  # still inside the traceback
            block, self._held = self._held, []
            if any(name in body for name in _QUIET_EXCEPTIONS):
                self.dropped += len(block)
                return []
            return block
        if body.startswith(_TRACEBACK):
            self._held = [line]
            return []
        if any(p.search(body) for p in _NOISE):
            self.dropped += 1
            return []
        return [line]

    def flush(self) -> list[bytes]:
        """Whatever is still held (a traceback cut off by the exit): written as it is."""
        block, self._held = self._held, []
        return block
