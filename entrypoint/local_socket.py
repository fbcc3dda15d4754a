"""A Unix socket only its owner may connect to: fvboot's cuda-checkpoint service and the weight
stager's hand-over of the engine's memory listen on one in fvboot's run folder. Torch-free."""

from __future__ import annotations

import contextlib
import os
import socket


def listen_privately(path: str, kind: int = socket.SOCK_STREAM, backlog: int = 1) -> socket.socket:
    """A socket of KIND bound at PATH (whatever was left there removed first) and listening, its
    file mode 0600 from its first moment (a umask around the bind: a chmod after would leave a
    window)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
