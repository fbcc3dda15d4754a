"""How fvboot ends once the server it started or restored ends: with the server's own code, and
never 0 for a server that ended on its own (vLLM's API server exits 0 when its engine dies; a
restart policy of `on-failure` would then leave the node without a server)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from fvboot import exitnoise, serve


@pytest.fixture(autouse=True)
def not_stopping():
    exitnoise.stopping.clear()
    yield
    exitnoise.stopping.clear()


def _tree(code: int):
    return types.SimpleNamespace(proc=subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"]))


def test_a_server_that_ends_on_its_own_with_0_ends_the_container_with_1(capsys):
    assert serve._supervise(_tree(0)) == 1
    err = capsys.readouterr().err
    assert "vLLM exited with code 0" in err
    assert "the server ended while serving, unasked (its log above says why): exit 1" in err


def test_a_server_that_fails_ends_the_container_with_its_code(capsys):
    assert serve._supervise(_tree(3)) == 3
    assert "ended while serving" not in capsys.readouterr().err


def test_a_server_stopped_by_docker_stop_ends_the_container_with_0(capsys):
    exitnoise.stopping.set()  # what _supervise's SIGTERM handler sets before passing the stop on
    assert serve._supervise(_tree(0)) == 0
    assert "ended while serving" not in capsys.readouterr().err


def test_a_servers_last_lines_are_passed_on_before_fvboots_own_last_line(capfd):
    """A server that writes much and then exits: fvboot logged its exit line and ended while its
    log pumps still had the end of the output, the reason most often, unread in the pipes (found
    by review, 2026-12-06: 3,000 lines, ~300 lost; the reason line lost every time at 600)."""
    from fvboot.launcher import Pipes

    pipes = Pipes.create()
    pipes.pump(lambda event, args: None)
    code = ("import sys\nfor i in range(3000): sys.stderr.write(f'line {i} ' + 'x' * 200 + '\\n')\n"
            "sys.stderr.write('RuntimeError: the reason it ended\\n'); raise SystemExit(3)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=pipes.out_w, stderr=pipes.err_w)
    assert serve._supervise(types.SimpleNamespace(proc=proc), drain=lambda: serve._drain(pipes)) == 3
    err = capfd.readouterr().err
    assert err.count("x" * 200) == 3000
    assert err.index("RuntimeError: the reason it ended") < err.index("vLLM exited with code 3"), err[-500:]
