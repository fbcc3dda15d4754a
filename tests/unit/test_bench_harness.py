"""bench/harness.py, the pieces the GPU benchmarks share, on what a CPU machine has: fvboot
imported through the link to this checkout, processes started and stopped as a tree, a time
budget, a real local HTTP server timed to its first correct answer, a file dropped from the
page cache when drop_caches is refused, and the result JSON where $OUT says."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
from harness import BenchError, Budget  # noqa: E402


# --- fvboot from this checkout


def test_fvboot_imports_from_this_checkout_through_the_link(tmp_path):
    folder = harness.link_fvboot(tmp_path / "pylib")
    # -S: no site-packages, so an installed fvboot cannot answer in the link's place
    out = subprocess.run([sys.executable, "-S", "-c", "import fvboot.cuda_checkpoint, fvboot; print(fvboot.__file__)"],
                         env={"PYTHONPATH": str(folder), "PATH": os.environ["PATH"]}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(folder / "fvboot" / "__init__.py")
    assert Path(out).resolve() == REPO / "entrypoint" / "__init__.py"


def test_a_link_to_another_tree_is_replaced_and_a_right_one_kept(tmp_path):
    other = tmp_path / "old-checkout" / "entrypoint"
    other.mkdir(parents=True)
    (tmp_path / "pylib").mkdir()
    (tmp_path / "pylib" / "fvboot").symlink_to(other)
    harness.link_fvboot(tmp_path / "pylib")
    link = tmp_path / "pylib" / "fvboot"
    assert os.readlink(link) == str(REPO / "entrypoint")
    before = link.lstat().st_ino
    harness.link_fvboot(tmp_path / "pylib")
    assert link.lstat().st_ino == before  # left alone, not made again


def test_a_dangling_link_is_replaced(tmp_path):
    (tmp_path / "pylib").mkdir()
    (tmp_path / "pylib" / "fvboot").symlink_to(tmp_path / "gone")
    harness.link_fvboot(tmp_path / "pylib")
    assert (tmp_path / "pylib" / "fvboot" / "__init__.py").is_file()


def test_a_real_fvboot_directory_is_refused_not_deleted(tmp_path):
    real = tmp_path / "pylib" / "fvboot"
    real.mkdir(parents=True)
    (real / "mine.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="is a real directory, not a link"):
        harness.link_fvboot(tmp_path / "pylib")
    assert (real / "mine.py").read_text() == "x = 1\n"


def test_a_checkout_without_the_required_file_stops_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="entrypoint/weights/no_such.py not found"):
        harness.link_fvboot(tmp_path / "pylib", require="weights/no_such.py")
    assert not (tmp_path / "pylib").exists()
    harness.link_fvboot(tmp_path / "pylib", require="weights/load.py")  # what gpu_weight_load needs


# --- log lines


def test_log_lines_carry_the_wall_clock_or_the_seconds_since_the_start(capsys):
    harness.log("phase bake")
    harness.log("== dump", since=time.monotonic() - 12.34)
    wall, elapsed = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[bench \d\d:\d\d:\d\d\] phase bake", wall)
    assert elapsed == "[   12.3s] == dump"


# --- time budget


def test_the_budget_gives_what_is_wanted_or_what_is_left():
    budget = Budget(30)
    assert budget.timeout(5) == 5
    assert 28 < budget.timeout(100) <= 30
    assert 29 < budget.left() <= 30 and 0 <= budget.elapsed() < 1


def test_a_spent_budget_raises_instead_of_giving_a_timeout():
    budget = Budget(1.4)
    assert budget.timeout(10) <= 1.4
    time.sleep(0.5)  # under a second left: nothing useful fits
    with pytest.raises(BenchError, match="time budget of the bench is spent"):
        budget.timeout(10)
    assert budget.left() < 1


# --- processes: started in a session of their own, stopped as a tree


def test_a_started_process_writes_its_output_to_the_log_and_stops_on_sigterm(tmp_path):
    log = tmp_path / "serve.log"
    proc = harness.start([sys.executable, "-c", "import sys, time; print('out', flush=True); "
                          "print('err', file=sys.stderr, flush=True); time.sleep(60)"], log=log)
    _wait_for(lambda: "err" in log.read_text())
    assert os.getpgid(proc.pid) == proc.pid  # its own group: stop() can kill what it forks
    t = time.monotonic()
    harness.stop(proc, grace=10)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t < 5
    assert sorted(log.read_text().split()) == ["err", "out"]


def test_stop_kills_the_whole_tree_when_sigterm_is_ignored(tmp_path):
    log = tmp_path / "stubborn.log"
    proc = harness.start([sys.executable, "-c",
                          "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)"],
                         log=log)
    _wait_for(lambda: log.read_text().strip())
    grandchild = int(log.read_text())
    t = time.monotonic()
    harness.stop(proc, grace=0.5)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - t < 5
    _wait_for(lambda: _gone(grandchild))


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_for(cond, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


# --- first correct token, against a real local server


class _Server:
    """A tiny OpenAI-style server: 503 until READY_AFTER seconds have passed, then ANSWER."""

    def __init__(self, answer: str, ready_after: float) -> None:
        self.answer, self.ready_at = answer, time.monotonic() + ready_after
        self.requests: list[dict] = []
        self.not_ready = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append({"path": self.path, **body})
                if time.monotonic() < outer.ready_at:
                    outer.not_ready += 1
                    self.send_error(503, "loading")
                    return
                data = json.dumps({"choices": [{"text": outer.answer}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(answer: str, ready_after: float) -> _Server:
        made.append(_Server(answer, ready_after))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_the_first_correct_token_is_timed_from_the_start_through_not_ready_answers(server):
    t0 = time.monotonic()  # "launched": the server is ready 0.4 s later
    srv = server(" Paris.", ready_after=0.4)
    took = harness.first_correct_token(srv.port, "m", "The capital of France is", " Paris.", t0=t0, limit=10)
    assert 0.4 <= took < 3
    assert srv.not_ready >= 2  # it asked again while the server was not ready
    assert srv.requests[-1] == {"path": "/v1/completions", "model": "m", "prompt": "The capital of France is",
                                "max_tokens": 12, "temperature": 0.0}


def test_a_wrong_answer_fails_at_once_rather_than_being_waited_past(server):
    srv = server(" Lyon.", ready_after=0.2)
    t0 = time.monotonic()
    with pytest.raises(BenchError, match=r"WRONG ANSWER ' Lyon\.' != ' Paris\.'"):
        harness.first_correct_token(srv.port, "m", "The capital of France is", " Paris.", t0=t0, limit=10)
    assert time.monotonic() - t0 < 3  # a broken server, not a slow one: no waiting out the limit
    assert len(srv.requests) == srv.not_ready + 1


def test_no_answer_within_the_limit_is_an_error(server):
    srv = server(" Paris.", ready_after=60)
    t0 = time.monotonic()
    with pytest.raises(BenchError, match="no answer within 0.5 s"):
        harness.first_correct_token(srv.port, "m", "p", " Paris.", t0=t0, limit=0.5)
    assert 0.5 <= time.monotonic() - t0 < 3


def test_a_server_process_that_exits_ends_the_wait_with_its_status(server):
    srv = server(" Paris.", ready_after=60)
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(BenchError, match="fvboot serve exited with 3"):
        harness.first_correct_token(srv.port, "m", "p", " Paris.", t0=time.monotonic(), limit=10, proc=proc,
                                    name="fvboot serve")


# --- page cache


def _file_in_cache(tmp_path) -> Path:
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {_fs_type(tmp_path)}: its pages cannot leave memory")
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(8 << 20))
    path.read_bytes()
    assert harness.resident_fraction(path) > 0.9  # the test means something: it starts cached
    return path


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mount, fs = line.split()[1:3]
        if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fs
    return kind


def test_the_page_cache_drop_falls_back_to_fadvise_when_drop_caches_is_not_writable(tmp_path):
    path = _file_in_cache(tmp_path)
    read_only = tmp_path / "proc-sys-vm"  # a directory: opening it for writing fails, even as root
    read_only.mkdir()
    how = harness.drop_page_cache([path], control=read_only)
    assert how == ["drop_caches refused (Is a directory)", "fadvise(DONTNEED)"]
    assert harness.resident_fraction(path) < 0.05


def test_drop_caches_gets_a_3_and_fadvise_still_runs_for_the_files_named(tmp_path):
    path = _file_in_cache(tmp_path)
    control = tmp_path / "drop_caches"
    control.write_text("")
    assert harness.drop_page_cache([path], control=control) == ["drop_caches", "fadvise(DONTNEED)"]
    assert control.read_text() == "3\n"
    assert harness.resident_fraction(path) < 0.05
    assert harness.drop_page_cache(control=control) == ["drop_caches"]  # no files: no fadvise


def test_a_strict_drop_raises_when_drop_caches_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError):
        harness.drop_page_cache(control=tmp_path, strict=True)


# --- the result JSON


def test_the_result_is_written_to_OUT_and_printed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out" / "not-made-yet"
    monkeypatch.setenv("OUT", str(out))
    result = {"phase": "bake", "runs": [{"wall_s": 1.5}], "path": tmp_path}  # a Path: written as str
    written = harness.record("gpu_startup_bake", result, copies=(tmp_path / "results",))
    assert written == out / "gpu_startup_bake.json"
    want = {"phase": "bake", "runs": [{"wall_s": 1.5}], "path": str(tmp_path)}
    assert json.loads(written.read_text()) == want
    assert (tmp_path / "results" / "gpu_startup_bake.json").read_text() == written.read_text()
    assert json.loads(capsys.readouterr().out) == want


def test_without_OUT_the_result_is_only_printed_and_show_false_prints_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert harness.record("page_reads", {"best": 2.5}) is None
    assert json.loads(capsys.readouterr().out) == {"best": 2.5}
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("OUT", str(tmp_path))
    assert harness.record("gpu_weight_load", {"ok": True}, show=False) == tmp_path / "gpu_weight_load.json"
    assert capsys.readouterr().out == ""


# --- bench/pages_touched.py: the measurement behind "restore pages lazily"


def test_pages_touched_counts_what_a_process_touched_since_its_referenced_bits_were_cleared():
    """A child maps 64 MiB of private memory and fills it, its bits are cleared, it reads a
    quarter back: the script must see ~64 MiB resident and ~16 MiB touched (not 64)."""
    import pages_touched

    child = subprocess.Popen([sys.executable, "-c", """
import mmap, sys
m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 64 << 20, 4096): m[i] = 1
print('filled', flush=True); sys.stdin.readline()
s = sum(m[i] for i in range(0, 16 << 20, 4096))
print('read', s, flush=True); sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("filled")
        before, _ = pages_touched.private_memory_kb(child.pid)
        with open(f"/proc/{child.pid}/clear_refs", "w") as f:
            f.write("1")
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().startswith("read 4096")
        resident, touched = pages_touched.private_memory_kb(child.pid)
    finally:
        child.kill()
        child.wait()
    assert resident >= before >= 64 << 10
    # a little under 16 MiB happens: the kernel's page aging, when reclaim runs (a machine whose
    # page cache is full), clears some accessed bits again (seen: 16,280 KiB of 16,384, 1 run in 13)
    assert 14 << 10 <= touched < (16 << 10) + (resident - (64 << 10)) + 4096, (before, resident, touched)
