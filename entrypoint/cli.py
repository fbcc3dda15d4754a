"""fvboot's command line. `fvboot [vllm args]` == `fvboot serve [vllm args]`, so `docker run IMAGE
[vllm serve args]` keeps the vLLM image's calling convention."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import FvBootError, Stopped, stop_on_signals
from .layout import Layout

COMMANDS = ("bake", "serve", "inspect", "check", "make-model", "cuda-checkpoint")

HELP = """usage: docker run [flags from `fvbuild run-flags IMAGE`] IMAGE [COMMAND] [vllm serve options]

Serves the model this image was baked with: restored from its checkpoint, or, where that cannot
be used (each start says why), started normally. Options after the image are `vllm serve`'s, as
with vLLM's own image; options the bake did not have give a normal start that has them.

commands:
  serve     the default: restore (or start) and serve
  check     would a start here restore the checkpoint, and if not, why (restores nothing)
  inspect   print the bake's manifest
  bake, make-model, cuda-checkpoint   used by fvbuild while it builds the image

vLLM's own options: docker run --rm --entrypoint vllm IMAGE serve --help
"""


def _bake(argv: list[str]) -> int:
    from . import runenv
    from .bake import bake, check_tools

    import argparse  # only bake parses options: serve starts faster without it

    p = argparse.ArgumentParser(prog="fvboot bake", description="warm up vLLM and checkpoint it into FV_HOME")
    p.add_argument("--model", required=True, help="synthetic:NAME, a model folder, or a HF repo id")
    p.add_argument("--home", help="where to write (default $FV_HOME or /fv)")
    p.add_argument("--port", type=int, default=int(runenv.value("FV_PORT")))
    p.add_argument("--warmup-requests", type=int, default=4)
    p.add_argument("--token-file", type=Path, help="file holding a model-download token (never stored)")
    p.add_argument("--served-model-name", help="the name clients ask for (default: --model as given)")
    p.add_argument("--revision", help="a Hub model's branch, tag or commit to download (default: main)")
    p.add_argument("--model-dir", type=Path, help="where fvbuild mounted the model folder, when not at"
                   " /fv-import/model itself (the folder it mounted also holds what the model's links reach)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: extra vllm serve arguments")
    a = p.parse_args(argv)
    args = a.vllm_args[1:] if a.vllm_args[:1] == ["--"] else a.vllm_args
    check_tools()
    with _own_mounts():
        bake(Layout.from_env(a.home), a.model, args, a.port, a.warmup_requests, a.token_file, model_dir=a.model_dir,
             served_name=a.served_model_name, revision=a.revision)
    return 0


@contextlib.contextmanager
def _own_mounts() -> Iterator[None]:
    """Our own /dev/shm (--ipc=host shares the host's) and a writable /tmp (--read-only), before
    any thread starts (private_mounts); where fvboot cannot have them, a run folder of its own in
    the shared one, removed when fvboot ends."""
    from .private_mounts import isolate

    done, why = isolate()
    made = None
    if not done:
        print(f"fvboot: /dev/shm and /tmp are the ones this container was given (under docker run"
              f" --ipc=host, the host's /dev/shm): {why}", file=sys.stderr, flush=True)
        if not os.environ.get("FV_RUN_DIR"):
            # the run folder holds this start's admin token and API key: one of its own, made
            # here (0700, a random name), not the shared default another container or a host
            # user could have made or read (found by review, 2026-12-06)
            import tempfile

            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            made = os.environ["FV_RUN_DIR"] = tempfile.mkdtemp(prefix=".fvboot-", dir=shm)
    try:
        yield
    finally:
        if made:  # in a shared /dev/shm it would outlive the container, key and all (found by review, 2026-12-06)
            import shutil

            shutil.rmtree(made, ignore_errors=True)


def _serve(argv: list[str]) -> int:
    with _own_mounts():
        from .devices import DeviceLookup

        devices = DeviceLookup()  # NVML's start beside the imports below, not before the restore
        from .serve import serve

        home = None
        if argv[:1] == ["--home"]:
            home, argv = argv[1], argv[2:]
        if argv[:1] == ["--"]:
            argv = argv[1:]
        return serve(Layout.from_env(home), argv, devices)


def _check(argv: list[str]) -> int:
    """0 where a start would restore the checkpoint, 1 where it would not (each line says why)."""
    from .preflight import check

    if argv[:1] == ["--"]:
        argv = argv[1:]
    with _own_mounts():  # as a start does: where it cannot, the check says the restore would not run
        usable, lines = check(Layout.from_env(), argv)
    for line in lines:
        print(f"fvboot check: {line}", flush=True)
    return 0 if usable else 1


def _inspect(argv: list[str]) -> int:
    layout = Layout.from_env(argv[0] if argv else None)
    if not layout.manifest.exists():
        print(f"fvboot: no manifest at {layout.manifest}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(layout.manifest.read_text()), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(f"fvboot {__version__}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(HELP, end="")
        return 0
    cmd = argv[0] if argv and argv[0] in COMMANDS else "serve"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    try:
        if cmd in ("serve", "bake", "check"):
            # docker stop from the first moment: PID 1 ignores a signal it has no handler for, and
            # one before `serve` set its own ended in a traceback (found by review, 2026-12-06)
            stop_on_signals()
        if cmd == "bake":
            return _bake(rest)
        if cmd == "inspect":
            return _inspect(rest)
        if cmd == "check":
            return _check(rest)
        if cmd == "make-model":
            from .synthetic import main as make_model

            return make_model(rest)
        if cmd == "cuda-checkpoint":
            from .cuda_checkpoint_client import main as cuda_checkpoint

            return cuda_checkpoint(rest)
        return _serve(rest)
    except FvBootError as e:
        print(f"fvboot: {e}", file=sys.stderr, flush=True)
        return 1
    except Stopped as stop:
        print(f"fvboot: {stop}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except KeyboardInterrupt:
        return 130
