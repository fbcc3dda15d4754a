"""`fvboot serve` (the image's default): restore the baked server, or start vLLM normally.

Restore: manifest -> compatibility check -> (page-cache prefetch || criu restore) -> weights back
-> probe answers equal the bake's -> gate opens. Any failure on that path is logged as one line
with its reason and leads to a normal start with the same arguments, which still reuses the
compile caches baked into the image. Requests that arrive meanwhile wait at the gate.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from . import criu, cuda_checkpoint_service, manifest
from .control import ServerControl
from .errors import CheckpointUnusable, FvBootError
from .launcher import Pipes, ServedTree, runtime_settings, server_env, vllm_command, write_runtime_settings
from .layout import Layout
from .output import write_line
from .prefetch import prefetch
from .timeline import Timeline

_PR_SET_CHILD_SUBREAPER = 36
PROBE_LOGPROB_TOL = 1e-3


def log(msg: str) -> None:
    write_line(f"fvboot: {msg}", err=True)


def become_subreaper() -> None:
    """The restored tree is reparented to us, so we can wait for it (and reap what it leaves)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def check_compatible(m: dict, layout: Layout, run_args: list[str]) -> dict:
    """Raise CheckpointUnusable with the reason if this checkpoint cannot serve here; return this
    machine's device info (the restore maps GPUs with it)."""
    if m.get("format") != manifest.FORMAT:
        raise CheckpointUnusable(f"manifest format {m.get('format')} is not {manifest.FORMAT}")
    if run_args and run_args != m["vllm"]["args"]:
        raise CheckpointUnusable(f"arguments {run_args} differ from the baked ones {m['vllm']['args']}")
    baked, here = m["device"], manifest.device_info()
    if baked["kind"] != here["kind"]:
        raise CheckpointUnusable(f"baked on {baked['kind']}, running on {here['kind']}")
    if here["kind"] == "cuda":
        b_names = [g["name"] for g in baked["gpus"]]
        h_names = [g["name"] for g in here["gpus"]][: len(b_names)]
        if b_names != h_names:
            raise CheckpointUnusable(f"baked on {b_names}, this machine has {h_names}")
        if baked["driver"] != here["driver"]:
            raise CheckpointUnusable(f"baked with driver {baked['driver']}, this machine has {here['driver']}")
    problem = manifest.verify_files(layout.home, m["files"])
    if problem:
        raise CheckpointUnusable(problem)
    if shutil.which("criu") is None:
        raise CheckpointUnusable("criu is not on PATH")
    return here


def gpu_device_map(baked: dict, here: dict) -> str:
    """`old=new,...` GPU UUID pairs (by index) where this node's GPUs are not the baking node's:
    an image baked on one node restores on any node of the same GPU model."""
    if baked.get("kind") != "cuda" or here.get("kind") != "cuda":
        return ""
    pairs = [(b["uuid"], h["uuid"]) for b, h in zip(baked["gpus"], here["gpus"]) if b["uuid"] != h["uuid"]]
    return ",".join(f"{old}={new}" for old, new in pairs)


def restore_dev_shm(layout: Layout) -> None:
    """Put /dev/shm back as it was at the dump (over any leftovers of an earlier run)."""
    r = subprocess.run(["tar", "--sparse", "--overwrite", "-xf", str(layout.shm_archive), "-C", "/dev/shm"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise CheckpointUnusable(f"cannot restore /dev/shm: {r.stderr.strip()}")


class RestoredTree:
    """The restored namespace init, reparented to us."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: Optional[int] = None

    def alive(self) -> bool:
        if self.code is not None:
            return False
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return os.path.exists(f"/proc/{self.pid}")
        if pid == 0:
            return True
        self.code = os.waitstatus_to_exitcode(status)
        return False

    def terminate(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)  # the PID namespace dies with its init
        except ProcessLookupError:
            return
        while self.alive():
            time.sleep(0.02)


def _same_answers(now: list[dict], baked: list[dict]) -> Optional[str]:
    for a, b in zip(now, baked):
        if a["text"] != b["text"]:
            return f"probe {b['prompt']!r} answered {a['text']!r}, baked answer {b['text']!r}"
        if len(a["logprobs"]) != len(b["logprobs"]) or any(
                abs(x - y) > PROBE_LOGPROB_TOL for x, y in zip(a["logprobs"], b["logprobs"])):
            return f"probe {b['prompt']!r}: logprobs differ from the bake's"
    return None


def restore(layout: Layout, m: dict, here: dict, tl: Timeline, pipes: Pipes,
            criu_env: dict[str, str]) -> RestoredTree:
    # A fresh token for this container, where the restored middleware will look for it.
    token = write_runtime_settings(Path(m.get("runtime_file") or layout.runtime_file), runtime_settings())
    ctl = ServerControl(m["vllm"]["port"], token, m["model"]["served_name"])
    restore_dev_shm(layout)
    device_map = gpu_device_map(m["device"], here)
    if device_map:
        log(f"restoring onto other GPUs of the same model: {device_map}")
    thp, why = criu.restore_thp()
    if not thp:
        log(f"memory is restored into 4 KiB pages: {why}")
    issued = time.time()
    tl.mark("restore issued", issued)
    gpu = m["device"]["kind"] == "cuda"
    pid = criu.restore(layout.images_dir, layout.run_dir,
                       [(pipes.out_w, m["pipes"]["stdout"]), (pipes.err_w, m["pipes"]["stderr"])],
                       env={**criu_env, **({"FV_CUDA_DEVICE_MAP": device_map} if device_map else {})})
    tree = RestoredTree(pid)
    phases = criu.restore_phases(layout.run_dir / "criu-restore.log")
    if "cuda_resume_start" in phases:
        tl.mark("criu: memory restored", issued + phases["cuda_resume_start"])
        tl.mark("criu: CUDA resumed", issued + phases.get("restore_finished", phases["cuda_resume_start"]))
    tl.mark("restore done")
    try:
        # One after the other: the KV cache's wake-up and the weight load both take the
        # driver's locks; overlapping them in the worker measured no faster.
        if gpu:
            ctl.wake_up(["weights"])
        stats = ctl.rpc("fv_load_weights", str(layout.weights_dir))
        tl.mark("weights loaded")
        log(f"weights: {stats}")
        ctl.wake_up(["kv_cache"] if gpu else None)
        tl.mark("engine awake")
        mismatch = _same_answers(ctl.probe(), m["probe"])
        if mismatch:
            raise CheckpointUnusable("restored server gives other answers than the baked one: " + mismatch)
        tl.mark("answers checked")
        log(f"restored from checkpoint in {tl.events[-1][1]:.2f} s since start; opening the gate")
        ctl.gate("open")
        tl.mark("ready")
    except BaseException:
        tree.terminate()
        raise
    return tree


def serve(layout: Layout, run_args: list[str]) -> int:
    tl = Timeline("serve")
    tl.mark("fvboot running")  # after Python's start-up and fvboot's imports
    become_subreaper()
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    pipes = Pipes.create()
    pipes.pump(lambda ev, args: ev == "first_request_served" and _first_request(tl, args))
    tree = None
    m: Optional[dict] = None
    try:
        if not layout.manifest.exists():
            raise CheckpointUnusable(f"no checkpoint in this image ({layout.manifest} is missing)")
        m = manifest.read(layout.manifest)
        tl.mark("manifest read")
        if os.environ.get("FV_RESTORE", "1") == "0":
            raise CheckpointUnusable("FV_RESTORE=0 asks for a normal start")
        # The cuda-checkpoint service starts first: its cuInit overlaps the checks and CRIU.
        gpu = m.get("device", {}).get("kind") == "cuda"
        with cuda_checkpoint_service.running(layout.run_dir, enabled=gpu) as service_env:
            here = check_compatible(m, layout, run_args)
            tl.mark("checks passed")
            prefetch(layout)  # runs beside the restore; _supervise reaps the readers
            tree = restore(layout, m, here, tl, pipes, service_env)
    except (CheckpointUnusable, FvBootError, OSError, ValueError, KeyError) as e:
        reason = str(e) if isinstance(e, FvBootError) else f"{type(e).__name__}: {e}"
        log(f"checkpoint not used: {reason}; starting vLLM normally (compile caches reused)")
        tl.mark("fallback start")
        tree = _cold_start(layout, m, run_args, pipes, tl)
    tl.print_table()
    return _supervise(tree)


def _first_request(tl: Timeline, args: list[str]) -> None:
    tl.mark("first request served", float(args[0]) if args else None)


def _cold_start(layout: Layout, m: Optional[dict], run_args: list[str], pipes: Pipes, tl: Timeline):
    if m is not None:
        cmd, args = m["vllm"]["command"], run_args or m["vllm"]["args"]
        cmd = cmd[: len(cmd) - len(m["vllm"]["args"])] + args
        cmd = [c for c in cmd if c != "--enable-sleep-mode"]
        port, name = m["vllm"]["port"], m["model"]["served_name"]
    else:
        port = int(os.environ.get("FV_PORT", "8000"))
        name = os.environ.get("FV_SERVED_MODEL", str(layout.model_dir))
        cmd = vllm_command(str(layout.model_dir), name, port, run_args, sleep_mode=False)
    write_runtime_settings(layout.runtime_file, runtime_settings())
    # fvboot calls nothing but /health here: no dev routes in this server.
    tree = ServedTree(cmd, server_env(layout.runtime_file, dev_mode=False), pipes, namespaced=False)
    ServerControl(port, "", name).wait_healthy(3600, tree.alive)
    tl.mark("ready")
    return tree


def _supervise(tree) -> int:
    """Wait for the tree, reaping whatever is reparented to us; forward SIGTERM/SIGINT to it."""
    root = tree.pid if isinstance(tree, RestoredTree) else tree.proc.pid

    def stop(signum, _frame):
        try:
            os.kill(root, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == root:
            code = os.waitstatus_to_exitcode(status)
            break
    log(f"vLLM exited with code {code}")
    return code & 0xFF if code >= 0 else 128 - code
