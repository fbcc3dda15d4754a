"""fvboot's cuda-checkpoint service: one process that initialises the CUDA driver once and
answers every `cuda-checkpoint` call CRIU's cuda plugin makes during a dump or a restore.

Why: each call of the plugin is a new process; with the driver opened and cuInit done per call
the restore of a vLLM server spent ~1.5 s in tool start-ups alone (two CUDA processes, three
calls each, plus every other process of the tree). fvboot starts this service as soon as it has
read the manifest (its cuInit, in a thread, overlaps the checks and CRIU's memory restore) and
stops it when the restore is done; the image's `cuda-checkpoint` (cuda_checkpoint_client.c, or
the Python cuda_checkpoint_client) forwards the plugin's calls over a Unix socket that only root
can open. The answers are exactly fv-cuda-checkpoint's (same code, same output, same codes).

    python -m fvboot.cuda_checkpoint_service SOCKET
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from . import runenv
from .cuda_checkpoint_client import MAGIC, SOCKET_ENV
from .helper_process import helper_command
from .local_socket import listen_privately

if TYPE_CHECKING:
    from . import cuda_checkpoint as cc

DISABLE_ENV = "FV_CUDA_CHECKPOINT_SERVICE"  # 0: let the plugin start the tool for every call
# A file beside the socket that exists while a CUDA restore runs: the weight stager, asked to
# (FV_WEIGHT_STAGING_YIELD=resume), leaves the GPU, the page cache and the CPUs to it meanwhile.
RESUME_MARK = "cuda-resume.running"
_PR_SET_PDEATHSIG = 1
REQUEST_TIMEOUT_S = 30


def decode_request(data: bytes) -> tuple[list[str], dict[str, str]]:
    """The client's bytes -> (argv, forwarded environment); ValueError if malformed."""
    head, sep, body = data.partition(b"\n")
    magic, _, count = head.partition(b" ")
    if not sep or magic != MAGIC or not count.isdigit():
        raise ValueError("not a cuda-checkpoint request")
    items = [os.fsdecode(i) for i in body.split(b"\0")]
    if items[-1:] == [""]:
        items.pop()  # after the last terminator
    argc = int(count)
    if len(items) < argc:
        raise ValueError(f"{len(items)} items, {argc} arguments announced")
    env = dict(item.split("=", 1) for item in items[argc:] if "=" in item)
    return items[:argc], env


def resume_mark(run_dir: Path) -> Path:
    return run_dir / RESUME_MARK


def is_restore(request: bytes) -> bool:
    """Whether REQUEST asks for `--action restore` (the call that brings a process's GPU state back)."""
    try:
        argv, _ = decode_request(request)
    except ValueError:
        return False
    return "--action=restore" in argv or any(a == "--action" and b == "restore" for a, b in zip(argv, argv[1:]))


@contextlib.contextmanager
def marked(mark: str, on: bool) -> Iterator[None]:
    """MARK exists for the duration (when ON): a CUDA restore is running."""
    if on:
        with contextlib.suppress(OSError):
            with open(mark, "w"):
                pass
    try:
        yield
    finally:
        if on:
            with contextlib.suppress(OSError):
                os.unlink(mark)


def handle(request: bytes, driver: Callable[[], cc.CudaDriver]) -> bytes:
    """One request -> the reply's bytes, exactly what fv-cuda-checkpoint would have printed.
    DRIVER gives the initialised driver (waiting for it) or raises why there is none; calls
    that need no driver (help, usage errors) never wait for it."""
    from . import cuda_checkpoint as cc

    try:
        argv, env = decode_request(request)
    except ValueError as exc:
        out, err, rc = "", f"{cc.PROG}: malformed request to the service: {exc}\n", 2
    else:
        out_io, err_io = io.StringIO(), io.StringIO()
        rc = cc.run(argv, out_io, err_io, env, driver)
        out, err = out_io.getvalue(), err_io.getvalue()
    out_b, err_b = out.encode(), err.encode()
    return b"%d %d %d\n" % (rc, len(out_b), len(err_b)) + out_b + err_b


class Service:
    """The socket and the driver; answers one connection at a time. The driver opens and
    initialises (cuInit, ~0.3 s) in a thread, so the plugin's first call (`-h`, as CRIU starts)
    is answered at once."""

    def __init__(self, path: str, load=None) -> None:
        from . import cuda_checkpoint as cc  # only the service process needs the tool

        load = load or cc.CudaDriver.load
        self.path = path
        self.mark = str(resume_mark(Path(os.path.abspath(path)).parent))
        # only root (the caller's user) may connect; callers queue from here on
        self.sock = listen_privately(path, backlog=16)
        self._driver: cc.CudaDriver | None = None
        self._load_error: cc.ToolError | None = None

        def init() -> None:
            try:
                driver = load()
                driver.init()
                self._driver = driver
            except cc.CudaError as exc:
                self._load_error = cc.DriverUnavailableError(f"cuInit failed: {exc}")
            except cc.ToolError as exc:
                # Calls still get answers: each reports why, as the tool itself would.
                self._load_error = exc

        self._init = threading.Thread(target=init, name="cuInit", daemon=True)
        self._init.start()

    def driver(self) -> cc.CudaDriver:
        """The initialised driver (waits for the init thread), or the reason there is none."""
        from . import cuda_checkpoint as cc

        self._init.join()
        if self._driver is None:
            raise self._load_error or cc.DriverUnavailableError("the CUDA driver could not be opened")
        return self._driver

    def answer_one(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)  # a client that never finishes its request
            chunks = []
            try:
                while True:  # the client shuts down its side after the request
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except OSError:
                return
            request = b"".join(chunks)
            with marked(self.mark, is_restore(request)):
                reply = handle(request, self.driver)
            with contextlib.suppress(OSError):
                conn.sendall(reply)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def serve(path: str) -> int:
    """Answer calls at PATH until SIGTERM (or until fvboot, our parent, is gone)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    service = Service(path)
    try:
        while True:
            service.answer_one()
    finally:
        service.close()


def service_command(socket_path: Path, package_dir: str) -> tuple[list[str], Optional[dict[str, str]]]:
    """(argv, environment) of the service process (helper_process.helper_command): without site
    where fvboot sits in a folder of its own, so that its cuInit is done before CRIU's cuda
    plugin calls (0.3 s into a mapped restore)."""
    return helper_command("cuda_checkpoint_service", [str(socket_path)], package_dir)


@contextlib.contextmanager
def running(run_dir: Path, enabled: bool = True) -> Iterator[dict[str, str]]:
    """Run the service for the duration of a CRIU call; yields the environment CRIU (and so the
    plugin's cuda-checkpoint calls) must get. Yields {} when disabled (no GPU, or
    FV_CUDA_CHECKPOINT_SERVICE=0): the plugin then runs the tool for every call."""
    if not enabled or runenv.value(DISABLE_ENV) == "0":
        yield {}
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cuda-checkpoint.sock"
    with contextlib.suppress(FileNotFoundError):
        resume_mark(run_dir).unlink()  # an earlier run's, cut off mid-restore: nobody waits on it
    argv, env = service_command(path, os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        # No waiting for the socket: calls made before it exists (the plugin's first `-h`)
        # run the tool themselves, and the ones that matter come after CRIU's memory restore.
        yield {SOCKET_ENV: str(path)}
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:  # a service stuck in a driver call may not go at once: never wait unbounded
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print(f"fvboot: the cuda-checkpoint service (pid {proc.pid}) did not end 10 s after SIGKILL",
                      file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m fvboot.cuda_checkpoint_service SOCKET", file=sys.stderr)
        return 2
    return serve(args[0])


if __name__ == "__main__":
    sys.exit(main())
