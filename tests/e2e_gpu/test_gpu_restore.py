"""What only a GPU has: restore onto the GPU (CUDA state through CRIU's cuda plugin and
fv-cuda-checkpoint) and the fallback when the baked GPU differs. Everything else is the shared
suite in tests/e2e, which GPU CI runs with FV_E2E_DEVICE=cuda:

    FV_E2E_DEVICE=cuda FV_REQUIRE_DOCKER=1 python3 -m pytest -ra -m "docker or gpu" tests

These tests skip here (no GPU, no Docker GPU runtime) with that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from e2e.test_restore import port_free  # noqa: F401  (the compose service holds the baked port)

pytestmark = [pytest.mark.gpu, pytest.mark.docker, pytest.mark.usefixtures("port_free")]


def _gpu_reason() -> str | None:
    if shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode:
        return "no NVIDIA GPU on this machine"
    from fvbuild.errors import FvBuildError
    from fvbuild.gpu import gpu_run_flags

    try:  # NVIDIA's runtime, or device nodes + the driver's folder (FV_GPU_ACCESS=devices)
        gpu_run_flags(os.environ.get("FV_GPU_ACCESS", "auto"), os.environ.get("FV_NVIDIA_DRIVER_DIR"))
    except FvBuildError as e:
        return f"Docker cannot give a container this GPU: {e}"
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


@pytest.mark.parametrize("setting", ["FV_WAKE_MEMORY=helper", "FV_WAKE_MEMORY=engine",
                                     "FV_WAKE_MEMORY=engine FV_WAKE_ORDER=kv-beside",
                                     "FV_WAKE_MEMORY=engine FV_WEIGHT_STAGING_YIELD=resume"])
def test_restore_with_the_weights_staged_on_the_gpu_during_the_restore(baked_image, setting):
    """The default on one GPU (FV_WEIGHT_STAGING=auto, FV_WAKE_MEMORY=helper): a process of
    fvboot's makes the sleeping engine's memory (weights' pool, KV cache) while CRIU restores,
    puts the dump straight into the weights' part, and the worker's wakes map it; the stager's
    check of the dump is the gate's weight check: restored, with the baked answers. With
    FV_WAKE_MEMORY=engine the stager stages a copy the worker takes device to device; with
    FV_WAKE_ORDER=kv-beside too, in a thread while the engine wakes the KV cache (the GPU has
    room for both here); with FV_WEIGHT_STAGING_YIELD=resume the stager waits while the CUDA
    resume runs."""
    from e2e.test_restore import Container, _assert_same_as_bake, _wait_ready

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    with Container(baked_image, *[a for one in setting.split() for a in ("-e", one)]) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(m)
        logs = c.logs()
    assert "restored from checkpoint" in logs, logs[-3000:]
    helper = setting == "FV_WAKE_MEMORY=helper"  # the dump put straight into the weights it adopts
    how = "weights: put in place by the stager" if helper else "weights: taken from the stager's copy on the GPU"
    assert how in logs, logs[-3000:]
    assert "weights checked by the stager" in logs
    beside = "KV cache awake (beside the staged copy)" in logs
    assert beside == ("FV_WAKE_ORDER=kv-beside" in setting), logs[-3000:]
    assert ("yielded to the CUDA resume" in logs) == ("FV_WEIGHT_STAGING_YIELD=resume" in setting), logs[-3000:]
    assert ('"memory adopted"' in logs) == helper, logs[-3000:]


@pytest.mark.parametrize("setting", ["", "FV_WAKE_MEMORY=engine"])
def test_a_damaged_weight_byte_with_the_weights_staged_falls_back(baked_image, setting):
    """The stager's copy is put in place (or, with FV_WAKE_MEMORY=engine, taken), but its check
    of the dump finds the flipped byte: the gate stays shut and the normal start serves the
    baked answers."""
    from e2e.test_restore import FLIP_EMBEDDING_BYTE, _fallback

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    _fallback(baked_image, m, (f"export {setting} && " if setting else "") + FLIP_EMBEDDING_BYTE, "checksum mismatch")


@pytest.mark.parametrize("field, value, reason", [
    ("name", "NVIDIA Imaginary 1", "this machine has"),
    ("driver", "1.0.0", "baked with driver 1.0.0"),
])
def test_manifest_from_another_gpu_or_driver_falls_back(baked_image, field, value, reason):
    """An image baked on another GPU model or driver starts normally, says why, answers right."""
    from e2e.test_restore import _fallback

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    target = "m['device']['gpus'][0]['name']" if field == "name" else "m['device']['driver']"
    edit = (f"python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));"
            f"{target}='{value}';json.dump(m,open(p,'w'))\"")
    _fallback(baked_image, m, edit, reason)


def test_a_device_map_the_driver_refuses_falls_back_at_once(baked_image):
    """The manifest names a GPU the checkpoint never ran on (a mismatched or tampered image), so
    fvboot asks to move it onto this GPU; the driver refuses a map without the checkpointed GPU,
    CRIU still ends its restore, and fvboot reads the cuda plugin's error instead of waiting on a
    server whose CUDA calls would block: fallback within a minute, named, same answers. (A real
    move onto another GPU of the same model needs a second GPU.)"""
    from e2e.test_restore import Container, _assert_same_as_bake, _wait_ready

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    fake = "GPU-00000000-0000-0000-0000-000000000000"
    edit = ("python3 -c \"import json;p='/fv/manifest.json';m=json.load(open(p));"
            f"m['device']['gpus'][0]['uuid']='{fake}';"
            "json.dump(m,open(p,'w'))\" && exec fvboot")
    with Container(baked_image, entry=["sh", "-c", edit]) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(m, exact=False)
        logs = c.logs()
    assert f"restoring onto other GPUs of the same model: {fake}=" in logs
    line = next((l for l in logs.splitlines() if "checkpoint not used" in l), "")
    assert f"the GPU state was not resumed (onto other GPUs: {fake}=" in line, logs[-3000:]
    from fvbuild.bench import timeline_marks

    assert next(m["t"] for m in timeline_marks(logs) if m["event"] == "fallback start") < 60, line


def _second_gpu_flags() -> list[str] | None:
    """`docker run` flags that give a container the host's second GPU as its only one, at the
    first GPU's path (as another node's GPU 0 would be): None on a host with one GPU."""
    from fvbuild.gpu import gpu_nodes

    from e2e.test_restore import gpu_flags

    if len(gpu_nodes()) < 2:
        return None
    flags = gpu_flags()
    if "--gpus" in flags:
        i = flags.index("--gpus")
        return flags[:i] + ["--gpus", "device=1"] + flags[i + 2:]
    return _swap_device_nodes(flags)


def _swap_device_nodes(flags: list[str]) -> list[str]:
    """Device-node flags with /dev/nvidia1 (at /dev/nvidia0 inside) as the only GPU node."""
    out, i = [], 0
    while i < len(flags):
        if flags[i] == "--device" and flags[i + 1][len("/dev/nvidia"):].isdigit():
            if flags[i + 1] == "/dev/nvidia1":
                out += ["--device", "/dev/nvidia1:/dev/nvidia0"]
            i += 2
            continue
        out.append(flags[i])
        i += 1
    return out


def test_restore_onto_another_gpu_of_the_same_model(baked_image):
    """The product's promise on a second GPU of the model (another node's GPU 0, as far as one host
    can show it): the baked GPU's UUID is mapped onto this one's, the restore answers as baked.
    Needs a host with two GPUs (the device tool's nvidia-h200-x2)."""
    from e2e.test_restore import CAPS, _assert_same_as_bake, _wait_ready

    flags = _second_gpu_flags()
    if flags is None:
        pytest.skip("needs a second GPU of the same model (one GPU on this host)")
    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    baked_uuid = m["device"]["gpus"][0]["uuid"]
    cid = subprocess.run(["docker", "run", "-d", *CAPS, *flags, baked_image], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        _wait_ready(container=cid)
        _assert_same_as_bake(m)
        r = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
        logs = r.stdout + r.stderr
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    assert f"restoring onto other GPUs of the same model: {baked_uuid}=GPU-" in logs, logs[-3000:]
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-3000:]


def test_load_settings_of_this_start_reach_the_restored_worker(baked_image):
    """FV_LOAD_* given at `docker run` reach the restored worker, whose environment is the
    bake's, where it loads the weights itself (here: no staging, the pinned ring forced): the
    load it reports ran with this start's buffer size, not the default 32 MiB (how many buffers
    it used is the ring's own choice below FV_LOAD_BUFFERS: 2 of 3 asked for, H100 2026-12-05).
    (A value out of range ends the start before anything runs:
    test_a_bad_setting_ends_the_start_at_once_and_a_misspelt_one_is_said.)"""
    from e2e.test_restore import Container, _assert_same_as_bake, _wait_ready

    m = json.loads(subprocess.run(["fvbuild", "inspect", baked_image], capture_output=True, text=True,
                                  check=True).stdout)
    env = ["FV_WEIGHT_STAGING=off", "FV_LOAD_REGISTER=0", "FV_LOAD_BUFFER_MB=8"]
    with Container(baked_image, *[a for e in env for a in ("-e", e)]) as c:
        _wait_ready(container=c.id)
        _assert_same_as_bake(m)
        logs = c.logs()
    assert "restored from checkpoint" in logs and "checkpoint not used" not in logs, logs[-3000:]
    [line] = [ln for ln in logs.splitlines() if "weights: [" in ln]
    assert "'direction': 'load'" in line and "'buffer_mb': 8," in line, line
