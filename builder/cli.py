"""The fvbuild command line: `render`, `image`, `inspect`. The only place where errors become
messages and exit codes; everything below raises typed FvBuildError."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import click
from rich.console import Console

from . import __version__
from .errors import BaseImageMissingError, FvBuildError, GpuAccessError, ImageNotBakedError, OptionsError
from .options import BuildOptions, CriuOptions, check_bench_env, load_options

# no emoji codes (":a:" in a tag would print as one) and no markup but fvbuild's own prefix
console = Console(stderr=True, highlight=False, emoji=False)


def _options_params(f):
    """The flags shared by `render` and `image`; each maps to one BuildOptions field."""
    decorators = [
        click.option("--model", help="HF repo id, local model folder, or synthetic:NAME (e.g. synthetic:tiny)"),
        click.option("--served-model-name", help="the name clients ask for (default: --model as given; a local"
                     " folder's path is seldom what clients should send)"),
        click.option("--revision", help="Hub models: the branch, tag or commit to download (default: main);"
                     " the commit it was is recorded in the manifest"),
        click.option("--tag", help="image name[:tag] (default fast-vllm/<model>:<device>)"),
        click.option("--device", type=click.Choice(["cuda", "cpu"]), help="target (default cuda)"),
        click.option("--base-image", help="FROM image (default: vLLM's image for cuda, debian:bookworm for cpu)"),
        click.option("--vllm-version", help="vLLM version (default: 0.26.0 cuda, 0.32.0 cpu)"),
        click.option("--vllm-arg", "vllm_args", multiple=True, help="extra `vllm serve` argument (repeat)"),
        click.option("--port", type=int, help="port the server listens on (default 8000)"),
        click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
                     help="environment of the image, seen by the bake and every start; vLLM's VLLM_* settings go here (repeat)"),
        click.option("--criu-repo", help="CRIU git repo URL or local git repo"),
        click.option("--criu-ref", help="CRIU tag, branch or commit (default v4.2.1)"),
        click.option("--criu-src", type=click.Path(path_type=Path), help="local CRIU source folder or tarball (offline)"),
        click.option("--criu-patches", type=click.Path(path_type=Path), help="folder with a patch `series`"),
        click.option("--wheels", multiple=True, type=click.Path(path_type=Path), help="folder of wheels pip may use (repeat)"),
        click.option("--extra-index-url", "extra_index_urls", multiple=True, help="extra package index (repeat)"),
        click.option("--ca-cert", type=click.Path(path_type=Path), help="extra CA bundle (PEM) for every stage"),
        click.option("--network", help="docker network mode for build and bake (e.g. host)"),
        click.option("--cuda-checkpoint", type=click.Choice(["fast-vllm", "nvidia"]), help="which cuda-checkpoint CRIU runs"),
        click.option("--criu-prebuilt", type=click.Path(path_type=Path, dir_okay=False),
                     help="tarball from `fvbuild criu`: no CRIU build, and no package step for cuda"),
        click.option("--gpu-access", type=click.Choice(["auto", "toolkit", "devices"]),
                     help="how the bake reaches the GPUs: NVIDIA toolkit (--gpus) or device nodes + driver folder"),
        click.option("--nvidia-driver-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="driver folder mounted for --gpu-access devices (default /usr/local/nvidia)"),
        click.option("--bake-timeout", "bake_timeout_s", type=int, help="seconds the bake may run (default 10800)"),
        click.option("--hf-token-env", help="environment variable holding the model-download token (default HF_TOKEN)"),
        click.option("--warmup-requests", type=int, help="warm-up requests before the checkpoint (default 4)"),
        click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                     help="TOML/YAML file of options (flags override it)"),
    ]
    for d in reversed(decorators):
        f = d(f)
    return f


def _load(values: dict[str, Any], kind: type[CriuOptions] = BuildOptions, **extra: Any) -> Any:
    config_file = values.pop("config_file", None)
    values.update(extra)
    return load_options(values, config_file, kind)


def _fail(e: FvBuildError) -> None:
    from .report import ConsoleReport  # the one way an error line is printed (the user's words as given)

    ConsoleReport(console).error(str(e))
    sys.exit(e.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fvbuild")
def main() -> None:
    """Build vLLM images that start in seconds: CRIU checkpoints baked into the image."""
    _stop_on_sigterm()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def _interrupted_exit_code(e: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a command a signal ended (Ctrl-C: 130)."""
    return 128 + (e.args[0] if e.args and isinstance(e.args[0], int) else 2)


def _stop_on_sigterm() -> None:
    """SIGTERM (docker stop, CI cancel, kill) ends fvbuild like Ctrl-C: as an exception, so every
    `finally` runs and no temp context, bake container or half-made image is left behind."""
    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


@main.command()
@_options_params
@click.option("--context-dir", type=click.Path(path_type=Path, file_okay=False),
              help="also write the full build context here")
def render(context_dir: Optional[Path], **values: Any) -> None:
    """Print the rendered Dockerfile and the build-context listing; builds nothing."""
    from . import buildcontext

    try:
        opts = _load(values)
        if context_dir is not None:
            if context_dir.exists() and any(context_dir.iterdir()):  # assemble writes a whole context
                raise OptionsError(f"--context-dir: {context_dir} is not empty (a context rendered before?): give"
                                   " an empty or new folder")
            bc = buildcontext.assemble(opts, context_dir, check_remote=False)
            dockerfile, listing = bc.dockerfile, bc.listing()
        else:
            with tempfile.TemporaryDirectory(prefix="fvbuild-render-") as tmp:
                bc = buildcontext.assemble(opts, Path(tmp) / "ctx", check_remote=False)
                dockerfile, listing = bc.dockerfile, bc.listing()
    except FvBuildError as e:
        _fail(e)
    click.echo(dockerfile, nl=False)
    click.echo("\n# build context:")
    for path, size in listing:
        if path != "Dockerfile":
            click.echo(f"#   {path}  ({size} bytes)")
    if opts.criu_prebuilt is None and opts.criu_src is None and not Path(opts.criu_repo).is_dir():
        click.echo("#   (CRIU is fetched by the build: no source in the context)")


@main.command()
@_options_params
@click.option("--bake/--no-bake", default=None, help="bake the checkpoint after the build (default: bake)")
@click.option("--json", "as_json", is_flag=True, help="progress and result as JSON lines on stdout (for CI)")
def image(bake: Optional[bool], as_json: bool, **values: Any) -> None:
    """Build the image and bake a checkpoint of the warmed server into it."""
    from .bake import bake_image, gpu_plan, read_image_manifest
    from .buildcontext import assemble
    from .engine import DockerEngine
    from .report import ConsoleReport, JsonReport

    report = JsonReport() if as_json else ConsoleReport(console)
    engine = tag = replaced = None
    try:
        opts = _load(values, bake=bake)
        engine = DockerEngine.connect()
        engine.ensure_image(opts.resolved_base_image)
        plan = gpu_plan(engine, opts) if opts.bake else None  # no GPU: say so before building
        tag = opts.resolved_tag
        replaced = engine.image_id(tag)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="fvbuild-ctx-") as tmp:
            bc = assemble(opts, Path(tmp) / "ctx")
            result = report.build(engine.build(bc.path, network_mode=opts.network,
                                               base_image=opts.resolved_base_image))
        phases = dict(result.stage_seconds)
        if opts.bake:
            # The built image stays untagged (kept by ID): the baked image is built FROM it.
            report.note(f"built {result.image_id[:19]}; baking (vLLM start, warm-up, weight dump, checkpoint)"
                        + (f", GPU access: {plan.mode.value}" if plan else "") + "...")
            try:
                phases.update(bake_image(engine, opts, result.image_id, tag, report.bake_line, plan))
            except BaseException:
                with contextlib.suppress(Exception):  # the bake's own error is the one to report
                    engine.remove_build(result)  # nothing of a failed or interrupted bake stays
                raise
        else:
            engine.tag(result.image_id, tag)
        info = engine.inspect(tag)
        if replaced and replaced != info["Id"]:
            # The image that had this tag before would stay as an untagged <none> of full size
            # (a re-bake on a small disk runs out of space): removed unless still tagged or used.
            engine.remove_if_untagged(replaced, prune=True)
        sizes = {}
        if opts.bake:
            files = (read_image_manifest(engine, tag) or {}).get("files") or []
            sizes = {f"{part}_bytes": sum(f.get("size", 0) for f in files if str(f.get("path", "")).startswith(part))
                     for part in ("checkpoint", "weights")}
    except FvBuildError as e:
        report.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (_stop_on_sigterm): cleaned up by now
        tagged = None
        with contextlib.suppress(Exception):
            tagged = engine.image_id(tag) if engine and tag else None
        report.error(f"interrupted after {tag} was baked and tagged: that image is complete"
                     if tagged and tagged != replaced else
                     "interrupted: no image was tagged, and nothing this build or its bake made is left")
        sys.exit(_interrupted_exit_code(e))
    report.done(tag, info["Size"], phases, time.monotonic() - t0, sizes)


@main.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="where to write the tarball (FILE.tar.gz)")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), help="target (default cuda: with cuda-checkpoint)")
@click.option("--base-image", help="image whose distro CRIU is built on (its glibc is the oldest the result runs on)")
@click.option("--criu-repo", help="CRIU git repo URL or local git repo")
@click.option("--criu-ref", help="CRIU tag, branch or commit (default v4.2.1)")
@click.option("--criu-src", type=click.Path(path_type=Path), help="local CRIU source folder or tarball (offline)")
@click.option("--criu-patches", type=click.Path(path_type=Path), help="folder with a patch `series`")
@click.option("--ca-cert", type=click.Path(path_type=Path), help="extra CA bundle (PEM) for the build")
@click.option("--network", help="docker network mode for the build (e.g. host)")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML/YAML file of options (flags override it)")
def criu(out: Path, **values: Any) -> None:
    """Build the images' criu stage and export CRIU, its cuda plugin, cuda-checkpoint, vmtouch and
    their non-glibc libraries as one tarball, for `fvbuild image --criu-prebuilt FILE`."""
    from .criu_prebuilt import export

    try:
        opts = _load(values, CriuOptions)
        if not out.name.endswith((".tar.gz", ".tgz")):
            raise OptionsError(f"--out {out}: name it FILE.tar.gz (it is a gzip tarball)")
        manifest = export(opts, out.resolve(), lambda line: console.print(f"  {line}", markup=False, highlight=False))
    except FvBuildError as e:
        _fail(e)
    console.print(f"CRIU {manifest['criu']['version']} ({manifest['criu']['source']}, patches: "
                  f"{', '.join(manifest['patches']) or 'none'}), {len(manifest['libs'])} libraries, "
                  f"built on {manifest['base_image']} (needs glibc >= {manifest['glibc_needed'].removeprefix('GLIBC_') or '?'})",
                  soft_wrap=True, markup=False)
    click.echo(str(out))


@main.command("run-flags")
@click.argument("image_ref", required=False)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="the image's device  [default: IMAGE's, else cuda]")
@click.option("--gpu-access", type=click.Choice(["auto", "toolkit", "devices"]), default="auto", show_default=True)
@click.option("--nvidia-driver-dir", type=click.Path(path_type=Path, file_okay=False))
def run_flags(image_ref: Optional[str], device: Optional[str], gpu_access: str, nvidia_driver_dir: Optional[Path]) -> None:
    """Print the `docker run` flags a baked image needs here (CRIU's capabilities, and the GPUs
    as the bake would get them), e.g. docker run $(fvbuild run-flags IMAGE) IMAGE. Named, the
    image says its device (its label); otherwise --device, cuda by default."""
    import shlex

    from .engine import docker_run_flags
    from .gpu import gpu_run_flags

    try:
        if image_ref is not None:
            device = _image_device(image_ref, device)
        flags = docker_run_flags()
        if (device or "cuda") == "cuda":
            try:
                flags += gpu_run_flags(gpu_access, nvidia_driver_dir)
            except GpuAccessError as e:
                if image_ref is None and device is None:  # cuda only by default: the CPU image's way out
                    raise GpuAccessError(f"{e}; a CPU image needs no GPU: fvbuild run-flags IMAGE, or --device cpu") from None
                raise
    except FvBuildError as e:
        _fail(e)
    click.echo(shlex.join(flags))


def _image_device(image_ref: str, asked: Optional[str]) -> str:
    """The device IMAGE_REF was built for (its org.fast-vllm.device label); OptionsError where
    ASKED says otherwise or the image is not one of ours."""
    from .context import DEVICE_LABEL
    from .engine import DockerEngine

    try:
        labels = DockerEngine.connect().inspect(image_ref).get("Config", {}).get("Labels") or {}
    except BaseImageMissingError:
        raise ImageNotBakedError(f"image {image_ref} is not on this machine: docker pull it first, "
                                 "or say its device instead (--device cuda|cpu, no IMAGE)") from None
    device = labels.get(DEVICE_LABEL)
    if device not in ("cuda", "cpu"):
        raise ImageNotBakedError(f"{image_ref} is not a fast-vllm image (no {DEVICE_LABEL} label); build it with `fvbuild image`")
    if asked is not None and asked != device:
        raise OptionsError(f"--device {asked}: {image_ref} is a {device} image")
    return device


@main.command()
@click.argument("image_ref")
@click.option("--runs", type=click.IntRange(1, 100), default=3, show_default=True, help="starts per path")
@click.option("--cold", is_flag=True, help="also restore with the page cache dropped (root)")
@click.option("--normal/--no-normal", default=True, show_default=True, help="also a normal vLLM start (FV_RESTORE=0)")
@click.option("--nocache", is_flag=True, help="also a normal start with empty compile caches")
@click.option("--env", "env", multiple=True, metavar="KEY=VALUE", help="runtime setting for the restores")
@click.option("--settle", "settle_s", type=click.FloatRange(0, 600), default=0.0, show_default=True,
              help="seconds to wait before each timed restore (the GPU settles after the previous container)")
@click.option("--gpu-access", type=click.Choice(["none", "auto", "toolkit", "devices"]), default=None,
              help="how containers get the GPUs (as `fvbuild run-flags`)  [default: auto for a cuda image, none for cpu]")
@click.option("--nvidia-driver-dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="write the results here")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path, dir_okay=False), help="draw them here (PNG)")
def bench(image_ref: str, runs: int, cold: bool, normal: bool, nocache: bool, env: tuple[str, ...],
          settle_s: float, gpu_access: str, nvidia_driver_dir: Optional[Path], json_out: Optional[Path], plot_out: Optional[Path]) -> None:
    """Time `docker run` of a baked image to its first correct answer, per start path (restore,
    page cache dropped, normal start, empty compile caches), on this machine, in one run."""
    from . import bench as fvbench
    from .bake import read_image_manifest
    from .engine import DockerEngine, docker_run_flags
    from .gpu import gpu_run_flags

    try:
        check_bench_env(env)
        engine = DockerEngine.connect()
        m = read_image_manifest(engine, image_ref)
        if m is None:
            raise ImageNotBakedError(f"{image_ref} carries no fast-vllm checkpoint; build it with `fvbuild image`")
        if gpu_access is None:  # a CUDA image's containers without GPUs only ever measure the fallback
            gpu_access = "auto" if _image_device(image_ref, None) == "cuda" else "none"
        flags = docker_run_flags() + ["--network", "host"]
        if gpu_access != "none":
            flags += gpu_run_flags(gpu_access, nvidia_driver_dir)
        disk = engine.root_dir() if cold else None  # the disk a cold restore reads the layers from
        plan = fvbench.BenchPlan(image_ref, tuple(flags), runs, cold, normal, nocache, env, disk_dir=disk,
                                 settle_s=settle_s)
        res = fvbench.run(plan, m, say=lambda line: click.echo(line, err=True))
        if json_out:
            json_out.write_text(json.dumps(res.to_json(), indent=2) + "\n")
        if plot_out:
            fvbench.plot(res, plot_out)
    except FvBuildError as e:
        _fail(e)
    click.echo(res.table())
    if res.restore_equals_normal_start is False:
        _fail(fvbench.BenchError("the restored server answers differently from a normal start"))


@main.command()
@click.argument("image_ref")
def inspect(image_ref: str) -> None:
    """Print the bake manifest of a baked image."""
    from .bake import read_image_manifest
    from .engine import DockerEngine

    try:
        manifest = read_image_manifest(DockerEngine.connect(), image_ref)
        if manifest is None:
            raise ImageNotBakedError(f"{image_ref} carries no fast-vllm checkpoint; build it with `fvbuild image`")
    except FvBuildError as e:
        _fail(e)
    click.echo(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main(prog_name="fvbuild")
