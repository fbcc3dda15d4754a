"""Baking: run the built image as `fvboot bake`, then turn its /fv output into image layers.

The token for model downloads goes in through a bind-mounted file: bind mounts are in no layer,
the bake container's config (with its Env) is never committed, and fvboot keeps the token out of
the server's environment, so neither the image nor the checkpoint can hold it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import __version__, gpu
from .engine import DockerEngine, RunningContainer
from .errors import BakeError, BakeTimeoutError, ContainerTimeoutError, EngineError, GpuAccessError
from .options import BuildOptions, Device
from .render import render_template

TOKEN_PATH = "/run/fv-secrets/token"
IMPORT_PATH = "/fv-import/model"


@dataclass(frozen=True)
class BakeLayersContext:
    """The typed context of baked.Dockerfile.j2."""

    fvbuild_version: str
    built_image: str
    bake_image: str
    labels: tuple[tuple[str, str], ...]


def bake_command(opts: BuildOptions) -> list[str]:
    cmd = ["bake", "--model", opts.model, "--port", str(opts.port),
           "--warmup-requests", str(opts.warmup_requests)]
    if opts.served_model_name:
        cmd += ["--served-model-name", opts.served_model_name]
    if opts.revision:
        cmd += ["--revision", opts.revision]
    folder = opts.model_folder
    if folder is not None and folder.inside:  # mounted with what its links reach (model_folder.py)
        cmd += ["--model-dir", f"{IMPORT_PATH}/{folder.inside}"]
    if os.environ.get(opts.hf_token_env):
        cmd += ["--token-file", TOKEN_PATH]
    return cmd + ["--", *opts.vllm_args]


def gpu_plan(engine: DockerEngine, opts: BuildOptions) -> Optional[gpu.GpuPlan]:
    """How the bake container gets the GPUs (None for cpu); raises before any build when it cannot."""
    if opts.device is not Device.cuda:
        return None
    try:
        return gpu.plan(opts.gpu_access, engine.runtimes(), opts.nvidia_driver_dir, count=opts.gpus_used)
    except GpuAccessError as e:
        raise GpuAccessError(f"{e}; or build the image without its checkpoint (--no-bake)") from None


def bake_image(engine: DockerEngine, opts: BuildOptions, built_id: str, tag: str,
               on_line: Callable[[str], None], plan: Optional[gpu.GpuPlan] = None) -> dict[str, float]:
    """Bake BUILT_ID and tag the result TAG; returns seconds per phase. Whatever happens, the bake
    container and its committed image are removed; TAG is set only when everything succeeded."""
    t0 = time.monotonic()
    volumes = {}
    token = os.environ.get(opts.hf_token_env)
    tmpdir = tempfile.mkdtemp(prefix="fvbuild-")
    container = None
    # this bake's own name: two builds of the same model (two tags, a CI matrix) share BUILT_ID, and
    # a shared name let one build's clean-up remove, or its commit replace, the other's bake
    bake_ref = f"fvbuild-bake-tmp:{built_id.split(':')[-1][:12]}-{uuid.uuid4().hex[:8]}"
    try:
        if token:
            token_file = Path(tmpdir) / "token"
            token_file.touch(mode=0o600)
            token_file.write_text(token)
            volumes[str(token_file)] = {"bind": TOKEN_PATH, "mode": "ro"}
        folder = opts.model_folder
        if folder is not None:
            volumes[str(folder.mount)] = {"bind": IMPORT_PATH, "mode": "ro"}
        run_kwargs: dict = {}
        if plan is not None:
            image_env = (engine.inspect(built_id).get("Config") or {}).get("Env") or []
            run_kwargs = gpu.container_kwargs(plan, image_env)
            volumes.update(run_kwargs.pop("volumes", {}))
        container = engine.run_criu_container(built_id, bake_command(opts), opts.network,
                                              volumes=volumes, **run_kwargs)
        _follow(container, on_line, opts.bake_timeout_s)
        t_run = time.monotonic()
        raw = container.read_file("/fv/manifest.json")
        if raw is None:
            raise BakeError("the bake wrote no /fv/manifest.json")
        labels = baked_labels(_parse_manifest(raw, "the bake's /fv/manifest.json"))
        container.commit(bake_ref)
        # The container's writable layer is a full copy of the bake's output (for a 3B model
        # ~17 GB: model, weight dump, checkpoint): free it before the layers are copied once
        # more, so the disk holds two copies at most, not three (GPU hosts' disks are small).
        container.remove()
        container = None
        ctx = BakeLayersContext(__version__, built_id, bake_ref, labels)
        ctxdir = Path(tmpdir) / "layers"
        ctxdir.mkdir()
        (ctxdir / "Dockerfile").write_text(render_template("baked.Dockerfile.j2", ctx))
        result = None
        for item in engine.build(ctxdir, network_mode=opts.network):
            if hasattr(item, "image_id"):
                result = item
            else:
                on_line(item.text)
        engine.tag(result.image_id, tag)
        return {"bake run": t_run - t0, "layers": time.monotonic() - t_run}
    except EngineError as e:
        raise BakeError(f"bake failed: {e}") from None
    finally:
        if container is not None:
            try:
                container.remove()
            except EngineError:
                pass
        try:
            engine.remove_image(bake_ref)
        except EngineError as e:
            on_line(f"fvbuild: the temporary image {bake_ref} was not removed: {e}")
        shutil.rmtree(tmpdir, ignore_errors=True)  # the token file goes with it


def _follow(container: RunningContainer, on_line: Callable[[str], None], timeout_s: float) -> None:
    """Show the bake's log while waiting for it, both bounded by TIMEOUT_S; BakeError unless it
    exited 0. The log is read in a thread: a silent bake must not hang the wait, nor the wait the log."""
    tail: deque[str] = deque(maxlen=200)

    def pump() -> None:
        for line in container.log_lines():
            tail.append(line)
            on_line(line)

    reader = threading.Thread(target=pump, name="bake-log", daemon=True)
    reader.start()
    try:
        code = container.wait(timeout_s)
    except ContainerTimeoutError:
        raise BakeTimeoutError(
            f"the bake did not finish within {timeout_s:.0f} s (--bake-timeout); last line: "
            f"{tail[-1] if tail else '(none)'}") from None
    reader.join(timeout=30)
    if code != 0:
        reason = next((l for l in reversed(tail) if l.startswith("fvboot: ")), tail[-1] if tail else "")
        reason = reason.removeprefix("fvboot: ")  # with vLLM's own reason where it had one (fvboot.vllm_log)
        raise BakeError(f"bake failed (exit {code}): {reason}")


# The bake manifest is fvboot's (fvboot.manifest defines it; the builder must not import fvboot):
# read here as JSON, by the same field names, and every field the labels use may be absent (a
# manifest from another fvboot version) without failing the build or `fvbuild inspect`.


def manifest_field(data: Any, *path: str) -> Any:
    """DATA[PATH[0]][PATH[1]]..., or None where a part is missing or not a JSON object."""
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _text(data: Any, *path: str) -> str:
    v = manifest_field(data, *path)
    return v if isinstance(v, str) else ""


def baked_labels(manifest: Any) -> tuple[tuple[str, str], ...]:
    """The labels of a baked image, from its manifest (JSON data)."""
    return (
        ("org.fast-vllm.baked", "true"),
        ("org.fast-vllm.baked-at", _text(manifest, "baked_at")),
        ("org.fast-vllm.baked-device", _device_summary(manifest_field(manifest, "device"))),
        ("org.fast-vllm.baked-vllm", _text(manifest, "vllm", "version")),
        ("org.fast-vllm.baked-criu", _text(manifest, "criu", "version")),
    )


def _device_summary(dev: Any) -> str:
    if manifest_field(dev, "kind") != "cuda":
        return "cpu"
    gpus = manifest_field(dev, "gpus")
    gpus = gpus if isinstance(gpus, list) else []
    name = (manifest_field(gpus[0], "name") if gpus else None) or "unknown GPU"
    return f"{name} x{len(gpus)}, driver {manifest_field(dev, 'driver')}, CUDA {manifest_field(dev, 'cuda')}"


def _parse_manifest(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise BakeError(f"{what} is not valid JSON ({e})") from None


def read_image_manifest(engine: DockerEngine, image: str) -> Optional[Any]:
    """The manifest (JSON data) of a baked image, or None for an image that was not baked."""
    engine.inspect(image)
    raw = engine.read_file(image, "/fv/manifest.json")
    return _parse_manifest(raw, f"{image}: /fv/manifest.json") if raw else None
