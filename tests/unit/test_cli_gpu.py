"""GPU access for the bake container (toolkit or device nodes), and the bake's bounds: what the
container is given, the `docker run` flags for each mode, and what is left after a failed bake."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from fvbuild import bake, gpu
from fvbuild.errors import BakeError, BakeTimeoutError, BaseImageMissingError, ContainerTimeoutError, EngineError, GpuAccessError
from fvbuild.options import GpuAccess, load_options


@pytest.fixture
def host(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    for n in ("nvidia0", "nvidia1", "nvidia10", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
        (dev / n).touch()
    driver = tmp_path / "nvidia"
    (driver / "lib64").mkdir(parents=True)
    (driver / "bin").mkdir()
    return dev, driver


def test_auto_prefers_the_toolkit(host):
    dev, driver = host
    p = gpu.plan(GpuAccess.auto, {"runc", "nvidia"}, dev_root=str(dev))
    assert p.mode is GpuAccess.toolkit
    assert gpu.docker_run_flags(p) == ["--gpus", "all"]
    (req,) = gpu.container_kwargs(p)["device_requests"]
    assert req["Count"] == -1 and req["Capabilities"] == [["gpu"]]


def test_auto_without_the_toolkit_passes_every_gpu_node_and_the_driver(host):
    dev, driver = host
    p = gpu.plan(GpuAccess.auto, {"runc"}, driver, dev_root=str(dev))
    assert p.mode is GpuAccess.devices
    assert p.devices == ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia10", "/dev/nvidiactl",
                         "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
    image_env = ["PATH=/opt/venv/bin:/usr/bin:/bin", "LD_LIBRARY_PATH=/opt/lib", "HF_HOME=/fv"]
    kw = gpu.container_kwargs(p, image_env)
    assert kw["devices"][0] == "/dev/nvidia0:/dev/nvidia0:rwm"
    assert kw["volumes"] == {str(driver): {"bind": str(driver), "mode": "ro"}}
    assert kw["environment"] == {"LD_LIBRARY_PATH": f"{driver}/lib64:/opt/lib",
                                 "PATH": f"{driver}/bin:/opt/venv/bin:/usr/bin:/bin"}
    flags = gpu.docker_run_flags(p)
    assert flags[:2] == ["--device", "/dev/nvidia0"] and "--gpus" not in flags
    assert ["-v", f"{driver}:{driver}:ro"] == flags[flags.index("-v"):flags.index("-v") + 2]
    assert f"LD_LIBRARY_PATH={driver}/lib64" in flags


def test_the_bake_gets_only_the_gpus_vllm_will_use(host):
    """A TP=1 model baked on a host with three GPUs gets GPU 0 alone, so its manifest names one
    GPU and a pod with one GPU can restore it; more than the host has is said before any build."""
    dev, driver = host
    p = gpu.plan(GpuAccess.devices, set(), driver, dev_root=str(dev), count=1)
    assert p.devices == ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
    p = gpu.plan(GpuAccess.devices, set(), driver, dev_root=str(dev), count=2)
    assert p.devices[:3] == ("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl")
    with pytest.raises(GpuAccessError, match=r"^vLLM's arguments need 4 GPUs \(tensor x pipeline x data parallel size\); "
                                             r"this host has 3$"):
        gpu.plan(GpuAccess.devices, set(), driver, dev_root=str(dev), count=4)
    p = gpu.plan(GpuAccess.toolkit, {"nvidia"}, count=2)
    (req,) = gpu.container_kwargs(p)["device_requests"]
    assert req["Count"] == 2 and gpu.docker_run_flags(p) == ["--gpus", "2"]


def test_no_gpu_visible_is_a_clear_error_before_baking(tmp_path):
    with pytest.raises(GpuAccessError, match="no NVIDIA device nodes on this host and no nvidia runtime in docker info"):
        gpu.plan(GpuAccess.auto, {"runc"}, dev_root=str(tmp_path))
    with pytest.raises(GpuAccessError, match="lists no nvidia runtime"):
        gpu.plan(GpuAccess.toolkit, {"runc"}, dev_root=str(tmp_path))


def test_devices_mode_needs_the_driver_folder(host, monkeypatch):
    dev, _ = host
    monkeypatch.setattr(gpu, "guess_driver_dir", lambda: None)
    with pytest.raises(GpuAccessError, match="--nvidia-driver-dir"):
        gpu.plan(GpuAccess.devices, set(), dev_root=str(dev))
    (dev / "nvidia-uvm").unlink()
    with pytest.raises(GpuAccessError, match="nvidia-uvm missing"):
        gpu.plan(GpuAccess.devices, set(), Path("/"), dev_root=str(dev))


# ---- the bake container, with a fake Docker ---------------------------------------------------------

class FakeContainer:
    """The engine's RunningContainer, as a bake that succeeds, fails or never ends would act, or
    as one whose Docker daemon went away mid-bake (then removing it fails too)."""

    def __init__(self, outcome):
        self.outcome, self.removed, self.committed = outcome, False, False

    def log_lines(self):
        yield "fvboot: starting vLLM"
        if self.outcome == "hang":
            threading.Event().wait(5)

    def wait(self, timeout):
        self.wait_timeout = timeout
        if self.outcome == "hang":
            raise ContainerTimeoutError(f"the container did not exit within {timeout:.0f} s")
        if self.outcome == "daemon":
            raise EngineError("lost the Docker daemon while waiting for the container (Connection aborted.)")
        return 0 if self.outcome == "ok" else 3

    def read_file(self, path):
        return None

    def remove(self):
        self.removed = True
        if self.outcome == "daemon":
            raise EngineError("docker rm failed: Cannot connect to the Docker daemon")

    def commit(self, ref):
        self.committed = True


class FakeEngine:
    def __init__(self, outcome):
        self.container = FakeContainer(outcome)
        self.removed, self.tags, self.run_kwargs = [], [], None

    def inspect(self, ref):
        return {"Config": {"Env": ["PATH=/usr/bin:/bin"]}}

    def run_criu_container(self, image, command, network_mode, **kw):
        self.run_kwargs = kw
        return self.container

    def remove_image(self, ref, **kw):
        self.removed.append(ref)

    def tag(self, image_id, ref):
        self.tags.append(ref)


@pytest.mark.parametrize("outcome, error", [("hang", BakeTimeoutError), ("fail", BakeError),
                                            ("ok", BakeError),  # ok, but no manifest written
                                            ("daemon", BakeError)])
def test_a_failed_or_endless_bake_leaves_no_container_no_tag_no_temp_image(outcome, error, host):
    dev, driver = host
    opts = load_options({"model": "synthetic:tiny", "bake_timeout_s": 60})
    engine = FakeEngine(outcome)
    plan = gpu.plan(GpuAccess.devices, set(), driver, dev_root=str(dev))
    with pytest.raises(error) as e:
        bake.bake_image(engine, opts, "sha256:" + "a" * 64, "fv/x:y", lambda line: None, plan)
    if outcome == "hang":
        assert "did not finish within 60 s (--bake-timeout)" in str(e.value)
        assert engine.container.wait_timeout == 60
    if outcome == "ok":
        assert str(e.value) == "the bake wrote no /fv/manifest.json"
    if outcome == "daemon":
        assert str(e.value).startswith("bake failed: lost the Docker daemon while waiting")
    assert engine.container.removed and not engine.container.committed
    assert engine.tags == [] and len(engine.removed) == 1
    assert re.fullmatch(r"fvbuild-bake-tmp:a{12}-[0-9a-f]{8}", engine.removed[0]), engine.removed
    # the GPU plan reached the container: device nodes, driver mount, its environment
    assert engine.run_kwargs["devices"][0] == "/dev/nvidia0:/dev/nvidia0:rwm"
    assert engine.run_kwargs["volumes"][str(driver)] == {"bind": str(driver), "mode": "ro"}
    assert engine.run_kwargs["environment"]["PATH"] == f"{driver}/bin:/usr/bin:/bin"


def test_two_bakes_of_the_same_built_image_each_clean_up_only_their_own_temporary_image(host):
    """Two builds of one model (two tags, a CI matrix) have the same built image; the bake's
    temporary image was named after it alone, so one build's clean-up could remove, and its
    commit replace, the other's bake while that one still made its layers from it."""
    refs = []
    for _ in range(2):
        engine = FakeEngine("fail")
        with pytest.raises(BakeError):
            bake.bake_image(engine, load_options({"model": "synthetic:tiny", "bake_timeout_s": 60}),
                            "sha256:" + "a" * 64, "fv/x:y", lambda line: None)
        refs += engine.removed
    assert len(refs) == 2 and refs[0] != refs[1], refs


def test_the_baked_image_takes_its_config_from_the_built_image_not_the_bake_container():
    """The bake container's environment (driver paths, token file path) is never committed: the
    final image is FROM the built image, and only /fv folders come from the bake container."""
    from fvbuild.render import render_template

    df = render_template("baked.Dockerfile.j2", bake.BakeLayersContext("0", "sha256:built", "bake:tmp", ()))
    froms = [l for l in df.splitlines() if l.startswith("FROM ")]
    assert froms == ["FROM sha256:built"]
    assert all(l.split()[1:3] == ["--from=bake:tmp", l.split()[2]] and l.split()[2].startswith("/fv/")
               for l in df.splitlines() if l.startswith("COPY"))
    assert "ENV" not in df


def test_run_flags_helper_gives_the_restore_the_same_access(host):
    dev, driver = host
    assert gpu.gpu_run_flags("toolkit", runtimes={"nvidia"}) == ["--gpus", "all"]
    with pytest.raises(GpuAccessError):
        gpu.gpu_run_flags("toolkit", runtimes={"runc"})


class _LabelledEngine:
    """Docker stood in for: an image with LABELS, a daemon without NVIDIA's runtime."""

    def __init__(self, labels: dict | None) -> None:
        self.labels = labels

    def inspect(self, ref: str) -> dict:
        if self.labels is None:
            raise BaseImageMissingError(f"image {ref} does not exist")
        return {"Config": {"Labels": self.labels}}

    def runtimes(self) -> set[str]:
        return {"runc"}


@pytest.mark.parametrize("labels, argv, ok, words", [
    ({"org.fast-vllm.device": "cpu"}, ["img:cpu"], True, []),
    ({"org.fast-vllm.device": "cpu"}, ["img:cpu", "--device", "cpu"], True, []),
    ({"org.fast-vllm.device": "cpu"}, ["img:cpu", "--device", "cuda"], False, ["--device cuda: img:cpu is a cpu image"]),
    ({}, ["img:other"], False, ["img:other is not a fast-vllm image", "fvbuild image"]),
    (None, ["img:elsewhere"], False, ["image img:elsewhere is not on this machine: docker pull it first", "--device cuda|cpu"]),
    ({"org.fast-vllm.device": "cuda"}, ["img:cuda"], False, ["no NVIDIA device nodes on this host"]),
    ({}, [], False, ["no NVIDIA device nodes on this host", "a CPU image needs no GPU: fvbuild run-flags IMAGE, or --device cpu"]),
], ids=["cpu-image", "cpu-image-cpu", "cpu-image-asked-cuda", "not-ours", "not-here", "cuda-image-no-gpu", "no-image-no-gpu"])
def test_run_flags_take_the_device_from_the_image_and_say_what_to_do_without_a_gpu(monkeypatch, labels, argv, ok, words):
    """`fvbuild run-flags IMAGE` on a host without a GPU: a CPU image gets CRIU's flags alone;
    anything else is one line saying what to do, never a traceback (and no --no-bake advice,
    which is the build's)."""
    from click.testing import CliRunner

    from fvbuild.cli import main
    from fvboot.capabilities import docker_run_flags
    from fvbuild.engine import DockerEngine

    monkeypatch.setattr(gpu, "gpu_nodes", lambda *a, **k: ())
    monkeypatch.setattr(DockerEngine, "connect", classmethod(lambda cls, *a, **k: _LabelledEngine(labels)))
    r = CliRunner().invoke(main, ["run-flags", *argv])
    if ok:
        assert r.exit_code == 0, r.output
        assert r.stdout.split() == docker_run_flags()
        return
    assert r.exit_code not in (0, None)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--no-bake" not in lines[0], r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_a_build_without_a_gpu_to_bake_on_says_it_can_build_without_the_checkpoint(monkeypatch, tmp_path):
    """The build's own way out, which run-flags does not offer."""
    monkeypatch.setattr(gpu, "gpu_nodes", lambda *a, **k: ())
    opts = load_options({"model": "synthetic:tiny", "device": "cuda"})
    with pytest.raises(GpuAccessError, match=r"no NVIDIA device nodes.*\(--no-bake\)"):
        bake.gpu_plan(_LabelledEngine({}), opts)
