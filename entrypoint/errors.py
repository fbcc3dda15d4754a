"""Typed errors of the runtime; the CLI prints them as one line (`fvboot: ...`)."""


class FvBootError(Exception):
    """Anything fvboot reports to the operator."""


def reason(e: BaseException) -> str:
    """E in one line for the operator: fvboot's own errors by their message (written to be read),
    anything else with its type (a bare "[Errno 21] Is a directory" says too little)."""
    return str(e) if isinstance(e, FvBootError) else f"{type(e).__name__}: {e}"


class BakeFailed(FvBootError):
    """The bake could not finish; no checkpoint was written."""


class CheckpointUnusable(FvBootError):
    """The checkpoint cannot serve on this machine; the reason leads to a normal start."""


class ManifestInvalid(CheckpointUnusable):
    """The manifest is not one this fvboot can read (not JSON, another format, a field missing or
    of the wrong type); the one-line reason names the field. Like any unusable checkpoint, it
    leads to a normal start."""


class ServerDied(FvBootError):
    """The vLLM process tree exited."""


class ServerError(FvBootError):
    """The vLLM server answered an fvboot call with an error (its text is in the message)."""


class PortTaken(FvBootError):
    """The port the server is to listen on is held by another process: no start can serve on it."""


class Stopped(BaseException):
    """SIGTERM/SIGINT (docker stop) before the server was up: unwinds whatever runs (a restore, a
    start), each step cleaning up after itself, so the container ends promptly. A BaseException,
    like KeyboardInterrupt: no `except Exception` on the way may swallow it into a fallback."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def stop_on_signals() -> None:
    """From now on SIGTERM and SIGINT raise Stopped, once: a second signal waits for the first's
    unwinding. fvboot's first step (PID 1 ignores a signal it has no handler for), and a start's."""
    import signal

    def stop(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
