"""This start's runtime file: what `docker run` sets for the server's middleware (the API key
clients must send, the gate's wait) and a fresh admin token, root-only and replaced atomically.
The server's own environment is frozen at bake; this file is how a restored server learns them."""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Optional

from . import runenv
from .api_keys import ApiKey, resolve_api_key
from .errors import FvBootError


def runtime_settings(env: Optional[dict] = None, api_key_arg: Optional[str] = None,
                     key: Optional[ApiKey] = None) -> dict:
    """What `docker run` can set for the server's middleware at each start (the server's own
    environment is frozen at bake): the API key clients must present (-e FV_API_KEY, or the
    run's --api-key, API_KEY_ARG; KEY where the start resolved it already), the gate's wait."""
    env = os.environ if env is None else env
    out: dict = {}
    key = key or resolve_api_key(env, api_key_arg)
    if key.key:
        out["api_key"] = key.key
    if (env.get("FV_GATE_WAIT_S") or "").strip():
        out["gate_wait_s"] = float(runenv.SETTINGS["FV_GATE_WAIT_S"].parse(env["FV_GATE_WAIT_S"]))
    return out


def add_runtime_info(path: Path, **info) -> None:
    """Add INFO (e.g. `startup=`) to this start's runtime file, keeping its token; atomic, 0600."""
    _write_private_json(path, {**json.loads(path.read_text()), **info})


class RunFolderNotOurs(FvBootError):
    """fvboot's run folder exists and is not this user's own (another user or container made it)."""


def private_folder(path: Path) -> Path:
    """PATH as a folder only this user may change: made 0700 where missing; refused where it is
    a link, not a folder, someone else's, or writable by others (the runtime file in it holds
    the admin token and the API key; whoever may write the folder may swap the file)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RunFolderNotOurs(
            f"fvboot's run folder {path} is not its own (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}):"
            " another user or container made it; remove it, or give fvboot another one with FV_RUN_DIR")
    return path


def write_runtime_settings(path: Path, settings: Optional[dict] = None) -> str:
    """Write this start's runtime settings (SETTINGS plus a fresh admin token) for the server's
    middleware and return the token. Each start (bake, restore, normal start) gets its own
    token: it is in no image layer and no checkpoint, and no two containers share it.
    Root-only (0600), replaced atomically so the middleware never reads half a file."""
    token = secrets.token_hex(32)
    private_folder(path.parent)
    _write_private_json(path, {**(settings or {}), "admin_token": token})
    return token


def _write_private_json(path: Path, data: dict) -> None:
    """DATA as JSON at PATH, root-only (0600) and replaced atomically: the file holds the token."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # a new file, not one found there
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
