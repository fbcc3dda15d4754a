"""examples/compose brought up as an operator would, with the baked image: the container turns
healthy (its own health check, against the gate), and the restored server answers as it did
before the checkpoint. This machine's Docker engine has no bridge network, so the example's
service runs with `network_mode: host` instead of its published port (the one change; the rest is
what `docker-compose config` makes of the example file)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import requests

from conftest import REPO, e2e_device, fvbuild
from test_restore import compose_gpu_override, gpu_flags

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
COMPOSE = REPO / "examples" / "compose" / "compose.yaml"
COMPOSE_GPU = REPO / "examples" / "compose" / "compose.gpu.yaml"
PROJECT = "fvexample"
RESTORE_COMPOSE = REPO / "tests" / "e2e" / "docker-compose.yml"  # test_restore.py's service


def _compose_command() -> str:
    return os.environ.get("FV_COMPOSE", "docker-compose")


def _run(argv: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _port_open() -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", PORT)) == 0


@pytest.fixture(scope="module")
def manifest(baked_image) -> dict:
    r = fvbuild("inspect", baked_image)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def port_free(docker_client, docker_compose_project_name):
    """Port 8000 of the host network is shared: take test_restore.py's compose service (which
    brings itself up again when it needs it) and any leftover of this project down first."""
    _run([_compose_command(), "-f", str(RESTORE_COMPOSE), "-p", docker_compose_project_name, "down"],
         env={"FV_E2E_IMAGE": os.environ.get("FV_E2E_IMAGE", "unused")})
    _run([_compose_command(), "-f", str(COMPOSE), "-p", PROJECT, "down", "-v"])
    deadline = time.monotonic() + 60
    while _port_open():
        if time.monotonic() > deadline:
            ps = _run(["docker", "ps", "--format", "{{.Names}} {{.Image}} {{.Status}}"]).stdout
            pytest.fail(f"something still listens on port {PORT}:\n{ps}")
        time.sleep(0.5)


def _host_network_variant(baked_image: str, tmp_path) -> str:
    """The example as docker-compose reads it (variables filled in), on the host network. On a
    GPU: with the example's own compose.gpu.yaml where NVIDIA's toolkit is there, else with the
    device nodes and driver folder the builder names (the same flags as `fvbuild run-flags`)."""
    import yaml

    files = [str(COMPOSE)]
    if e2e_device() == "cuda":
        flags = gpu_flags()
        if flags == ["--gpus", "all"]:
            files.append(str(COMPOSE_GPU))
        else:
            override = tmp_path / "compose.gpu-devices.yaml"
            override.write_text(compose_gpu_override(flags, service="vllm"))
            files.append(str(override))
    r = _run([_compose_command(), *(a for f in files for a in ("-f", f)), "config"], env={"FV_IMAGE": baked_image})
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    svc = doc["services"]["vllm"]
    assert svc["image"] == baked_image
    svc.pop("ports")
    svc["network_mode"] = "host"
    path = tmp_path / "compose.host-network.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _health(container: str) -> tuple[str, bool, str]:
    r = _run(["docker", "inspect", "-f", "{{json .State}}", container])
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)
    return state.get("Health", {}).get("Status", "none"), state["Running"], r.stdout


def test_compose_example_turns_healthy_and_answers_like_before_the_checkpoint(
        baked_image, manifest, port_free, tmp_path):
    compose = [_compose_command(), "-f", _host_network_variant(baked_image, tmp_path), "-p", PROJECT]
    try:
        up = _run(compose + ["up", "-d"])
        assert up.returncode == 0, up.stderr
        container = _run(compose + ["ps", "-q", "vllm"]).stdout.strip()
        assert container, "no container for the example's service"
        deadline = time.monotonic() + 600
        while True:
            status, running, raw = _health(container)
            if status == "healthy":
                break
            assert running, "the example's container exited:\n" + _run(compose + ["logs", "--no-color"]).stdout[-4000:]
            assert status == "starting", f"health status {status}: {raw[-3000:]}"
            assert time.monotonic() < deadline, "not healthy after 600 s"
            time.sleep(0.5)
        # Healthy means the gate is open: /health answers 200 (not the gate's 503) without waiting.
        assert requests.get(f"{URL}/health", timeout=5).status_code == 200
        name = manifest["model"]["served_name"]
        for baked in manifest["probe"]:
            r = requests.post(f"{URL}/v1/completions", timeout=120, json={
                "model": name, "prompt": baked["prompt"], "max_tokens": len(baked["logprobs"]) or 12,
                "temperature": 0.0, "logprobs": 2, "seed": 0})
            r.raise_for_status()
            c = r.json()["choices"][0]
            assert c["text"] == baked["text"]
            assert [round(x, 4) for x in c["logprobs"]["token_logprobs"]] == baked["logprobs"]
        logs = _run(compose + ["logs", "--no-color"]).stdout
        assert "restored from checkpoint" in logs, "the example must restore, not fall back:\n" + logs[-4000:]
        assert "checkpoint not used" not in logs
        volumes = _run(["docker", "volume", "ls", "-q", "--filter", f"name={PROJECT}_hf-cache"]).stdout.split()
        assert volumes == [f"{PROJECT}_hf-cache"], "the HF cache volume"
    finally:
        down = _run(compose + ["down", "-v"])
    assert down.returncode == 0, down.stderr
    assert not _port_open(), "the example's server is still up after down"
