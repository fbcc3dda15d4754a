"""What only a GPU has: restore onto the GPU (CUDA state through CRIU's cuda plugin and
fv-cuda-checkpoint) and the fallback when the baked GPU differs. Everything else is the shared
suite in tests/e2e, which GPU CI runs with FV_E2E_DEVICE=cuda:

    FV_E2E_DEVICE=cuda FV_REQUIRE_DOCKER=1 python3 -m pytest -ra -m "docker or gpu" tests

These tests skip here (no GPU, no Docker GPU runtime) with that reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.docker]


def _gpu_reason() -> str | None:
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode:
        return "no NVIDIA GPU on this machine"
    info = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True)
    if info.returncode or "nvidia" not in info.stdout:
        return "Docker has no NVIDIA runtime (install nvidia-container-toolkit)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu():
    reason = _gpu_reason()
    if reason:
        pytest.skip(reason)
    import conftest

    if conftest.e2e_device() != "cuda":
        pytest.skip("set FV_E2E_DEVICE=cuda to run the GPU suite")


def test_restore_on_gpu_gives_baked_answers_and_timeline(baked_image):
    from e2e.test_restore import Container, _assert_same_as_bake, _wait_ready

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    assert m["device"]["kind"] == "cuda" and m["device"]["gpus"]
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(m)
        logs = c.logs()
    assert "restored from checkpoint" in logs
    assert "weights loaded" in logs and "engine awake" in logs


def test_manifest_from_another_gpu_falls_back(baked_image):
    from e2e.test_restore import _fallback

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    edit = ("python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));"
            "m['device']['gpus'][0]['name']='NVIDIA Imaginary 1';json.dump(m,open(p,'w'))\"")
    _fallback(baked_image, m, edit, "this machine has")
