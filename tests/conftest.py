"""Shared fixtures: a Docker engine (skip with the reason when none answers, unless CI requires
it), the CPU build inputs found on this machine, and one baked image per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("FV_WORK", REPO / ".fv-work"))


def need(module: str, why: str):
    """Import MODULE for a test module, or skip it saying WHY it is optional. CI sets
    FV_REQUIRE_TEST_DEPS=1: there a missing package is a failure (a skip would hide a missing
    install step in the project's own files)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        msg, err = f"{module} is not installed ({why}); .ci/setup-cpu-host.sh installs it", e
    except OSError as e:  # installed, but a library of it cannot be loaded (a broken or partial install)
        msg, err = (f"{module} is installed but cannot be loaded ({why}); .ci/setup-cpu-host.sh "
                    "checks it and reinstalls it"), e
    if os.environ.get("FV_REQUIRE_TEST_DEPS") == "1":
        pytest.fail(f"{msg} (FV_REQUIRE_TEST_DEPS=1): {err}", pytrace=False)
    pytest.skip(msg, allow_module_level=True)


@pytest.fixture(scope="session")
def c_client(tmp_path_factory):
    """The C cuda-checkpoint client images install, compiled as the image build does."""
    import shutil

    from fvboot import cuda_checkpoint_client

    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("needs a C compiler")
    out = tmp_path_factory.mktemp("c-client") / "cuda-checkpoint"
    source = Path(cuda_checkpoint_client.__file__).with_suffix(".c")
    subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    return out


def flip_bit(path, offset: int) -> None:
    """Flip the lowest bit of the byte at OFFSET of PATH (the smallest damage a disk can do)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def _docker_reason() -> str | None:
    try:
        import docker

        docker.from_env(timeout=10).ping()
        return None
    except Exception as e:  # any failure means: no usable engine
        return f"no Docker engine answers ({type(e).__name__}); run .ci/setup-cpu-host.sh"


@pytest.fixture(scope="session")
def docker_client():
    reason = _docker_reason()
    if reason:
        if os.environ.get("FV_REQUIRE_DOCKER") == "1":
            pytest.fail(reason + " (FV_REQUIRE_DOCKER=1)")
        pytest.skip(reason)
    import docker

    return docker.from_env(timeout=900)


def e2e_device() -> str:
    return os.environ.get("FV_E2E_DEVICE", "cpu")


def base_image() -> str:
    """The local base image fvbuild builds from here (FV_BASE_IMAGE; CPU CI: the Debian that
    .ci/setup-cpu-host.sh debootstraps; GPU CI: the one .ci/gpu-run makes from the machine's files)."""
    return os.environ.get("FV_BASE_IMAGE", "fv-local/debian:bookworm")


@pytest.fixture(scope="session")
def build_flags(docker_client) -> list[str]:
    """fvbuild flags for this machine. CPU CI: the local Debian base, CRIU source, wheels and CA.
    GPU CI (no network): the base image and a prebuilt CRIU it was given, and its GPU access."""
    device = e2e_device()
    flags = ["--device", device, "--network", "host"]
    if device == "cpu":
        flags += ["--base-image", base_image()]
        src_file = WORK / "criu-src.path"
        src = os.environ.get("FV_CRIU_SRC") or (src_file.read_text().strip() if src_file.exists() else "")
        if not src:
            pytest.skip("no CRIU source tarball: run .ci/setup-cpu-host.sh (or set FV_CRIU_SRC)")
        flags += ["--criu-src", src]
        wheels = os.environ.get("FV_WHEELS", "/opt/wheels")
        if Path(wheels).is_dir():
            flags += ["--wheels", wheels]
        ca = os.environ.get("FV_CA_CERT", "/etc/ssl/certs/ca-certificates.crt")
        if Path(ca).is_file():
            flags += ["--ca-cert", ca]
    else:
        if os.environ.get("FV_BASE_IMAGE"):
            flags += ["--base-image", base_image()]
        if os.environ.get("FV_CRIU_PREBUILT"):
            flags += ["--criu-prebuilt", os.environ["FV_CRIU_PREBUILT"]]
        flags += ["--gpu-access", os.environ.get("FV_GPU_ACCESS", "auto")]
        if os.environ.get("FV_NVIDIA_DRIVER_DIR"):
            flags += ["--nvidia-driver-dir", os.environ["FV_NVIDIA_DRIVER_DIR"]]
    # a small KV cache on every device: the suite's model is tiny, and sleep and wake stay quick; requests
    # running at a stop are finished (vLLM aborts them by default: test_a_request_running_when_docker_stop_*)
    args = os.environ.get("FV_E2E_VLLM_ARGS", "--max-model-len=512 --kv-cache-memory-bytes=67108864 --shutdown-timeout=60")
    return flags + [f"--env={IMAGE_ENV}"] + [f"--vllm-arg={a}" for a in args.split()]


# a vLLM setting in the suite's image (`fvbuild image --env`; GPU CI builds its image with it too):
# the bake records it, and a start given another value is refused the checkpoint
IMAGE_ENV = "VLLM_LOGGING_LEVEL=INFO"


def fvbuild(*args: str, env: dict | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would."""
    return subprocess.run([sys.executable, "-m", "fvbuild.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


CANARY = "hf_fastvllm_canary_7d2c41b9e0"
MODEL = os.environ.get("FV_E2E_MODEL", "synthetic:tiny")


@pytest.fixture(scope="session")
def baked_image(build_flags) -> str:
    """Build and bake the test image once per session, with a canary token in the environment.
    FV_E2E_IMAGE names an image already baked that way (GPU CI bakes it in its own step, with
    HF_TOKEN set to CANARY, so the suite does not pay for a second bake)."""
    given = os.environ.get("FV_E2E_IMAGE")
    if given:
        return given
    tag = f"fv-test/{MODEL.replace(':', '-')}:{e2e_device()}"
    r = fvbuild("image", "--model", MODEL, "--tag", tag, *build_flags, env={"HF_TOKEN": CANARY})
    if r.returncode != 0:
        pytest.fail(f"fvbuild image failed ({r.returncode}):\n{r.stderr[-6000:]}")
    assert r.stdout.strip().splitlines()[-1] == tag
    BUILD_OUTPUT[tag] = r.stderr
    return tag


BUILD_OUTPUT: dict[str, str] = {}  # what `fvbuild image` showed while it built each session image


@pytest.fixture(scope="session")
def build_output() -> dict[str, str]:
    """BUILD_OUTPUT, through pytest: a test that imported this module by name could get a copy of
    its own (--import-mode=importlib loads conftest under another name), empty."""
    return BUILD_OUTPUT


def pytest_runtest_logreport(report):
    """FV_FAILURE_LOG=FILE: each failure's text appended as it happens. GPU CI sets it: a run the
    device machine cuts off (10-minute calls) still says why its failed tests failed."""
    path = os.environ.get("FV_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
