"""What a start is given, read the same way by `fvboot serve` and `fvboot check`: fvboot's own
settings (a bad value ends the start at once, an unknown name is said), the run's arguments less
what is not vLLM's (the API key, which the middleware asks for; the baked model's name, as vLLM's
image is called), and the middleware's settings for this start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from . import runenv
from .api_keys import resolve_api_key
from .compatibility import read_checkpoint_manifest
from .errors import CheckpointUnusable, FvBootError
from .launcher import dashed_option, refused_vllm_arg, take_api_key_arg, take_model_arg
from .layout import Layout
from .runtime_file import runtime_settings


@dataclass(frozen=True)
class StartInputs:
    run_args: list[str]  # vLLM's, after the baked command
    settings: dict  # runtime_file.runtime_settings: the key clients must send, the gate's wait
    notes: tuple[str, ...]  # lines to say before the start goes on


def read_start_inputs(layout: Layout, argv: list[str], env: Optional[Mapping[str, str]] = None) -> StartInputs:
    """FvBootError for what ends a start at once: a bad setting (a typo must not cost the
    restore, nor be ignored), `--api-key` without a value or two different keys, a model that
    is not the baked one."""
    env = os.environ if env is None else env
    bad = runenv.problems(env)
    if bad:
        raise FvBootError("; ".join(bad))
    notes = list(runenv.unknown(env))
    try:
        run_args, key_arg = take_api_key_arg(argv)
        run_args, model_arg = take_model_arg(run_args)
        key = resolve_api_key(dict(env), key_arg)  # a key file read once
        settings = runtime_settings(dict(env), key=key)
    except ValueError as e:
        raise FvBootError(str(e)) from None
    refused = refused_run_arg(run_args)
    if refused:
        raise FvBootError(refused)
    if model_arg is not None:
        notes.append(check_model_arg(layout, model_arg))
    notes.append(key.line)
    return StartInputs(run_args, settings, tuple(notes))


# options a run may not give though vLLM takes them, and why (besides launcher.NEVER_VLLM_ARGS)
_BAKED_ONLY = {"--served-model-name": "fvboot asks the server by its name: docker run -e FV_SERVED_MODEL=NAME (a normal"
                                      " start then serves that name)"}


def refused_run_arg(run_args: list[str]) -> Optional[str]:
    """Why vLLM's arguments given at `docker run` cannot make this image's server (neither a
    restore nor a normal start could serve with them: TLS, a second API server, a config file,
    another served name; found by review, 2026-12-06: TLS ended after an hour's wait for a
    health answer in plain HTTP), or None. Abbreviations of the options fvboot reads from them
    (`--por 9000`: fvboot would wait on 8000) are refused too."""
    for a in run_args:
        name = dashed_option(a).partition("=")[0]
        if name in _BAKED_ONLY:
            return f"{name} is not taken at a start: {_BAKED_ONLY[name]}"
    return refused_vllm_arg(run_args, also=["--port", "--host", "--model", *_BAKED_ONLY])


def check_model_arg(layout: Layout, given: str) -> str:
    """The line to say where GIVEN, the model a run named (launcher.take_model_arg: `docker run
    IMAGE MODEL`, `--model MODEL`), is the one this image serves: its served name, the model it
    was built from, or its folder here; the start then goes on without it. FvBootError where it
    names another: no start of this image could serve it (vLLM would end at "unrecognized
    arguments"), and a program's name there (`docker run IMAGE bash`) meant --entrypoint."""
    names = [str(layout.model_dir)]
    try:
        m = read_checkpoint_manifest(layout)
        names = [n for n in (m.model.served_name, m.model.source, m.model.path) if n] + names
    except CheckpointUnusable:  # the start's own reading of it says why
        pass
    if given.rstrip("/") in {n.rstrip("/") for n in names}:
        return f"{given!r} names the model this image was baked with: served as baked"
    raise FvBootError(f"{given!r} was given as the model to serve, and this image serves only the one it was baked"
                      f" with ({names[0]!r}): the arguments after the image are vLLM options (docker run IMAGE"
                      " --max-model-len 4096); another model needs an image of its own (fvbuild image --model"
                      " NAME); a shell or another program: docker run --entrypoint PROGRAM IMAGE")
