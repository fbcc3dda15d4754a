"""The API key clients must send, resolved once a start from where `docker run` may give it:
FV_API_KEY or VLLM_API_KEY, the file FV_API_KEY_FILE names (Docker's secrets, a mounted
Kubernetes secret), or the run's --api-key. The middleware asks for it; it is never an argument
of the server, never logged, and in no layer, manifest or checkpoint."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional

from .launcher import API_KEY_ARG

API_KEY_ENVS = ("FV_API_KEY", "VLLM_API_KEY")  # docker run -e ...: clients must send it
API_KEY_FILE_ENV = "FV_API_KEY_FILE"  # a file holding the key: Docker's secrets, a mounted Kubernetes secret


def _key_sources(env: dict, arg: Optional[str]) -> dict[str, str]:
    """Where a key was given (FV_API_KEY, VLLM_API_KEY, FV_API_KEY_FILE's file, --api-key) -> the
    key as given. ValueError where FV_API_KEY_FILE names a file that gives no key."""
    given = {k: env[k] for k in API_KEY_ENVS if env.get(k, "").strip()}
    path = env.get(API_KEY_FILE_ENV, "").strip()
    if path:
        given[API_KEY_FILE_ENV] = _read_key_file(path)
    if arg is not None and arg.strip():
        given[API_KEY_ARG] = arg
    return given


def _read_key_file(path: str) -> str:
    """The key in the file at PATH. ValueError where it cannot be read or holds none: the
    operator asked for a key, and a start without one would serve anyone."""
    fix = ("; a start without the key would serve anyone: mount the file there (docker run -v KEYFILE:PATH:ro,"
           f" a secret volume) or leave {API_KEY_FILE_ENV} unset")
    try:
        # non-blocking: a named pipe nobody writes to would hold the start for ever at open()
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{API_KEY_FILE_ENV}={path}: cannot read it ({e.strerror}){fix}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # Docker's and Kubernetes' secrets are files (through a link)
            what = "a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else "not a file"
            raise ValueError(f"{API_KEY_FILE_ENV}={path}: that is {what}, not a file holding the key{fix}")
        raw = os.read(fd, 65537)
    except OSError as e:
        raise ValueError(f"{API_KEY_FILE_ENV}={path}: cannot read it ({e.strerror}){fix}") from None
    finally:
        os.close(fd)
    try:
        key = raw.decode()
    except UnicodeDecodeError:
        key = ""
    if len(raw) > 65536 or not key.strip():
        what = "not a key (over 64 KiB)" if len(raw) > 65536 else "empty" if not raw.strip() else "not text"
        raise ValueError(f"{API_KEY_FILE_ENV}={path}: the file is {what}{fix}")
    return key


@dataclass(frozen=True)
class ApiKey:
    """The key clients must send at this start (None: an open API) and the log line saying so;
    resolved once a start, so that FV_API_KEY_FILE's file is read once."""
    key: Optional[str]
    line: str


def resolve_api_key(env: dict, arg: Optional[str] = None) -> ApiKey:
    """The key from FV_API_KEY, VLLM_API_KEY, the file FV_API_KEY_FILE names or the run's
    --api-key (ARG); None (an open API) where none is set or the one set is empty (compose's
    `${FV_API_KEY:-}`; an empty file is refused: _read_key_file).
    White space at its ends is left out: HTTP trims it from a header, so no client could send
    it, and a Kubernetes secret made from a file keeps the file's last newline. ValueError for
    two different keys, a key with a control character inside it (a line break: no header can
    carry it), or a key file that gives none."""
    given = _key_sources(env, arg)
    keys = {k: v.strip() for k, v in given.items()}
    for name, key in keys.items():
        if any(ord(c) < 32 or ord(c) == 127 for c in key):
            # a secret file of two lines, a key pasted with a line break: no HTTP header can
            # carry it, so every client would get 401 with nothing said
            where = _where(env, name)
            raise ValueError(f"the API key {where} holds a line break or another control character inside it,"
                             " which no client can send in an HTTP header: give the key alone, on one line")
    if len(set(keys.values())) > 1:
        names = list(keys)
        both = "both" if len(names) == 2 else "all"
        raise ValueError(f"{' and '.join(names)} are {both} set, to different keys; set one of them")
    return ApiKey(next(iter(keys.values()), None), _key_line(env, arg, given))


def _where(env: dict, name: str) -> str:
    """Where the key NAME stands for was given, in the log's words."""
    return "given as --api-key" if name == API_KEY_ARG else \
        f"in the file {env[name].strip()} ({name})" if name == API_KEY_FILE_ENV else f"in {name}"


def _key_line(env: dict, arg: Optional[str], given: dict[str, str]) -> str:
    """One line for the log saying whether clients need a key, and where it came from: an empty
    variable or a key trimmed is said, not guessed at by the operator from a 401."""
    if not given:
        empty = [k for k in API_KEY_ENVS if k in env] + ([API_KEY_ARG] if arg is not None else [])
        return (f"{' and '.join(empty)} empty: clients need no API key" if empty
                else "clients need no API key (FV_API_KEY sets one)")
    name, key = next(iter(given.items()))
    where = _where(env, name)
    # a file's last newline is what a file has: said only for a variable or an argument
    trimmed = " (white space at its ends left out)" if key != key.strip() and name != API_KEY_FILE_ENV else ""
    core = key.strip()
    # `docker run --env-file` and compose's env files of old keep a value's quotes: kept in the key
    # (it may be meant), said, so that a 401 for every client is not a riddle
    quoted = " (its quotes are part of it: `docker run --env-file` keeps a value's quotes)" \
        if len(core) >= 2 and core[0] == core[-1] and core[0] in "\"'" else ""
    return f"clients must send the API key {where}{trimmed}{quoted} as `Authorization: Bearer <key>`"
