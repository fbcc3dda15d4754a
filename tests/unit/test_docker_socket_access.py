"""fvbuild run by a user who may not use the Docker daemon's socket (not in the docker group):
the daemon runs, so "start dockerd" was the wrong advice. A real listening socket this process may
not open (mode 000; as root, run without the capability that overrides file modes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest


def test_a_socket_this_user_may_not_use_says_so_and_what_to_do(tmp_path):
    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    path.chmod(0)
    cmd = [sys.executable, "-m", "fvbuild.cli", "inspect", "fv-test/anything:cpu"]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root needs setpriv (util-linux) to run without CAP_DAC_OVERRIDE")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search",
               *cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "DOCKER_HOST": f"unix://{path}"})
    finally:
        server.close()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    line = next(l for l in r.stderr.splitlines() if l.startswith("fvbuild:"))
    assert f"no permission to use the Docker daemon's socket (unix://{path})" in line, line
    assert "docker group" in line and "start dockerd" not in line, line
