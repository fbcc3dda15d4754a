"""What every GPU benchmark here needs, once: fvboot from this checkout, a log line, a time
budget, a cold page cache, a process started and stopped as a tree, the first correct token of a
server, and the result JSON in $OUT.

Standard library only: the benchmarks run on bare device machines, where only the checkout (and
whatever the benchmark itself measures, e.g. torch) is there. Each script imports it with a plain
`import harness` (running `python3 bench/x.py` puts bench/ on sys.path).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


class BenchError(RuntimeError):
    """A step of the bench could not run, or the server answered wrong: one line that says which
    (gpu_cuda_checkpoint records it in its summary)."""


def link_fvboot(folder: Path, require: str | None = None) -> Path:
    """Make FOLDER/fvboot a link to this checkout's entrypoint/ and return FOLDER, for sys.path or
    PYTHONPATH: the benchmarks measure the code in the tree, not an installed fvboot. A link to
    another tree is replaced; a real directory there is refused. REQUIRE: a file entrypoint/ must
    hold (a checkout too old for the benchmark stops here, with the reason)."""
    target = REPO / "entrypoint"
    if require and not (target / require).is_file():
        raise SystemExit(f"{target}/{require} not found: run this script from a fast-vllm checkout")
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "fvboot"
    if link.is_symlink() and os.readlink(link) == str(target):
        return folder
    if link.is_dir() and not link.is_symlink():
        raise SystemExit(f"{link} is a real directory, not a link: remove it first")
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
    return folder


def log(msg: str, since: float | None = None) -> None:
    """One line, flushed at once (a device call that is cut off still shows how far it got):
    stamped with the wall clock, or with the seconds since SINCE (a time.monotonic() value)."""
    stamp = f"bench {time.strftime('%H:%M:%S')}" if since is None else f"{time.monotonic() - since:7.1f}s"
    print(f"[{stamp}] {msg}", flush=True)


class Budget:
    """The wall-clock time a whole run may take: a device call is cut off at a fixed limit, so a
    bench skips what would not fit in left(), or caps a wait with timeout(), and still writes its
    result."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def timeout(self, wanted: float) -> float:
        """WANTED seconds, or what is left if less; BenchError once (nearly) nothing is left."""
        left = self.left()
        if left <= 1:
            raise BenchError("time budget of the bench is spent")
        return min(wanted, left)


def drop_page_cache(files: tuple[Path, ...] | list[Path] = (), *, control: Path = DROP_CACHES,
                    strict: bool = False) -> list[str]:
    """Make the next read come from the disk: sync, then `3` into CONTROL (drop_caches). Where that
    is refused (containers mount /proc/sys read-only) STRICT raises; otherwise it is noted and
    FILES are still dropped one by one with fsync + posix_fadvise(DONTNEED), which needs no
    privilege. Returns what was done, in order."""
    subprocess.run(["sync"], check=False)
    how = []
    try:
        with open(control, "w") as f:
            f.write("3\n")
        how.append("drop_caches")
    except OSError as exc:
        if strict:
            raise
        how.append(f"drop_caches refused ({exc.strerror})")
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            how.append("fadvise(DONTNEED)")
        finally:
            os.close(fd)
    return how


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (mmap + mincore), None if unknown: whether a
    cold run really was cold."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = path.stat().st_size
        page = os.sysconf("SC_PAGE_SIZE")
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return round((pages - bytes(vec).count(0)) / pages, 4)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def start(argv: list[str], *, log: Path | None = None, env: dict | None = None,
          stdin=None) -> subprocess.Popen:
    """Launch ARGV in a session of its own, so that stop() can kill the whole tree it forks;
    stdout and stderr to the file LOG (truncated), or nowhere. STDIN: as subprocess.Popen."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, env=env, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log:
            out.close()


def stop(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, grace: float = 60,
         reap: float | None = None) -> None:
    """SIG to a process from start(), GRACE seconds for it to exit, then SIGKILL to its whole
    session's group; then wait for it (REAP seconds at most; None: as long as it takes)."""
    proc.send_signal(sig)  # a no-op once it has been reaped
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(reap)
    except subprocess.TimeoutExpired:
        pass


def first_correct_token(port: int, model: str, prompt: str, want: str, *, t0: float, limit: float,
                        proc: subprocess.Popen | None = None, name: str = "the server",
                        host: str = "127.0.0.1", max_tokens: int = 12) -> float:
    """Seconds from T0 (time.monotonic()) to the first answer of an OpenAI-style server at
    HOST:PORT to a greedy completion of PROMPT (MAX_TOKENS long): until it answers, connection errors and HTTP
    errors are retried every 5 ms. The first answer must be WANT: a server that answers
    something else is broken (not slow), so that raises at once, as does PROC exiting, and LIMIT
    seconds from T0 without an answer."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    while time.monotonic() - t0 < limit:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode}")
        req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=limit) as r:
                text = json.loads(r.read())["choices"][0]["text"]
            took = time.monotonic() - t0
            if text != want:
                raise BenchError(f"WRONG ANSWER {text!r} != {want!r}")
            return took
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.005)
    raise BenchError(f"no answer within {limit} s")


def record(name: str, result: dict, *, show: bool = True, copies: tuple[Path, ...] = ()) -> Path | None:
    """The result as indented JSON: printed (SHOW), written to each folder in COPIES and to
    $OUT/NAME.json when OUT is set (the device machine returns what is under $OUT). Returns the
    $OUT file, None without OUT."""
    text = json.dumps(result, indent=2, default=str) + "\n"
    out = os.environ.get("OUT")
    written = None
    for folder in (*copies, *([Path(out)] if out else [])):
        folder.mkdir(parents=True, exist_ok=True)
        written = folder / f"{name}.json"
        written.write_text(text)
    if show:
        print(text, end="")
    return written if out else None
