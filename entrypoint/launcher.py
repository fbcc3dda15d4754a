"""Starts the vLLM OpenAI server as a process tree fvboot can checkpoint, or just run.

The tree's stdout/stderr are pipes that fvboot forwards to its own (so `docker logs` shows the
server), and whose inode numbers the manifest records: at restore, CRIU's --inherit-fd plugs new
pipes in their place.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import runenv, vllm_log
from .errors import ServerDied
from .exitnoise import ExitFilter
from .layout import RUNTIME_FILE_ENV
from .output import write_line
from .proc_guard import OWN_PROC

WORKER_EXTENSION = "fvboot.worker_extension.FastVllmWorkerExtension"
MIDDLEWARE = "fvboot.middleware.GateMiddleware"


def tree_processes(root: int) -> list[dict]:
    """Every process under ROOT (host PID), with its PID inside the tree's namespace (what CRIU's
    images are named by), its command and its anonymous memory: the checkpoint's contents."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        try:
            status = open(f"/proc/{pid}/status").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        args = [a.decode(errors="replace") for a in cmd if a]
        found = {"host_pid": pid, "pid": int(fields.get("NSpid", str(pid)).split()[-1]),
                 "name": fields.get("Name", "").strip(), "command": " ".join(args)[:160],
                 "rss_anon_bytes": int(fields.get("RssAnon", "0 kB").split()[0]) * 1024}
        allocators = zeroing_allocators(pid)
        if allocators:
            found["allocators"] = allocators
        out.append(found)
        todo += [int(k) for k in kids]
    return out


# Allocators that take memory they gave back with MADV_DONTNEED to read as zeros (jemalloc marks a
# purged extent zeroed, and its calloc skips the clearing): a restore that maps memory from the
# page images brings the checkpoint's bytes back there instead (found by review, 2026-12-06)
ZEROS_AFTER_PURGE = ("jemalloc", "mimalloc")


def zeroing_allocators(pid: int | str, proc: str = "/proc") -> list[str]:
    """Which of ZEROS_AFTER_PURGE process PID has mapped (preloaded or linked), by name."""
    try:
        maps = open(f"{proc}/{pid}/maps").read()
    except OSError:
        return []
    names = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/" in line}
    return sorted({a for a in ZEROS_AFTER_PURGE for n in names if n.startswith(f"lib{a}")})


def vllm_command(model_dir: str, served_name: str, port: int, user_args: list[str], sleep_mode: bool) -> list[str]:
    """`vllm serve MODEL ...` (vLLM's current entry point; `-m` so that it runs under this very
    Python whatever the image's PATH says), with fvboot's worker extension and gate middleware.
    It listens on every IPv4 address unless USER_ARGS say `--host ::` (fvbuild allows only these
    wildcards). USER_ARGS end the command as given: a manifest reads them back from its end."""
    host = [] if arg_value(user_args, "--host") else ["--host", "0.0.0.0"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
           "--served-model-name", served_name, *host, "--port", str(port),
           "--worker-extension-cls", WORKER_EXTENSION, "--middleware", MIDDLEWARE]
    if sleep_mode:
        cmd.append("--enable-sleep-mode")
    return cmd + list(user_args)


SECRET_SUFFIXES = ("_TOKEN", "_SECRET", "_PASSWORD", "_PASSWD", "_KEY", "_CREDENTIALS", "_CREDS")
SECRET_PARTS = ("SECRET", "PASSWORD", "CREDENTIAL")
SECRET_NAMES = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "FV_API_KEY", "VLLM_API_KEY", "FV_ADMIN_TOKEN"}
# FV_* settings the tree reads (nsinit, worker extension, middleware): never stripped.
KEPT_NAMES = {"FV_DISABLE_IO_URING", "FV_GATE_WAIT_S", "FV_HOME", "FV_RUNTIME_FILE"}


def is_secret_name(name: str) -> bool:
    """An environment variable that may hold a credential (`*_KEY`, `*_TOKEN`, `AWS_SECRET_*`,
    `*_CREDENTIALS`, ...); such values would otherwise land in the checkpoint's pages. Names
    that only point at one (`*_FILE`, `*_PATH`, `*_DIR`) stay."""
    up = name.upper()
    if name in KEPT_NAMES:
        return False
    if up in SECRET_NAMES or up.startswith(("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")):
        return True
    if up.endswith(("_FILE", "_PATH", "_DIR", "_URL")) and "SECRET" not in up:
        return False
    return up.endswith(SECRET_SUFFIXES) or any(part in up for part in SECRET_PARTS)


# vLLM's settings fvboot gives the served tree itself (server_env): not the operator's to compare
OWN_VLLM_SETTINGS = {"VLLM_SERVER_DEV_MODE", "VLLM_NO_USAGE_STATS"}


# Settings besides vLLM's own that decide which server runs: the GPUs CUDA shows it, and where
# Python finds its code (a plugin vLLM loads, a package folder): a restored server keeps the
# bake's (found by review, 2026-12-06: `-e CUDA_VISIBLE_DEVICES=1` restored onto GPU 0, and
# `-e PYTHONPATH=/plugins` left a plugin out, both without a word)
SERVER_SETTINGS = ("CUDA_VISIBLE_DEVICES", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONNOUSERSITE")


def vllm_settings(env: Optional[dict] = None) -> dict[str, str]:
    """vLLM's own settings (VLLM_*) and SERVER_SETTINGS in ENV (fvboot's environment by
    default) that reach the server: a restored one keeps the bake's, so the bake records them
    and a restore compares. Secrets (VLLM_API_KEY: a runtime setting) and what fvboot sets
    itself are left out."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if (k.startswith("VLLM_") or k in SERVER_SETTINGS) and k not in OWN_VLLM_SETTINGS
            and not is_secret_name(k)}


# Settings of the libraries under vLLM that act when its processes start (thread pools, the CUDA
# allocator and module loading, the dynamic loader's preloads: vLLM's CPU docs have operators
# preload tcmalloc; glibc's malloc): a restored server keeps the bake's. Said, not refused: some
# platforms set them on every container (Ray sets OMP_NUM_THREADS), which would make every start
# a normal one.
LIBRARY_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF",
                    "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING", "LD_PRELOAD", "GLIBC_TUNABLES",
                    "MALLOC_ARENA_MAX")


def library_settings(env: Optional[dict] = None) -> dict[str, str]:
    """Those of LIBRARY_SETTINGS ENV gives a value (an empty one is no setting: `-e LD_PRELOAD=`)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in LIBRARY_SETTINGS if env.get(k, "").strip()}


def vllm_settings_changed(baked: dict[str, str], here: dict[str, str]) -> str:
    """What of vLLM's settings HERE differs from BAKED, said as `NAME=VALUE (baked: VALUE)`, or ""."""
    def shown(v: Optional[str]) -> str:
        return "unset" if v is None else (v if len(v) <= 60 else v[:57] + "...")

    return ", ".join(f"{k}={shown(here.get(k))} (baked: {shown(baked.get(k))})"
                     for k in sorted(set(baked) | set(here)) if baked.get(k) != here.get(k))


def arg_value(args: list[str], name: str) -> Optional[str]:
    """The value vLLM's argument parser will see for NAME (`--port 9000` or `--port=9000`; the
    last one wins, as in argparse), or None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1:]
    return value


# Settings the image's environment gives fvboot for the server's command line (FV_PORT is the
# baked port there): set at docker run to another value, they ask for a server the checkpoint is
# not, and the normal start gets them as these options.
RUN_ENV_OPTIONS = (("FV_PORT", "--port"), ("FV_SERVED_MODEL", "--served-model-name"))


def args_from_env(baked_command: list[str], env: Optional[dict] = None) -> list[str]:
    """The options FV_PORT / FV_SERVED_MODEL stand for where ENV gives them a value that is not
    the baked command's (the image's own FV_PORT is the baked port: nothing)."""
    env = os.environ if env is None else env
    out: list[str] = []
    for name, option in RUN_ENV_OPTIONS:
        if not (env.get(name) or "").strip():
            continue
        value = runenv.value(name, env) if name in runenv.SETTINGS else env[name].strip()  # FV_PORT: 08000 is 8000
        if value != arg_value(baked_command, option):
            out += [option, value]
    return out


def adds_nothing(command: list[str], args: list[str]) -> bool:
    """Whether ARGS, put after COMMAND, leave the server as COMMAND makes it: what each option
    ends up as, as vLLM's parser reads them (its last occurrence wins; every word up to the next
    option is its value, as for `--lora-modules a=... b=...`; `--no-X` undoes `--X`), is the
    same with them as without (`docker run IMAGE --port 8000`, the baked port, as vLLM's image
    is called). A word that is no option's value, or anything else, may change the server.
    Found by review, 2026-12-06: only each option's first value was compared, and a `--no-X`
    baked after `--X` was not seen."""
    first = next((i for i, a in enumerate(command) if a.startswith("--")), len(command))
    baked = _settled(command[first:])
    # a leading word of ARGS that is no option joins the command's last option's values: a change
    return baked is not None and _settled(command[first:] + list(args)) == baked


def dashed_option(arg: str) -> str:
    """ARG with a long option's name as vLLM's parser reads it (`--max_model_len=8` is
    `--max-model-len=8`); a value, or a short option, as it is."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return "--" + name[2:].replace("_", "-") + eq + value


def _settled(argv: list[str]) -> Optional[dict]:
    """What each option of ARGV ends up as: its last values (a tuple), or for a flag on or off
    (`--no-X` is `--X` off); None where a word is no option's value (a positional argument)."""
    out: dict = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            return None
        name, eq, value = dashed_option(a).partition("=")
        i += 1
        values = [value] if eq else []
        while i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if values:
            out[name] = tuple(values)
        elif name.startswith("--no-"):
            out[("flag", "--" + name[5:])] = False
        else:
            out[("flag", name)] = True
    return out


def server_port(cmd: list[str], default: int = 8000) -> int:
    """The port the server started by CMD listens on: what fvboot must wait on."""
    value = arg_value(cmd, "--port")
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


# One node's server needs no network address but loopback, and a checkpoint restores only where
# the addresses its sockets are bound to exist (sockets.py). Left alone, vLLM's distributed setup
# binds to the container's own address: its TCP store to the default route's (VLLM_HOST_IP), gloo
# to the host name's, NCCL's bootstrap to the first interface's; a GPU image baked so fell back to a
# normal start in any other network (found on the H200, 2026-12-05). An image's own setting wins.
LOOPBACK_SETTINGS = {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def server_env(runtime_file: Path, dev_mode: bool = True, extra: Optional[dict] = None) -> dict:
    """The tree's environment: secrets stripped (is_secret_name: they would land in checkpoint
    pages). The admin token is not in it either: the middleware reads it from RUNTIME_FILE,
    which every start rewrites (the path is the same at bake and restore). DEV_MODE: vLLM's dev
    routes (sleep, wake_up, collective_rpc), which fvboot needs only in a server it checkpoints
    or restores. Its sockets stay on loopback (LOOPBACK_SETTINGS) unless the image says otherwise."""
    env = {k: v for k, v in os.environ.items() if not is_secret_name(k)}
    for k, v in LOOPBACK_SETTINGS.items():
        env.setdefault(k, v)
    env.pop("VLLM_SERVER_DEV_MODE", None)
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    env.update({RUNTIME_FILE_ENV: str(runtime_file), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1"})
    env.update(extra or {})
    return env


# The weight loader's settings (weights/settings.py). The restored worker's environment is the
# bake's, so fvboot hands it this start's values with the load call (apply_load_settings).
LOAD_SETTINGS = ("FV_LOAD_BUFFERS", "FV_LOAD_BUFFER_MB", "FV_LOAD_THREADS", "FV_LOAD_STREAMS",
                 "FV_LOAD_ODIRECT", "FV_LOAD_REGISTER", "FV_GPU_LOADER")


def load_settings(env: Optional[dict] = None) -> dict[str, str]:
    """This start's loader settings, from fvboot's own environment (`docker run -e`)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in LOAD_SETTINGS if k in env}


def apply_load_settings(settings: dict[str, str], env: Optional[dict] = None) -> None:
    """In the worker: make ENV's loader settings exactly SETTINGS (absent ones go back to the
    defaults; a value the bake had but this start has not is dropped)."""
    env = os.environ if env is None else env
    for k in LOAD_SETTINGS:
        if k in settings:
            env[k] = str(settings[k])
        else:
            env.pop(k, None)


def take_option(args: list[str], option: str, needs_value: str,
                value_may_look_like_an_option: bool = True) -> tuple[list[str], Optional[str]]:
    """ARGS without every `OPTION VALUE` / `OPTION=VALUE`, and VALUE (the last one, as vLLM's
    parser takes it), or None. ValueError(NEEDS_VALUE) where OPTION ends ARGS, or is followed
    by another option unless VALUE_MAY_LOOK_LIKE_AN_OPTION (an API key may start with '-')."""
    rest: list[str] = []
    value: Optional[str] = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == option:
            if i + 1 >= len(args) or (not value_may_look_like_an_option and args[i + 1].startswith("-")):
                raise ValueError(needs_value)
            value, i = args[i + 1], i + 2
        elif a.startswith(option + "="):
            value, i = a[len(option) + 1:], i + 1
        else:
            rest.append(a)
            i += 1
    return rest, value


MODEL_ARG = "--model"


def take_model_arg(args: list[str]) -> tuple[list[str], Optional[str]]:
    """ARGS without the model they name, and that model (None if they name none): a first argument
    that is not an option, as vLLM's own image is called (`docker run vllm/vllm-openai MODEL
    ...`: its entrypoint is `vllm serve`), or `--model NAME` / `--model=NAME` (the last one).
    After the baked command it would be a second model, and vLLM would stop at "unrecognized
    arguments" (start_inputs.check_model_arg says whether it is the baked one). ValueError for
    `--model` without a value."""
    first = None
    if args and not args[0].startswith("-"):
        first, args = args[0], args[1:]
    rest, named = take_option(args, MODEL_ARG, "--model needs a value (and this image serves the model it was"
                              " baked with: leave it out)", value_may_look_like_an_option=False)
    return rest, named if named is not None else first


API_KEY_ARG = "--api-key"  # docker run IMAGE --api-key KEY, as with vLLM's own image

# vLLM options no server of this image may be given, at the bake or at a start, and why: fvboot's
# calls to the server (health, gate, probe) speak plain HTTP to its port, reach one API-server
# process, name the baked model, and need fvboot's middleware and worker extension in it
_TLS = ("fvboot's checks of the server speak plain HTTP on 127.0.0.1: terminate TLS in front of the"
        " container (an ingress or a proxy)")
NEVER_VLLM_ARGS = {
    "--ssl-keyfile": _TLS,
    "--ssl-certfile": _TLS,
    "--uds": "the server listens on its port, where fvboot checks it",
    "--headless": "the server must serve HTTP on its port, where fvboot checks it (a headless engine serves none)",
    "--config": "a file of vLLM options is read by vLLM alone, past fvboot's checks: give each option by itself",
    "--middleware": "fvboot sets it",
    "--worker-extension-cls": "fvboot sets it",
}
# Allowed only at 1 (vLLM's default): fvboot closes and opens the gate of the one API server its
# calls reach, so another would answer clients before a restore's checks; one engine per container
ONE_ONLY_VLLM_ARGS = {
    "--api-server-count": "one API-server process per container (scale with more containers)",
    "-asc": "one API-server process per container (scale with more containers)",
    "--data-parallel-size": "one engine per container (data parallelism: one container per GPU or group)",
    "-dp": "one engine per container (data parallelism: one container per GPU or group)",
}


def abbreviated(name: str, options: Sequence[str]) -> Optional[str]:
    """Which of OPTIONS NAME is a strict prefix of (`--por` of `--port`, `-as` of `-asc`), as
    vLLM's parser would read it (argparse's allow_abbrev; no option of vLLM's own, 0.26-0.32, is
    a strict prefix of those this project guards); None where it is none's (found by review,
    2026-12-06: `--api-server-c=2`, `-as 2`, `--por=9000` passed every refusal)."""
    name = dashed_option(name)
    if len(name) < 2 or not name.startswith("-") or name.startswith("---"):
        return None
    longer = sorted({o for o in options if o.startswith(name) and o != name
                     and o.startswith("--") == name.startswith("--")})
    return " or ".join(longer) or None


def refused_vllm_arg(args: Sequence[str], also: Sequence[str] = ()) -> Optional[str]:
    """Why ARGS (vLLM's, in any spelling its parser takes) give an option no server of this image
    may have (NEVER_VLLM_ARGS), one of ONE_ONLY_VLLM_ARGS other than 1, or an abbreviation of
    one of those or of ALSO (options the caller reads or refuses itself, such as --port); None
    where they give none."""
    guarded = [*NEVER_VLLM_ARGS, *ONE_ONLY_VLLM_ARGS, *also]
    args = [dashed_option(a) for a in args]
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if not name.startswith("-"):
            continue
        longer = abbreviated(name, guarded)
        if longer:
            return f"{name}: vLLM's parser reads it as {longer} (a prefix of it); give {longer} by its full name"
        if name in NEVER_VLLM_ARGS:
            return f"{name} is not taken: {NEVER_VLLM_ARGS[name]}"
        if name in ONE_ONLY_VLLM_ARGS:
            given = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if given.strip() != "1":
                return f"{name} {given!r}: only 1 is supported, {ONE_ONLY_VLLM_ARGS[name]}"
    return None


# The shortest spelling of each of vLLM's credential options its parser takes for it: argparse
# takes a unique prefix of a long option (`--api-k`), and vLLM `_` for `-` (found by review,
# 2026-12-06: `--api-k SECRET` was logged as given)
_SECRET_OPTION_PREFIXES = {"--api-key": "--api-k", "--hf-token": "--hf-t"}


def _spelling_of(name: str, option: str) -> bool:
    """NAME is OPTION as vLLM's parser reads it: itself, with `_` for `-`, or a unique prefix."""
    name = dashed_option(name)
    return option.startswith(name) and name.startswith(_SECRET_OPTION_PREFIXES.get(option, option))


def take_api_key_arg(args: list[str]) -> tuple[list[str], Optional[str]]:
    """ARGS without `--api-key KEY` / `--api-key=KEY` (in any spelling vLLM's parser takes), and
    KEY (the last one, as vLLM's parser takes it), or None. The key is the middleware's to ask
    for, in a restore as in a normal start: it is not an argument of the server (a restore goes
    ahead) and is never logged. ValueError for `--api-key` without a value, or with several
    keys (vLLM takes a list; this image's middleware one key: the words after the first would
    have been taken for a model or logged as arguments)."""
    needs = "--api-key needs a value: docker run IMAGE --api-key KEY (or docker run -e FV_API_KEY=KEY)"
    rest: list[str] = []
    key: Optional[str] = None
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if not _spelling_of(name, API_KEY_ARG):
            rest.append(args[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(needs)
            value, i = args[i + 1], i + 1  # a key may start with '-'
        i += 1
        if i < len(args) and not args[i].startswith("-"):
            raise ValueError("--api-key was given more than one key, and this image's server takes one: docker run"
                             " IMAGE --api-key KEY (or docker run -e FV_API_KEY=KEY)")
        key = value
    return rest, key


def is_secret_option(name: str) -> bool:
    """A server option whose name says it holds a credential (--api-key, --hf-token: the names
    is_secret_name knows, as options), in any spelling vLLM's parser takes for one."""
    return name.startswith("--") and (is_secret_name(name[2:].replace("-", "_"))
                                      or any(_spelling_of(name, o) for o in _SECRET_OPTION_PREFIXES))


def shown_args(args: list[str]) -> list[str]:
    """ARGS as a log line may show them: the values of an option whose name says it holds a
    credential (--api-key, --hf-token; the names is_secret_name knows; in any spelling vLLM's
    parser takes) are left out, every word up to the next option (vLLM takes several keys)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if not is_secret_option(name):
            out.append(args[i])
            i += 1
            continue
        if eq:
            out.append(f"{name}=<hidden>")
        else:
            out.append(args[i])
            if i + 1 < len(args):  # its first value, whatever it looks like (a key may start with '-')
                out.append("<hidden>")
                i += 1
        i += 1
        while i < len(args) and not args[i].startswith("-"):  # its further values
            out.append("<hidden>")
            i += 1
    return out


# An event line of the middleware's, as the server prints it: vLLM may put its process prefix in
# front ("(APIServer pid=2) ", coloured where the output is a terminal) when it runs more processes.
_EVENT_LINE = re.compile(rb"^(?:\x1b\[[0-9;]*m)?(?:\([^)\n]*\)(?:\x1b\[[0-9;]*m)? )?fvboot-event (.*)$")


def parse_event(line: bytes) -> Optional[tuple[str, list[str]]]:
    """(event, arguments) if LINE is one of the middleware's event lines, else None."""
    m = _EVENT_LINE.match(line.rstrip(b"\r\n"))
    if not m:
        return None
    words = m.group(1).decode(errors="replace").split()
    return (words[0], words[1:]) if words else None


class LogPump(threading.Thread):
    """Copies one pipe to one of our streams line by line; hands fvboot-event lines to a callback."""

    def __init__(self, read_fd: int, err: bool, on_event: Callable[[str, list[str]], None]) -> None:
        super().__init__(daemon=True)
        self.read_fd, self.err, self.on_event = read_fd, err, on_event
        vllm_log.recent.stream_started()  # ended when this pump reaches the stream's end

    def run(self) -> None:
        quiet = ExitFilter()  # after a stop: vLLM's libraries' exit warnings (exitnoise.py)
        said = False
        try:
            with os.fdopen(self.read_fd, "rb", buffering=0) as f:
                for line in iter(f.readline, b""):
                    try:
                        self._pass_on(line, quiet)
                    except Exception as e:  # noqa: BLE001 -- the pipe must stay drained, whatever one line does
                        # stopped, nobody would read the pipe, and every process of the tree would
                        # block in its next write once it is full: a silent hang (found by review)
                        if not said:
                            said = True
                            print(f"fvboot: a line of the server's output could not be passed on ({type(e).__name__}:"
                                  f" {e}); its output is still read", file=sys.stderr, flush=True)
            for out in quiet.flush():
                write_line(out, self.err)
        finally:
            vllm_log.recent.stream_ended()

    def _pass_on(self, line: bytes, quiet: "ExitFilter") -> None:
        event = parse_event(line)
        if event:
            self.on_event(*event)
        vllm_log.recent.add(line)  # for vLLM's reason, should it exit
        for out in quiet.feed(line):
            write_line(out, self.err)


@dataclass
class Pipes:
    """The tree's stdout/stderr pipes (write ends go to the tree, read ends are pumped)."""

    out_r: int
    out_w: int
    err_r: int
    err_w: int

    @classmethod
    def create(cls) -> "Pipes":
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        return cls(out_r, out_w, err_r, err_w)

    def inodes(self) -> dict:
        return {"stdout": f"pipe:[{os.fstat(self.out_w).st_ino}]",
                "stderr": f"pipe:[{os.fstat(self.err_w).st_ino}]"}

    def pump(self, on_event: Callable[[str, list[str]], None]) -> None:
        LogPump(self.out_r, False, on_event).start()
        LogPump(self.err_r, True, on_event).start()

    def close_write_ends(self) -> None:
        for fd in (self.out_w, self.err_w):
            try:
                os.close(fd)
            except OSError:
                pass


NSINIT = ("-m", "fvboot.nsinit")  # how ServedTree runs the tree's init, and how running_server knows it


def running_server(proc: str = "/proc") -> Optional[int]:
    """The PID of a served tree's init (`python3 -m fvboot.nsinit ...`) in this PID namespace, or
    None: `docker exec C fvboot check` runs beside the container's own server, whose port is then
    held by it, not by "a process of the host"."""
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if argv[1:3] == [a.encode() for a in NSINIT]:
            return int(entry.name)
    return None


class ServedTree:
    """The vLLM tree in its own PID+mount namespace: `unshare` -> nsinit (PID 1 inside) -> server."""

    def __init__(self, cmd: list[str], env: dict, pipes: Pipes, namespaced: bool = True) -> None:
        self.pipes = pipes
        vllm_log.recent.clear()  # what an earlier tree said is not this one's reason
        argv = [sys.executable, *NSINIT, *cmd]
        if namespaced:  # nsinit mounts the namespace's /proc itself, with the container's guards
            argv = ["unshare", "--pid", "--fork", "--mount", "--propagation", "private",
                    *argv[:3], OWN_PROC, *cmd]
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=pipes.out_w,
                                     stderr=pipes.err_w, close_fds=True, start_new_session=True)
        self.namespaced = namespaced

    def alive(self) -> bool:
        return self.proc.poll() is None

    def init_pid(self, timeout: float = 10) -> int:
        """Host PID of the namespace's init (the root CRIU dumps)."""
        if not self.namespaced:
            return self.proc.pid
        deadline = time.monotonic() + timeout
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        while time.monotonic() < deadline:
            try:
                kids = open(path).read().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise ServerDied("the served tree's namespace init did not start")

    def terminate(self, timeout: float = 20) -> None:
        """SIGTERM to the namespace init (it forwards to the server); after TIMEOUT, SIGKILL to the
        init (a PID namespace dies with its init), to `unshare` and to their process group, so
        no vLLM process outlives us. Bounded: returns within TIMEOUT + ~10 s."""
        try:
            first = self.init_pid(timeout=1) if self.alive() else None
        except ServerDied:
            first = None
        if first is not None:
            _signal(first, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in ([first] if first else []) + [self.proc.pid]:
            _signal(pid, signal.SIGKILL)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # start_new_session: the group is ours alone
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            write_line(f"fvboot: process {self.proc.pid} did not die after SIGKILL", err=True)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
