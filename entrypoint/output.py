"""One lock for everything fvboot writes to its stdout/stderr: the forwarded server log, the
timeline and its own messages arrive from several threads, and a JSON line must never be cut
by another thread's bytes (log collectors parse them)."""

from __future__ import annotations

import sys
import threading

_LOCK = threading.Lock()


def write_line(text: str | bytes, err: bool = False) -> None:
    data = text.encode() if isinstance(text, str) else text
    if not data.endswith(b"\n"):
        data += b"\n"
    stream = sys.stderr if err else sys.stdout
    with _LOCK:
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()


def log(msg: str) -> None:
    """One line of fvboot's own, on stderr."""
    write_line(f"fvboot: {msg}", err=True)
