"""Both cuda-checkpoint clients end a call to a service that accepted it and then went silent:
one clear line and exit 1 after FV_CUDA_CHECKPOINT_TIMEOUT_S, never a hung restore; and a
service that hangs up mid-request is an error line, not a SIGPIPE."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from fvboot import cuda_checkpoint_client as client


@pytest.fixture
def silent_service(tmp_path):
    """Accepts, reads the request, never answers."""
    path = str(tmp_path / "silent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    conns = []

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield path
    srv.close()
    for c in conns:
        c.close()


def test_c_client_gives_up_on_a_silent_service(c_client, silent_service):
    env = dict(os.environ, FV_CUDA_CHECKPOINT_SOCKET=silent_service, FV_CUDA_CHECKPOINT_TIMEOUT_S="1",
               FV_CUDA_CHECKPOINT_FALLBACK="/bin/false")
    t = time.monotonic()
    proc = subprocess.run([str(c_client), "--action", "restore", "--pid", "3"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t < 10
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"fv-cuda-checkpoint: the cuda-checkpoint service at {silent_service} failed: "
                           "no answer within 1 s\n")


@pytest.mark.parametrize("given, said, within", [("0.5", "0.5", (0.3, 3)), ("2e0", "2", (1.5, 5)),
                                                  ("1e-7", "1e-07", (0, 3))])  # rounds to 0: a microsecond, not no bound
def test_c_client_takes_the_bound_as_fvboots_settings_do(c_client, silent_service, given, said, within):
    """fvboot's settings take seconds as numbers (`0.5`, `1e3`); the C client read the whole
    number before the first other character: `0.5` fell back to 300 s, `1e3` was 1 s (found by
    review, 2026-12-06)."""
    env = dict(os.environ, FV_CUDA_CHECKPOINT_SOCKET=silent_service, FV_CUDA_CHECKPOINT_TIMEOUT_S=given,
               FV_CUDA_CHECKPOINT_FALLBACK="/bin/false")
    t = time.monotonic()
    proc = subprocess.run([str(c_client), "--action", "restore", "--pid", "3"], env=env,
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t
    assert within[0] < took < within[1], took
    assert proc.returncode == 1 and f"no answer within {said} s" in proc.stderr, proc.stderr


def test_python_client_gives_up_on_a_silent_service(silent_service, monkeypatch):
    monkeypatch.setenv("FV_CUDA_CHECKPOINT_TIMEOUT_S", "1")
    t = time.monotonic()
    rc, out, err = client.forward(["--action", "restore", "--pid", "3"], silent_service)
    assert time.monotonic() - t < 10
    assert (rc, out) == (1, "") and "no answer within 1 s" in err


def test_c_client_survives_a_service_that_hangs_up_before_reading(c_client, tmp_path):
    """Before: write() to the closed socket raised SIGPIPE and the client died (-13)."""
    path = str(tmp_path / "rude.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def hang_up():
        conn, _ = srv.accept()
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    big = ["x" * 100_000] * 10  # more than the socket buffer: the write must meet the closed peer
    env = dict(os.environ, FV_CUDA_CHECKPOINT_SOCKET=path, FV_CUDA_CHECKPOINT_FALLBACK="/bin/false")
    proc = subprocess.run([str(c_client), "--action", "restore", "--pid", *big], env=env,
                          capture_output=True, text=True, timeout=30)
    srv.close()
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"fv-cuda-checkpoint: the cuda-checkpoint service at {path} failed")
