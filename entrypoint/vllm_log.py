"""What vLLM said when it stopped, read from the end of its own output.

A server that exits before it answers leaves its reason in a traceback, often 20 wrapped lines
above fvboot's last line, behind wrappers that say to look above ("Engine core initialization
failed. See root cause above."). fvboot keeps the tail of the served tree's output (launcher's
log pumps feed it) and puts vLLM's own reason into its one line: at a normal start (found by
hand, 2026-12-06: a container with Docker's default 64 MB /dev/shm ended in "the vLLM server
exited before it became healthy (see its log above)", the reason, "Insufficient space in
/dev/shm ... Increase /dev/shm (e.g. --shm-size or --ipc=host)", pages up) and in a bake, whose
line fvbuild shows.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from typing import Optional

# argparse: "PROG: error: MESSAGE", PROG a program name (vLLM's "vllm serve"); a compiler's
# "file.c:6:10: error: ..." or "x.cu(12): error: ..." (Triton's, FlashInfer's builds) is not one
_ARGPARSE_ERROR = re.compile(r"^[\w.\- ]+: error: (.+)$")
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")
# vLLM (0.26 and others) writes "(APIServer pid=1) " before every line a process prints, its
# tracebacks' too, coloured where asked (VLLM_LOGGING_COLOR=1); 0.32 prints it on its log records
# only. Its logger writes "ERROR 12-02 17:50:30 [core.py:1510] " before each line of a record.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROCESS_PREFIX = re.compile(r"^\((?:[\w-]+) pid=\d+\) ?")
_LOGGER_PREFIX = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]*\] ")
_WRAPPERS = ("initialization failed", "See root cause above", "Engine core", "failed to start")


def reason(lines: list[str], limit: int = 400) -> Optional[str]:
    """From the end of a vLLM server's output: its command line's refusal (argparse), the first
    error of a refused configuration (pydantic), or the last exception that is not a wrapper
    saying to look above. None where none of them is there."""
    lines = [_LOGGER_PREFIX.sub("", _PROCESS_PREFIX.sub("", _ANSI.sub("", line))) for line in lines]
    for line in reversed(lines):
        m = _ARGPARSE_ERROR.match(line.strip())
        if m and "usage:" not in line:
            return m.group(1).strip()[:limit]
    for i, line in enumerate(lines):
        if "validation error for" in line:
            for follow in lines[i + 1:i + 4]:
                text = follow.strip()
                if text.startswith("Value error, "):
                    return text.removeprefix("Value error, ").split(" [type=")[0][:limit]
    for line in reversed(lines):
        m = _EXCEPTION.match(line.strip())
        if m and not any(w in m.group(2) for w in _WRAPPERS):
            return f"{m.group(1)}: {m.group(2)}"[:limit]
    return None


class Tail:
    """The last lines the served tree wrote, both streams; which streams have ended."""

    def __init__(self, size: int = 300) -> None:
        self._lines: deque[str] = deque(maxlen=size)
        self._open = 0
        self._last = 0.0  # when the last line came
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def clear(self) -> None:
        """A new tree starts: what an earlier one said is not its reason."""
        with self._lock:
            self._lines.clear()

    def stream_started(self) -> None:
        with self._lock:
            self._open += 1

    def add(self, line: bytes) -> None:
        with self._lock:
            self._lines.append(line.decode(errors="replace").rstrip("\n"))
            self._last = time.monotonic()
            self._changed.notify_all()

    def stream_ended(self) -> None:
        with self._lock:
            self._open -= 1
            self._changed.notify_all()

    def said(self, wait: float = 2.0, quiet: float = 0.3) -> Optional[str]:
        """vLLM's reason, or None: read once the tree's streams have ended, or have been quiet
        for QUIET s (fvboot holds their write ends for the next tree, so they rarely end while it
        runs; a dead server's last lines are in the pipe already), and WAIT s at most."""
        asked = time.monotonic()
        with self._lock:
            while self._open > 0:
                now = time.monotonic()
                until = min(asked + wait, max(asked, self._last) + quiet)
                if now >= until:
                    break
                self._changed.wait(until - now)
            lines = list(self._lines)
        return reason(lines)


recent = Tail()  # fed by launcher.LogPump


def exited(text: str, wait: float = 2.0) -> str:
    """TEXT, which says the server exited, with vLLM's reason where its output has one."""
    said = recent.said(wait)
    return f"{text}; vLLM said: {said}" if said else f"{text} (see its log above)"
