"""Whether this image's checkpoint can serve in this container: what a start checks before CRIU
runs (and `fvboot check` runs alone). Each check returns why not, or None; `check_compatible`
runs them in order and raises the first reason as a CheckpointUnusable, on which the start
serves vLLM started normally. What a restored server cannot take from this start (another user,
capabilities, arguments, settings, another device, model folder or Python packages) is refused
here, before anything runs, never found mid-restore.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from . import capabilities, manifest, mounts, packages, pids, ports, private_mounts, proc_guard, sockets
from .devices import DeviceLookup
from .errors import CheckpointUnusable
from .launcher import (adds_nothing, arg_value, args_from_env, library_settings, shown_args, vllm_settings,
                       vllm_settings_changed)
from .layout import Layout
from .manifest import Device, Manifest
from .output import log


def read_checkpoint_manifest(layout: Layout) -> Manifest:
    """This image's manifest, read and valid; CheckpointUnusable where the image has none or it
    cannot be read (a ManifestInvalid, one, naming the field, where it is not one)."""
    if not layout.manifest.exists():
        raise CheckpointUnusable(f"no checkpoint in this image ({layout.manifest} is missing)")
    try:
        return manifest.read(layout.manifest)
    except OSError as e:  # a folder there, no read permission: said as a missing one is
        raise CheckpointUnusable(f"cannot read {layout.manifest}: {e.strerror}") from None


def check_compatible(m: Manifest, layout: Layout, run_args: list[str],
                     devices: Optional[DeviceLookup] = None, port: bool = True) -> Device:
    """Raise CheckpointUnusable with the reason if this checkpoint cannot serve here; return this
    machine's device info (the restore maps GPUs with it; DEVICES: a lookup started earlier).
    M's format was checked when it was read. PORT=False leaves out whether the port is free
    (`fvboot check` beside this container's own server, which holds it)."""
    _refuse(_user())
    _refuse(_capabilities(m))
    _refuse(_own_mounts())
    _refuse(pids.lacking_room(m.criu.tasks if m.criu else None))  # CRIU's "Unable to create a thread: -11"
    _refuse(_run_asks_for_another_server(m, run_args))
    _refuse(_settings(m))
    here = manifest.device_info(devices)
    _refuse(_device(m.device, here))
    _refuse(_addresses(m))
    _refuse(_mounts(m))
    _refuse(manifest.verify_files(layout.home, m.files))
    _refuse(manifest.verify_named_files(m.named_files, m.named_folders))
    _refuse(_packages(m))
    _refuse(_proc_guards(m))
    _refuse(None if shutil.which("criu") else "criu is not on PATH")
    if port:  # CRIU could not put the listening socket back (the normal start says what to do)
        _refuse(ports.taken(m.vllm.port, arg_value(list(m.vllm.command), "--host")))
    return here


def _refuse(reason: Optional[str]) -> None:
    if reason:
        raise CheckpointUnusable(reason)


def _user() -> Optional[str]:
    if os.geteuid() != 0:  # CRIU restores a tree of root's processes, and fvboot mounts for it
        return (f"fvboot runs as uid {os.geteuid()} (docker run --user?), and a restore needs root with CRIU's"
                " capabilities: run the image as root, with the flags `fvbuild run-flags IMAGE` prints (the served"
                " tree gives the capabilities up either way)")
    return None


def _own_mounts() -> Optional[str]:
    if private_mounts.not_isolated:  # the restored tree's /dev/shm and settings are bound from fvboot's
        why = private_mounts.not_isolated
        return (f"fvboot could not make its own /dev/shm ({why}): a restored server's shared-memory files and"
                " settings would be this container's as given (under --ipc=host, the host's)")
    return None


def _capabilities(m: Manifest) -> Optional[str]:
    lacking = capabilities.restore_lacks(m.criu.capabilities if m.criu else None, capabilities.permitted())
    if lacking:  # checked here: CRIU's restorer would fail on them only mid-restore (it hung)
        return (f"this container lacks what a restore needs (missing capability: {', '.join('CAP_' + c for c in lacking)}):"
                " CRIU's own, and those the checkpoint's processes held at bake, which CRIU can give back only if it"
                " holds them (docker run --cap-drop ALL, or Kubernetes' drop: [ALL]?); add them: "
                + " ".join(f"--cap-add {c}" for c in lacking))
    return None


def _run_asks_for_another_server(m: Manifest, run_args: list[str]) -> Optional[str]:
    """The checkpoint listens on its baked port, under its baked name, with its baked arguments."""
    asked = args_from_env(list(m.vllm.command))
    if asked:
        port, name = arg_value(asked, "--port"), arg_value(asked, "--served-model-name")
        wants = []
        if port:
            wants.append(f"FV_PORT={port} asks for port {port}, and a restored server listens on the baked"
                         f" {m.vllm.port} (to keep the restore, publish that one instead: docker run -p"
                         f" {port}:{m.vllm.port})")
        if name:
            wants.append(f"FV_SERVED_MODEL={name!r} asks for that name, and a restored server keeps the"
                         f" baked {m.model.served_name!r}")
        return "; ".join(wants) + "; the normal start serves as asked"
    baked_args = list(m.vllm.args)
    if run_args and run_args != baked_args and not adds_nothing(list(m.vllm.command), run_args):
        return (f"arguments {shown_args(run_args)} were given, and a restored server has only the baked ones"
                f" {shown_args(baked_args)}; the normal start adds them after those")
    return None


def _settings(m: Manifest) -> Optional[str]:
    changed = vllm_settings_changed(dict(m.vllm.env), vllm_settings()) if m.vllm.env is not None else ""
    if changed:  # the restored processes keep the bake's environment: the normal start gets this one
        return (f"vLLM's settings differ from the bake's: {changed}; a restored server keeps the bake's environment"
                " (bake them into the image: fvbuild image --env NAME=VALUE)")
    ignored = vllm_settings_changed(dict(m.vllm.library_env), library_settings()) \
        if m.vllm.library_env is not None else ""
    if ignored:  # said only: a platform may set them on every container
        log(f"{ignored}: a restored server keeps the bake's (they act when its processes start); FV_RESTORE=0"
            " gives a normal start that has them, or bake them into the image (fvbuild image --env NAME=VALUE)")
    return None


def _device(baked: Device, here: Device) -> Optional[str]:
    if baked.kind != here.kind:
        return f"baked on {baked.kind}, running on {here.kind}"
    if baked.kind == "cpu" and baked.cpus and here.cpus and baked.cpus != here.cpus:
        log(cpus_differ(baked.cpus, here.cpus))  # said only: the restore serves the same answers
    lacking = sorted(set(baked.cpu_isa) - set(here.cpu_isa)) if here.cpu_isa else []
    if lacking:  # the restored processes chose their kernels on the bake's CPU
        return (f"baked on a CPU with {', '.join(lacking)}, which this CPU lacks: bake on the oldest CPU the image"
                " will run on")
    if here.is_cuda:
        b_names = [g.name for g in baked.gpus]
        h_names = [g.name for g in here.gpus][: len(b_names)]
        if b_names != h_names:
            return f"baked on {b_names}, this machine has {h_names}"
        if baked.driver != here.driver:
            return f"baked with driver {baked.driver}, this machine has {here.driver}"
    return None


def _addresses(m: Manifest) -> Optional[str]:
    missing = sockets.missing_here(m.criu.addresses) if m.criu else []
    if missing:
        return (f"the checkpoint's sockets are bound to {', '.join(missing)}, which this container's network does"
                f" not have (the bake container's own address); bake the image again: {sockets.KEPT_ON_LOOPBACK}")
    return None


def _mounts(m: Manifest) -> Optional[str]:
    missing = mounts.missing_here(m.criu.mounts) if m.criu and m.criu.mounts else []
    if missing:  # CRIU would bind each from here; it says only "Can't stat mountpoint", late
        return (f"this container has no {', '.join(missing)}, which the checkpoint's mounts are bound from (the"
                " bake's container runtime mounted them: a runtime that mounts them too, such as Docker, Podman"
                " or Kubernetes, restores)")
    return None


def _proc_guards(m: Manifest) -> Optional[str]:
    """The restored tree's /proc is the bake's, guards and all: refused where the bake's had
    fewer guards than this container's runtime puts on (a bake under --privileged or
    systempaths=unconfined): a read-only part of /proc it left writable, or no mask at all. A
    mask only this container has is a path the bake's kernel may not have had (/proc/asound,
    /proc/scsi: kernel options): said, not refused. The normal start carries this container's."""
    if m.criu is None:
        return None
    if m.criu.proc_guards is None:
        return ("the checkpoint's server has a /proc without the container's guards (baked by an fvboot of before"
                " 2026-12-06): restored, it could change the host's kernel settings; bake the image again")
    here, baked = proc_guard.container_guards(), set(m.criu.proc_guards)
    masks = {g.path for g in here if not g.read_only}
    unguarded = sorted({g.path for g in here if g.read_only} - baked) or \
        (sorted(masks) if masks and not masks & baked else [])
    if unguarded:
        return (f"this container's runtime guards {', '.join(unguarded)}, which the checkpoint's server has"
                " unguarded (baked in a container with fewer guards: --privileged, --security-opt"
                " systempaths=unconfined?); restored, it could read or change them: bake the image under the"
                " runtime's default guards")
    if masks - baked:
        log(f"note: this container's runtime hides {', '.join(sorted(masks - baked))} in /proc, which the bake's"
            " kernel did not show: not hidden from the restored server")
    return None


def _packages(m: Manifest) -> Optional[str]:
    other = packages.changed(m.packages) if m.packages is not None else None
    if other:  # the restored server runs the code it imported at the bake
        return (f"the Python packages are not the ones the server was baked with: {other} (an image built FROM"
                " this one?); the normal start imports them as they are now")
    return None


def cpus_differ(baked: int, here: int) -> str:
    """What a restored CPU engine does on another number of CPUs than the bake's: vLLM sized its
    OpenMP threads and bound them to CPUs when its worker started, at the bake."""
    effect = ("more of its threads than this container has CPUs: slower, not other answers" if here < baked else
              f"{here - baked} of this container's CPUs stay idle")
    return (f"this container may run on {cpu_count_text(here)}, the bake's on {baked}: the restored engine keeps"
            f" the threads vLLM gave it at the bake ({effect}); FV_RESTORE=0 gives a normal start sized for this"
            " container, or bake the image where it will serve")


def cpu_count_text(n: int) -> str:
    return f"{n} CPU" if n == 1 else f"{n} CPUs"
