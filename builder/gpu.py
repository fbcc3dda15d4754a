"""GPU access for the bake container, with or without the NVIDIA container toolkit.

`toolkit`: Docker's NVIDIA runtime does it (`--gpus all`, a DeviceRequest). `devices`: hosts
without the toolkit get the device nodes and the driver's folder (read-only, same path) and the
environment that finds it. `auto` takes the toolkit when `docker info` lists the nvidia runtime,
else device nodes when the host has them. The same plan gives the `docker run` flags a user needs
for the restore, so the README, the GPU tests and the bake cannot drift apart.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .errors import GpuAccessError
from .options import GpuAccess

CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
DEFAULT_DRIVER_DIR = Path("/usr/local/nvidia")


@dataclass(frozen=True)
class GpuPlan:
    """How one container gets the GPUs: exactly one of a device request or device nodes + driver dir."""

    mode: GpuAccess
    devices: tuple[str, ...] = ()
    driver_dir: Optional[str] = None
    lib_dirs: tuple[str, ...] = field(default=())
    bin_dir: Optional[str] = None
    count: Optional[int] = None  # the first COUNT GPUs only (None: all of them)


def gpu_nodes(dev_root: str = "/dev") -> tuple[str, ...]:
    """Every /dev/nvidiaN of this host, in numeric order."""
    nodes = [p for p in glob.glob(f"{dev_root}/nvidia[0-9]*") if p[len(dev_root) + 7:].isdigit()]
    return tuple(sorted(nodes, key=lambda p: int(p[len(dev_root) + 7:])))


def guess_driver_dir() -> Optional[Path]:
    """/usr/local/nvidia when it exists, else the folder above a driver's own bin/nvidia-smi;
    never a system folder (mounting /usr over the container's would replace its whole userland)."""
    if DEFAULT_DRIVER_DIR.is_dir():
        return DEFAULT_DRIVER_DIR
    smi = shutil.which("nvidia-smi")
    if smi:
        top = Path(smi).resolve().parent.parent
        if str(top) not in ("/", "/usr", "/usr/local") and any((top / d).is_dir() for d in ("lib64", "lib")):
            return top
    return None


def plan(mode: GpuAccess, runtimes: Iterable[str], driver_dir: Optional[Path] = None,
         dev_root: str = "/dev", count: Optional[int] = None) -> GpuPlan:
    """Decide how the bake container reaches the GPUs; GpuAccessError (before any bake) if it cannot.
    COUNT: give it only the first COUNT GPUs, the ones vLLM will use. The manifest then names just
    those, and a restore needs only them: a pod with one GPU restores an image that was baked on a
    host with eight."""
    has_runtime = "nvidia" in set(runtimes)
    nodes = gpu_nodes(dev_root)
    if mode is GpuAccess.auto:
        if has_runtime:
            mode = GpuAccess.toolkit
        elif nodes:
            mode = GpuAccess.devices
        else:
            raise GpuAccessError(
                "no NVIDIA device nodes on this host and no nvidia runtime in docker info: run on a GPU "
                "host, or install the NVIDIA container toolkit (--gpu-access toolkit)")
    if mode is GpuAccess.toolkit:
        if not has_runtime:
            raise GpuAccessError("--gpu-access toolkit: docker info lists no nvidia runtime; install the "
                                 "NVIDIA container toolkit or use --gpu-access devices")
        return GpuPlan(GpuAccess.toolkit, count=count)
    if not nodes:
        raise GpuAccessError(f"--gpu-access devices: no {dev_root}/nvidia[0-9]* device nodes on this host")
    control = tuple(n.replace("/dev", dev_root, 1) for n in CONTROL_NODES)
    missing = [n for n in control[:2] if not os.path.exists(n)]
    if missing:
        raise GpuAccessError(f"--gpu-access devices: {', '.join(missing)} missing (is the NVIDIA driver loaded? "
                             "`nvidia-modprobe -u -c 0` creates the UVM nodes)")
    ddir = driver_dir or guess_driver_dir()
    if ddir is None:
        raise GpuAccessError("--gpu-access devices: cannot find the NVIDIA driver's folder (no /usr/local/nvidia); "
                             "pass --nvidia-driver-dir DIR (the folder with lib64/libcuda.so.1 and bin/nvidia-smi)")
    libs = tuple(str(ddir / d) for d in ("lib64", "lib") if (ddir / d).is_dir())
    if not libs:
        raise GpuAccessError(f"--nvidia-driver-dir {ddir}: no lib64/ or lib/ folder with the driver's libraries")
    if count is not None:
        if len(nodes) < count:
            raise GpuAccessError(f"vLLM's arguments need {count} GPUs (tensor x pipeline x data parallel size); "
                                 f"this host has {len(nodes)}")
        nodes = nodes[:count]
    devices = nodes + tuple(n for n in control if os.path.exists(n))
    return GpuPlan(GpuAccess.devices, devices=tuple(d.replace(dev_root, "/dev", 1) for d in devices),
                   driver_dir=str(ddir), lib_dirs=libs, bin_dir=str(ddir / "bin") if (ddir / "bin").is_dir() else None,
                   count=count)


def environment(p: GpuPlan, image_env: Iterable[str] = ()) -> dict[str, str]:
    """Variables the container needs to find the driver, prepended to the image's own values
    (a run-time variable replaces the image's). Given to the bake container only: its config is
    never committed, the final image is built FROM the unbaked image."""
    if p.mode is not GpuAccess.devices:
        return {}
    env = dict(e.split("=", 1) for e in image_env if "=" in e)
    ldp = ":".join([*p.lib_dirs, *([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])])
    out = {"LD_LIBRARY_PATH": ldp}
    if p.bin_dir and env.get("PATH"):  # unknown image PATH: leave it alone (a default would drop its venv)
        out["PATH"] = f"{p.bin_dir}:{env['PATH']}"
    return out


def container_kwargs(p: GpuPlan, image_env: Iterable[str] = ()) -> dict:
    """docker-py `containers.run` arguments for the plan."""
    if p.mode is GpuAccess.toolkit:
        from docker.types import DeviceRequest

        return {"device_requests": [DeviceRequest(count=p.count or -1, capabilities=[["gpu"]])]}
    return {"devices": [f"{d}:{d}:rwm" for d in p.devices],
            "volumes": {p.driver_dir: {"bind": p.driver_dir, "mode": "ro"}},
            "environment": environment(p, image_env)}


def docker_run_flags(p: GpuPlan, image_env: Iterable[str] = ()) -> list[str]:
    """The same access as `docker run` flags (README, GPU tests and benchmarks use these)."""
    if p.mode is GpuAccess.toolkit:
        return ["--gpus", str(p.count) if p.count else "all"]
    flags = [f for d in p.devices for f in ("--device", d)]
    flags += ["-v", f"{p.driver_dir}:{p.driver_dir}:ro"]
    for k, v in environment(p, image_env).items():
        flags += ["-e", f"{k}={v}"]
    return flags


def gpu_run_flags(mode: str | GpuAccess = GpuAccess.auto, driver_dir: Optional[str | Path] = None,
                  runtimes: Optional[Iterable[str]] = None) -> list[str]:
    """`docker run` flags that give a container the GPUs the way the bake got them (runtimes from
    `docker info` unless given). With engine.docker_run_flags() this is a restore's whole line."""
    if runtimes is None:
        from .engine import DockerEngine

        runtimes = DockerEngine.connect().runtimes()
    return docker_run_flags(plan(GpuAccess(mode), runtimes, Path(driver_dir) if driver_dir else None))
