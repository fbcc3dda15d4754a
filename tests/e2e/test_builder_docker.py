"""The builder against a real Docker engine: the image really builds (CRIU compiled from source
with our patch series), CRIU works in a container with the documented capability set, vLLM
imports, and each user mistake ends in one clear line, no traceback and no image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fvbuild.engine import docker_run_flags

from conftest import fvbuild

pytestmark = pytest.mark.docker
CAPS = docker_run_flags() + ["--network", "host"]  # the documented capability set


def _run(image: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", "run", "--rm", *CAPS, "--entrypoint", cmd[0], image, *cmd[1:]],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def unbaked(baked_image) -> str:
    return f"{baked_image}-unbaked"


def test_criu_carries_the_patch_series(unbaked):
    r = _run(unbaked, "criu", "--version")
    assert r.returncode == 0, r.stderr
    assert "Version: 4.2" in r.stdout
    assert "Patched-by: fast-vllm" in r.stdout  # criu-patches/0001 took effect


def test_criu_check_passes_with_the_documented_capabilities(unbaked):
    r = _run(unbaked, "fvboot", "check")  # criu check in the namespace layout fvboot uses
    assert r.returncode == 0, r.stdout + r.stderr


def test_vllm_imports_and_fvboot_is_the_entrypoint(docker_client, unbaked):
    r = _run(unbaked, "python3", "-c", "import vllm, fvboot; print(vllm.__version__)")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = docker_client.api.inspect_image(unbaked)["Config"]
    assert cfg["Entrypoint"] == ["fvboot"]
    series = (Path(__file__).parents[2] / "criu-patches" / "series").read_text().split("\n")
    applied = [line.strip() for line in series if line.strip() and not line.startswith("#")]
    assert cfg["Labels"]["org.fast-vllm.criu-patches"] == ",".join(applied)
    assert "0002-restore-thp-fill.patch" in applied


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith("fvbuild:")]
    assert err, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], err[0]


def test_wrong_criu_ref_is_a_clear_error(tmp_path, build_flags):
    src = build_flags[build_flags.index("--criu-src") + 1] if "--criu-src" in build_flags else None
    if src is None:
        pytest.skip("needs a local CRIU source to make a local git repo from")
    repo = tmp_path / "criu.git"
    repo.mkdir()
    subprocess.run(["tar", "-xf", src, "-C", str(repo), "--strip-components=1"], check=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "criu"], check=True)
    subprocess.run(git + ["tag", "v4.2.1"], check=True)
    flags = [f for f in build_flags]
    i = flags.index("--criu-src")
    del flags[i:i + 2]
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/badref:x", "--no-bake", *flags,
                "--criu-repo", str(repo), "--criu-ref", "v9.9.9")
    _one_line_error(r, "CRIU ref 'v9.9.9' not found", "--criu-ref")


def test_broken_patch_names_the_patch_and_leaves_no_image(tmp_path, build_flags, docker_client):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-broken.patch").write_text(
        "--- a/criu/config.c\n+++ b/criu/config.c\n@@ -1,3 +1,3 @@\n-this line is not in CRIU\n+nor this\n context\n")
    (patches / "series").write_text("0001-broken.patch\n")
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/badpatch:x", "--no-bake",
                *build_flags, "--criu-patches", str(patches))
    _one_line_error(r, "0001-broken.patch does not apply")
    assert not docker_client.images.list(name="fv-test/badpatch")


def test_missing_base_image_is_a_clear_error(build_flags):
    flags = list(build_flags)
    if "--base-image" in flags:
        i = flags.index("--base-image")
        del flags[i:i + 2]
    r = fvbuild("image", "--model", "synthetic:tiny", "--no-bake", *flags, "--base-image", "fv-missing/nothing:1")
    _one_line_error(r, "base image fv-missing/nothing:1 is not on this machine", "--base-image")


def test_stopped_docker_daemon_is_a_clear_error(tmp_path):
    r = fvbuild("image", "--model", "synthetic:tiny", "--device", "cpu", "--no-bake",
                env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    _one_line_error(r, "cannot reach the Docker daemon", "start dockerd")


def test_unknown_option_is_a_clear_error():
    r = fvbuild("image", "--model", "synthetic:tiny", "--colour", "blue")
    assert r.returncode == 2 and "No such option '--colour'" in r.stderr and "Traceback" not in r.stderr
