"""The builder against a real Docker engine: the image really builds (CRIU compiled from source
with our patch series), CRIU works in a container with the documented capability set, vLLM
imports, `fvbuild criu` exports CRIU and `--criu-prebuilt` builds with it, nothing intermediate is
left behind, and each user mistake ends in one clear line, no traceback and no image."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import requests

from fvboot.capabilities import docker_run_flags

from conftest import MODEL, base_image, e2e_device, fvbuild
from e2e.test_restore import manifest, port_free  # noqa: F401  (the baked manifest; the compose service holds the baked port)

pytestmark = pytest.mark.docker
CAPS = docker_run_flags() + ["--network", "host"]  # the documented capability set


def _run(image: str, *cmd: str, gpu: bool = False) -> subprocess.CompletedProcess:
    """CMD in a container of IMAGE; GPU: with the GPU flags on CUDA (vLLM's CLI needs a device)."""
    from e2e.test_restore import gpu_flags

    flags = gpu_flags() if gpu else []
    return subprocess.run(["docker", "run", "--rm", *CAPS, *flags, "--entrypoint", cmd[0], image, *cmd[1:]],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def unbaked(baked_image) -> str:
    """The baked image: it holds everything the unbaked one did (no `-unbaked` tag is left)."""
    return baked_image


def test_no_intermediate_image_is_left_after_a_build(docker_client, baked_image):
    repo = baked_image.rsplit(":", 1)[0]
    tags = [t for img in docker_client.images.list(name=repo) for t in img.tags]
    assert tags and not [t for t in tags if t.endswith("-unbaked")], tags
    assert not docker_client.images.list(name="fvbuild-bake-tmp")
    assert not docker_client.containers.list(all=True, filters={"ancestor": baked_image})


def test_vllm_command_works_in_the_image(baked_image):
    r = _run(baked_image, "vllm", "--version", gpu=True)  # a CUDA vLLM cannot even parse without a GPU
    assert r.returncode == 0, r.stderr[-2000:]
    version = r.stdout.strip().splitlines()[-1]
    assert version[0].isdigit(), r.stdout
    if e2e_device() == "cpu":
        assert version.endswith("+cpu")  # what vLLM's platform detection looks for
    r = _run(baked_image, "python3", "-m", "vllm.entrypoints.cli.main", "serve", "--help", gpu=True)
    assert r.returncode == 0 and "usage: vllm serve" in r.stdout, r.stderr[-2000:]


def test_the_bake_shows_what_it_wrote(baked_image, build_output):
    """Progress a person can follow: the weight dump's and the checkpoint's sizes as they are written."""
    import re

    if baked_image not in build_output:
        pytest.skip("the image was baked before this session (FV_E2E_IMAGE)")
    out = build_output[baked_image]
    assert re.search(r"fvboot bake: weight dump written: \d+\.\d\d GB in \d+ files", out), out[-3000:]
    assert re.search(r"fvboot bake: checkpoint written: \d+\.\d\d GB in \d+ files", out), out[-3000:]


def test_criu_carries_the_patch_series(unbaked):
    r = _run(unbaked, "criu", "--version")
    assert r.returncode == 0, r.stderr
    assert "Version: 4.2" in r.stdout
    assert "Patched-by: fast-vllm" in r.stdout  # criu-patches/0001 took effect


def test_criu_check_passes_with_the_documented_capabilities(unbaked):
    r = _run(unbaked, "fvboot", "check", gpu=True)  # criu check in the namespace layout fvboot uses; a CUDA
    # image restores only where the container has its GPU (without, `fvboot check` says "running on cpu")
    assert "fvboot check: `criu check`: Looks good." in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0 and "the checkpoint would be restored here" in r.stdout, r.stdout + r.stderr


def test_vllm_imports_and_fvboot_is_the_entrypoint(docker_client, unbaked):
    r = _run(unbaked, "python3", "-c", "import vllm, fvboot; print(vllm.__version__)")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = docker_client.api.inspect_image(unbaked)["Config"]
    assert cfg["Entrypoint"] == ["fvboot"]
    series = (Path(__file__).parents[2] / "criu-patches" / "series").read_text().split("\n")
    applied = [line.strip() for line in series if line.strip() and not line.startswith("#")]
    assert cfg["Labels"]["org.fast-vllm.criu-patches"] == ",".join(applied)
    assert "0002-restore-thp-fill.patch" in applied


def _dangling(docker_client) -> set[str]:
    """The `<none>` images `docker images` lists: a failed build must add none (docker build would)."""
    return {img.id for img in docker_client.images.list(filters={"dangling": True})}


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
    if "--criu-src" not in build_flags:
        pytest.skip("patches apply where CRIU builds from source (CPU CI); this run's CRIU is prebuilt")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-broken.patch").write_text(
        "--- a/criu/config.c\n+++ b/criu/config.c\n@@ -1,3 +1,3 @@\n-this line is not in CRIU\n+nor this\n context\n")
    (patches / "series").write_text("0001-broken.patch\n")
    before = _dangling(docker_client)
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/badpatch:x", "--no-bake",
                *build_flags, "--criu-patches", str(patches))
    _one_line_error(r, "0001-broken.patch does not apply")
    assert not docker_client.images.list(name="fv-test/badpatch")
    assert _dangling(docker_client) <= before


def test_missing_base_image_is_a_clear_error(build_flags):
    flags = list(build_flags)
    if "--base-image" in flags:
        i = flags.index("--base-image")
        del flags[i:i + 2]
    r = fvbuild("image", "--model", "synthetic:tiny", "--no-bake", *flags, "--base-image", "fv-missing/nothing:1")
    _one_line_error(r, "base image fv-missing/nothing:1 is not on this machine", "--base-image")


def test_a_fast_vllm_image_as_the_base_is_refused_before_building(build_flags, baked_image, docker_client):
    """A baked image as the base: its /fv (model, weight dump, checkpoint, manifest) was merged
    with the new bake's, the bake kept its model and served it under the new name, and a
    --no-bake image restored the old server (found by review, 2026-12-06)."""
    flags = list(build_flags)
    if "--base-image" in flags:
        i = flags.index("--base-image")
        del flags[i:i + 2]
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/on-baked:x", "--no-bake", *flags,
                "--base-image", baked_image)
    _one_line_error(r, f"base image {baked_image} is a fast-vllm image", "build from the image it was built on")
    assert not docker_client.images.list(name="fv-test/on-baked")


def test_stopped_docker_daemon_is_a_clear_error(tmp_path):
    r = fvbuild("image", "--model", "synthetic:tiny", "--device", "cpu", "--no-bake",
                env={"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"})
    _one_line_error(r, "cannot reach the Docker daemon", "start dockerd")


def test_inspect_of_an_image_that_was_not_baked_is_a_clear_error(docker_client):
    base = base_image()
    docker_client.images.get(base)  # the setup script made it
    r = fvbuild("inspect", base)
    _one_line_error(r, f"{base} carries no fast-vllm checkpoint", "fvbuild image")


def test_unknown_option_is_a_clear_error():
    r = fvbuild("image", "--model", "synthetic:tiny", "--colour", "blue")
    assert r.returncode == 2 and "No such option '--colour'" in r.stderr and "Traceback" not in r.stderr


# ---- fvbuild criu and --criu-prebuilt -------------------------------------------------------------

def _flag(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory, build_flags, docker_client) -> Path:
    """`fvbuild criu --device cuda` from this machine's CRIU source (FV_CRIU_PREBUILT: use that file)."""
    given = os.environ.get("FV_CRIU_PREBUILT")
    if given:
        return Path(given)
    src = _flag(build_flags, "--criu-src")
    if src is None:
        pytest.skip("needs a local CRIU source (--criu-src) or FV_CRIU_PREBUILT")
    out = tmp_path_factory.mktemp("criu") / "criu-prebuilt-cuda.tar.gz"
    images_before = {i.id for i in docker_client.images.list(all=True)}
    base = _flag(build_flags, "--base-image") or base_image()
    r = fvbuild("criu", "--device", "cuda", "--base-image", base, "--criu-src", src, "--network", "host",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip() == str(out)
    assert "CRIU 4.2" in r.stderr and "needs glibc >=" in r.stderr
    left = {i.id for i in docker_client.images.list(all=True)} - images_before
    assert not left, f"fvbuild criu left images: {left}"
    return out


def test_prebuilt_holds_criu_plugin_client_vmtouch_and_their_libraries(prebuilt):
    with tarfile.open(prebuilt) as tf:
        names = set(tf.getnames())
        described = json.load(tf.extractfile("share/fast-vllm/criu-prebuilt.json"))
    assert {"sbin/criu", "libexec/fast-vllm/criu", "lib/criu/cuda_plugin.so", "bin/cuda-checkpoint",
            "bin/vmtouch"} <= names
    assert "lib/fast-vllm/libprotobuf-c.so.1" in names
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith(("libc.so", "ld-linux", "libm.so"))]
    assert described["criu"]["version"].startswith("4.2") and described["patches"]
    assert "Patched-by: fast-vllm" in described["criu"]["version_output"]


@pytest.fixture(scope="module")
def prebuilt_cpu_image(prebuilt, build_flags, docker_client):
    """A CPU image built with --criu-prebuilt (no criu stage); removed afterwards."""
    if e2e_device() != "cpu":
        pytest.skip("the CPU image with a prebuilt CRIU is built on CPU CI")
    tag = "fv-test/prebuilt:cpu"
    flags = list(build_flags)
    i = flags.index("--criu-src")
    del flags[i:i + 2]
    # a cuda prebuilt serves a cpu image too (the cpu image leaves the plugin and client out)
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", tag, "--no-bake", *flags, "--criu-prebuilt", str(prebuilt))
    assert r.returncode == 0, r.stderr[-4000:]
    yield tag
    docker_client.images.remove(tag, force=True)


def test_prebuilt_criu_runs_and_checks_in_a_cpu_image(prebuilt_cpu_image, docker_client):
    r = _run(prebuilt_cpu_image, "criu", "--version")
    assert r.returncode == 0 and "Patched-by: fast-vllm" in r.stdout, r.stderr
    r = _run(prebuilt_cpu_image, "fvboot", "check")  # an image built without a bake (--no-bake)
    assert "fvboot check: `criu check`: Looks good." in r.stdout, r.stdout + r.stderr
    assert r.returncode == 1 and "the checkpoint would not be used here: no checkpoint in this image" in r.stdout
    r = _run(prebuilt_cpu_image, "sh", "-c", "ldconfig -p | grep -c fast-vllm; echo ${LD_LIBRARY_PATH:-unset}")
    assert r.stdout.split() == ["0", "unset"], r.stdout  # criu's libraries are private to criu
    r = _run(prebuilt_cpu_image, "sh", "-c", "test ! -e /usr/lib/criu/cuda_plugin.so && vmtouch /usr/local/sbin/criu")
    assert r.returncode == 0, r.stdout + r.stderr
    labels = docker_client.api.inspect_image(prebuilt_cpu_image)["Config"]["Labels"]
    assert "prebuilt" in labels["org.fast-vllm.criu"]


def _broken_prebuilt(prebuilt: Path, dest: Path, empty: str) -> Path:
    """PREBUILT with the library EMPTY cut to nothing: the loader fails on it whatever the base holds."""
    with tarfile.open(prebuilt) as src, tarfile.open(dest, "w:gz") as out:
        for m in src.getmembers():
            if m.name == empty:
                m.size = 0
                out.addfile(m, io.BytesIO(b""))
            else:
                out.addfile(m, src.extractfile(m) if m.isfile() else None)
    return dest


def test_prebuilt_that_does_not_run_in_the_base_is_a_clear_error(prebuilt, tmp_path, docker_client):
    broken = _broken_prebuilt(prebuilt, tmp_path / "broken.tar.gz", "lib/fast-vllm/libnet.so.1")
    base = base_image()
    before = _dangling(docker_client)
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/brokencriu:x", "--no-bake",
                "--device", "cuda", "--base-image", base, "--network", "host",
                "--criu-prebuilt", str(broken))
    _one_line_error(r, f"the prebuilt CRIU does not run in the base image {base}", "libnet.so.1")
    assert not docker_client.images.list(name="fv-test/brokencriu")
    assert _dangling(docker_client) <= before, "the failed build left <none> images"


def test_base_without_python_or_vllm_is_a_clear_error(prebuilt, docker_client, tmp_path):
    if e2e_device() != "cpu":
        pytest.skip("makes a Python-only base with apt (CPU CI); a GPU machine has no network")
    before = _dangling(docker_client)
    # no apt/pip step in a cuda build with a prebuilt CRIU: the plain Debian base reaches fvboot's step
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/novllm:x", "--no-bake",
                "--device", "cuda", "--base-image", "fv-local/debian:bookworm", "--network", "host",
                "--criu-prebuilt", str(prebuilt))
    _one_line_error(r, "the base image fv-local/debian:bookworm has no `python3`")
    ctx = tmp_path / "py"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM fv-local/debian:bookworm\nRUN apt-get update && apt-get install -y "
                                    "--no-install-recommends python3 && rm -rf /var/lib/apt/lists/*\n")
    img, _ = docker_client.images.build(path=str(ctx), tag="fv-test/python-no-vllm:x", network_mode="host", rm=True)
    try:
        r = fvbuild("image", "--model", "synthetic:tiny", "--tag", "fv-test/novllm:x", "--no-bake",
                    "--device", "cuda", "--base-image", "fv-test/python-no-vllm:x", "--network", "host",
                    "--criu-prebuilt", str(prebuilt))
        _one_line_error(r, "no vLLM in the base image fv-test/python-no-vllm:x", "No module named 'vllm'")
    finally:
        docker_client.images.remove("fv-test/python-no-vllm:x", force=True)
    assert not docker_client.images.list(name="fv-test/novllm")
    assert _dangling(docker_client) <= before, "the failed builds left <none> images"


def test_a_rebuild_removes_the_image_it_untagged_but_never_a_tagged_one(build_flags, docker_client, tmp_path):
    """Re-using a tag leaves no full-size <none> image behind, and never deletes an image that
    another tag still names (docker rmi ID of a once-tagged image would)."""
    tag = "fv-test/replace:x"
    base = docker_client.images.get(base_image())
    base.tag("fv-test/replace", "x")  # the tag first names an image that is tagged elsewhere too
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", tag, "--no-bake", *build_flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert docker_client.images.get(base_image()).id == base.id
    built = docker_client.images.get(tag).id
    (tmp_path / "Dockerfile").write_text(f"FROM {base_image()}\nLABEL fv-test=throwaway\n")
    old, _ = docker_client.images.build(path=str(tmp_path), rm=True)
    old.tag("fv-test/replace", "x")  # now the tag names an image nothing else names
    try:
        r = fvbuild("image", "--model", "synthetic:tiny", "--tag", tag, "--no-bake", *build_flags)
        assert r.returncode == 0, r.stderr[-3000:]
        assert docker_client.images.get(tag).id == built
        with pytest.raises(Exception):
            docker_client.images.get(old.id)
    finally:
        docker_client.images.remove(tag, force=True)


def test_vllm_failing_in_the_bake_is_one_clear_error_and_leaves_nothing(build_flags, docker_client):
    """The engine dies during the bake's start (a max length beyond the model's): fvbuild names
    the failure in one line after the bake's own log, tags nothing, leaves no container or image."""
    tag = "fv-test/enginefail:x"
    containers = {c.id for c in docker_client.containers.list(all=True)}
    before = _dangling(docker_client)
    flags = [f for f in build_flags if not f.startswith("--vllm-arg=--max-model-len")]
    r = fvbuild("image", "--model", "synthetic:tiny", "--tag", tag, *flags,
                "--vllm-arg=--max-model-len=1048576", "--bake-timeout", "900")
    assert r.returncode != 0
    own = [l for l in r.stderr.splitlines() if not l.startswith("  bake|")]
    assert "Traceback" not in "\n".join(own), r.stderr[-3000:]
    err = [l for l in own if l.startswith("fvbuild:")]
    assert len(err) == 1 and "bake failed (exit" in err[0], r.stderr[-3000:]
    assert "max_model_len" in r.stderr  # vLLM's own reason is in the bake's log shown above
    # ... and in fvbuild's line, from fvboot's (it said "see its log above", the reason 20 wrapped lines up)
    assert "vLLM said: User-specified max_model_len (1048576) is greater than" in err[0], \
        err[0] + "\n" + r.stderr[-3000:]
    assert not docker_client.images.list(name="fv-test/enginefail")
    assert not docker_client.images.list(name="fvbuild-bake-tmp")
    assert {c.id for c in docker_client.containers.list(all=True)} <= containers
    assert _dangling(docker_client) <= before, "the failed bake left <none> images"


def test_an_interrupted_bake_leaves_no_container_and_no_image(build_flags, docker_client):
    """Tried as an operator would (2026-12-05): Ctrl-C, or SIGTERM from a CI cancel, while the
    bake's vLLM started. fvbuild removed its container and the built image, but not the step
    image below it, which `docker images` then listed as a <none> image of the image's full size,
    and it ended in click's bare "Aborted!" (no `error` event for --json). An image environment of
    its own makes this build's steps its own from there (no cache hit of the suite's build)."""
    import json
    import signal

    tag = "fv-test/interrupted:x"
    containers = {c.id for c in docker_client.containers.list(all=True)}
    before = _dangling(docker_client)
    proc = subprocess.Popen([sys.executable, "-m", "fvbuild.cli", "image", "--model", MODEL, "--tag", tag, "--json",
                             "--env=FVTEST_INTERRUPTED_BUILD=1", *build_flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    try:
        for line in proc.stdout:  # the first line of the bake's own log: its vLLM is starting
            events.append(json.loads(line))
            if events[-1]["event"] in ("bake", "done", "error"):
                break
        assert events and events[-1]["event"] == "bake", events[-3:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    events += [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "Aborted" not in err, err[-3000:]
    assert events[-1] == {"event": "error", "message": "interrupted: no image was tagged, and nothing this"
                                                      " build or its bake made is left"}, events[-3:]
    assert not docker_client.images.list(name="fv-test/interrupted")
    assert not docker_client.images.list(name="fvbuild-bake-tmp")
    assert {c.id for c in docker_client.containers.list(all=True)} <= containers
    assert _dangling(docker_client) <= before, "the interrupted bake left <none> images"


def test_json_progress_is_one_object_per_line_and_ends_in_done_or_error(build_flags, docker_client):
    import json

    tag = "fv-test/json:x"
    try:
        r = fvbuild("image", "--model", "synthetic:tiny", "--tag", tag, "--no-bake", "--json", *build_flags)
        assert r.returncode == 0, r.stderr[-3000:]
        events = [json.loads(line) for line in r.stdout.splitlines()]  # nothing else on stdout
        assert {e["event"] for e in events[:-1]} <= {"step", "log", "note"} and any(e["event"] == "step" for e in events)
        assert events[-1]["event"] == "done" and events[-1]["tag"] == tag and events[-1]["image_bytes"] > 0
    finally:
        docker_client.images.remove(tag, force=True)
    flags = list(build_flags)
    if "--base-image" in flags:
        i = flags.index("--base-image")
        del flags[i:i + 2]
    r = fvbuild("image", "--model", "synthetic:tiny", "--no-bake", "--json", *flags, "--base-image", "fv-missing/nothing:1")
    assert r.returncode != 0
    (event,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert event["event"] == "error" and "fv-missing/nothing:1 is not on this machine" in event["message"]


def _model_files(image: str) -> dict[str, bytes]:
    """The files of IMAGE's model folder, less fvboot's note that it made them (a synthetic model)."""
    files = subprocess.run(["docker", "run", "--rm", "--entrypoint", "tar", image, "c", "-C", "/fv/model", "."],
                           capture_output=True, timeout=120, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(files)) as tf:
        return {Path(m.name).name: tf.extractfile(m).read() for m in tf.getmembers()
                if m.isfile() and m.name != "./fast-vllm-synthetic.json"}


@pytest.mark.skipif(e2e_device() == "cuda", reason="the model is downloaded the same way on a GPU; a second bake"
                    " there costs minutes of device time and a second image on its 64 GB disk")
def test_a_model_from_the_hub_bakes_at_the_revision_given_and_the_image_says_which(build_flags, baked_image, manifest,
                                                                                   port_free):
    """`fvbuild image --model ORG/NAME --revision TAG`, the product's main path, end to end: the
    real client in the bake container downloads from a stand-in Hub on this machine (HF_ENDPOINT,
    reached through --network host; the real Hub cannot be reached here) the commit TAG is at,
    the manifest records that commit, and the image restores and answers as the suite's image of
    the same files does."""
    from stand_in_hub import FakeHub

    from e2e.test_restore import Container, _assert_same_as_bake, _wait_ready

    tagged = "fedcba9876543210fedcba9876543210fedcba98"
    hub = FakeHub(files=_model_files(baked_image), revisions={"v1": tagged})
    tag = "fv-test/hub-model:x"
    try:
        r = fvbuild("image", "--model", "org/tiny", "--revision", "v1", "--served-model-name",
                    manifest["model"]["served_name"], "--tag", tag, *build_flags, f"--env=HF_ENDPOINT={hub.url}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert any(f"/resolve/{tagged}/config.json" in path for path in hub.seen), hub.seen
        baked = json.loads(fvbuild("inspect", tag).stdout)
        assert baked["model"]["source"] == "org/tiny" and baked["model"]["revision"] == tagged, baked["model"]
        with Container(tag) as c:
            _wait_ready(container=c.id)
            _assert_same_as_bake(manifest)  # the suite's image's answers: the same weights
            logs = c.logs()
        assert "restored from checkpoint" in logs, logs[-3000:]
    finally:
        hub.close()
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


@pytest.mark.skipif(e2e_device() == "cuda", reason="the model folder is read the same way on a GPU; a second bake"
                    " there costs minutes of device time and a second image on its 64 GB disk")
def test_a_hugging_face_cache_snapshot_bakes_and_serves_under_the_name_given(build_flags, baked_image, tmp_path,
                                                                              port_free):
    """Tried as an operator would (2026-12-05): `--model ~/.cache/huggingface/hub/models--ORG--NAME/
    snapshots/REV`, whose files are links to ../../blobs: mounted alone, every link dangled in
    the bake container, which then took the path for a repo id ("cannot download ...:
    HFValidationError"); and the model could only be served under that path. The folder's blobs
    are mounted with it, and --served-model-name names it."""
    from e2e.test_restore import Container, _wait_ready

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, (name, data) in enumerate(_model_files(baked_image).items()):
        (repo / "blobs" / f"blob{i}").write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/blob{i}")
    tag = "fv-test/hf-snapshot:x"
    try:
        r = fvbuild("image", "--model", str(snap), "--served-model-name", "org/tiny", "--tag", tag, *build_flags)
        assert r.returncode == 0, r.stderr[-3000:]
        with Container(tag) as c:
            _wait_ready(container=c.id)
            logs = c.logs()
            models = requests.get("http://127.0.0.1:8000/v1/models", timeout=10).json()["data"]
        assert "restored from checkpoint" in logs, logs[-3000:]
        assert [m["id"] for m in models] == ["org/tiny"], models
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def test_bench_says_at_once_that_a_container_ended_before_it_answered(docker_client):
    """A start that ends (a CUDA image's container without its GPUs, a setting it refuses) never
    answers: bench polled for its 30 minutes (found by review, 2026-12-06). The base image's
    shell, given no command, ends at once, as such a start does."""
    import time

    from fvbuild import bench

    base = base_image()
    docker_client.images.get(base)  # the setup script made it
    manifest = {"vllm": {"port": 1}, "model": {"served_name": "m"},
                "probe": [{"prompt": "p", "text": "t", "logprobs": [0]}]}
    t0 = time.monotonic()
    with pytest.raises(bench.BenchError, match=r"the container ended \(exit code 0\) before it answered"):
        bench.first_answer(bench.BenchPlan(base, ("--entrypoint", "sh"), limit_s=120), manifest, [])
    assert time.monotonic() - t0 < 30


def test_a_build_stopped_mid_step_leaves_no_image(tmp_path, docker_client):
    """Ctrl-C while a RUN step runs: the removal ran while the daemon, its client still connected,
    kept the step's container on the newest image, so every image of the build stayed as a
    <none> (found by review, 2026-12-06). Now fvbuild hangs up first, then removes them as the
    daemon lets go. The interrupt comes as Ctrl-C's does, in the stream's read."""
    import signal
    import threading

    from fvbuild.engine import DockerEngine

    base = base_image()
    docker_client.images.get(base)
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo one > /one-{tmp_path.name}\n"
                                         "RUN echo started && sleep 60\n")
    before = _dangling(docker_client)
    gen = DockerEngine.connect().build(tmp_path, network_mode="host")
    with pytest.raises(KeyboardInterrupt):
        for event in gen:
            if getattr(event, "text", "") == "started":  # the second RUN step runs: interrupt the read
                threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    assert _dangling(docker_client) <= before
    leftovers = [c for c in docker_client.containers.list(all=True)
                 if "sleep 60" in " ".join(c.attrs["Config"]["Cmd"] or [])]
    assert not leftovers, leftovers
