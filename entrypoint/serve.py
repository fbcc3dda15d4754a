"""`fvboot serve` (the image's default): restore the baked server, or start vLLM normally.

Restore: manifest -> the checks, `compatibility.py` -> (page-cache prefetch, checking every memory-image piece
|| the restore's steps, `restore.py`) -> gate opens. Any failure on that path is logged as one line
with its reason and leads to a normal start with the same arguments, which still reuses the
compile caches baked into the image. Requests that arrive while the restored server is checked
wait at its gate; where the restore fails they end with it (their connections close, unanswered),
and until the normal start listens its port refuses connections: clients retry, and a load
balancer waits for /health.
Nothing waits unbounded (CRIU, the start, the tree's end have timeouts), what a failed restore
leaves is killed before the normal start, and SIGTERM (docker stop) at any point before the
server is up stops what runs and ends fvboot with 143; after that it is forwarded to vLLM.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import threading
import time
from typing import Callable, Optional

from . import compatibility, criu, cuda_checkpoint_service, errors, exitnoise, restore, runenv, vllm_log, weight_stager
from .caches import writable_caches
from .control import ServerControl
from .devices import DeviceLookup
from .errors import CheckpointUnusable, FvBootError, ServerDied, Stopped, stop_on_signals
from .launcher import (Pipes, ServedTree, arg_value, args_from_env, server_env, server_port,
                       shown_args, vllm_command)
from .layout import Layout
from .manifest import Manifest
from .oom import OomWatch
from .output import log
from .ports import check_serving_port
from .pagecheck import PageCheck
from .prefetch import prefetch
from .restore import RestoredTree
from .rlimits import too_few_open_files
from .runtime_file import add_runtime_info, private_folder, write_runtime_settings
from .start_inputs import read_start_inputs
from .timeline import Timeline

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """The restored tree is reparented to us, so we can wait for it (and reap what it leaves)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def kill_children(timeout: float = 30) -> list[int]:
    """SIGKILL every process that is our child (after a failed restore: CRIU, a half-restored or
    unchecked tree reparented to us, prefetch readers), then reap them, for at most TIMEOUT s
    (a restored worker's GPU teardown can take seconds), and say which still run after that:
    they may hold the port or GPU memory the normal start needs. Returns the PIDs killed.
    Nothing else runs as our child at these points."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            pids += [int(p) for p in open(f"/proc/self/task/{task}/children").read().split()]
        except OSError:
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.02)
    left = [pid for pid in pids if _running(pid)]
    if left:
        log(f"{len(left)} process(es) still ran {timeout:g} s after SIGKILL (pid {', '.join(map(str, left))}; in a"
            " driver call or the GPU's teardown?): what they hold, the port or GPU memory, may be taken still")
    return pids


def _running(pid: int) -> bool:
    """PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def serve(layout: Layout, run_args: list[str], devices: Optional[DeviceLookup] = None) -> int:
    # First of all: docker stop during a restore or a start stops what runs and ends the container
    # (143), instead of waiting for Docker's SIGKILL.
    stop_on_signals()
    tl = Timeline("serve")
    tl.mark("fvboot running")  # after Python's start-up and fvboot's imports
    inputs = read_start_inputs(layout, run_args)
    for line in inputs.notes:
        log(line)
    run_args, settings = inputs.run_args, inputs.settings
    become_subreaper()
    try:
        private_folder(layout.run_dir)
    except OSError as e:
        raise FvBootError(f"cannot make fvboot's run folder {layout.run_dir}: {e.strerror}") from None
    pipes = Pipes.create()
    pipes.pump(lambda ev, args: ev == "first_request_served" and _first_request(tl, args))
    tree = None
    outcome: dict = {}
    oom = OomWatch()
    try:
        tree = _start(layout, run_args, pipes, tl, settings, outcome, devices, oom)
        tl.print_table()
        _publish_startup(layout, tree, tl, outcome)
        return _supervise(tree, oom, drain=lambda: _drain(pipes))
    except Stopped as stop:
        log(f"stopped by signal {stop.signum} before the server was serving; stopping what runs")
        if tree is not None:
            tree.terminate(timeout=5)
        kill_children()
        return 128 + stop.signum
    except OSError as e:  # the normal start itself could not run (a full or read-only disk, ...)
        kill_children()
        raise FvBootError(f"vLLM could not be started normally either: {e}") from None


def _publish_startup(layout: Layout, tree, tl: Timeline, outcome: dict) -> None:
    """How this server started, for the middleware's /metrics (metrics.py); best effort."""
    path = "restored" if isinstance(tree, RestoredTree) else "normal"
    target = tree.runtime_file if path == "restored" else layout.runtime_file
    try:
        if target is None:
            raise ValueError("the restored server's runtime file is not known")
        add_runtime_info(target, startup={"path": path, "reason": outcome.get("reason", ""), "phases": tl.as_dict()})
    except (OSError, ValueError) as e:  # the server is up: metrics must never stop it
        log(f"start-up metrics not published: {e}")


def _start(layout: Layout, run_args: list[str], pipes: Pipes, tl: Timeline, settings: dict,
           outcome: Optional[dict] = None, devices: Optional[DeviceLookup] = None,
           oom: Optional[OomWatch] = None):
    """The restored tree, or after any failure on that path (said in one line, with its reason,
    and cleaned up), a normally started one. OUTCOME gets the reason of a fallback; DEVICES,
    this machine's GPUs looked up since fvboot's first line; OOM, the container's OOM kills
    counted since fvboot began (a kill is named as the cause of what failed)."""
    m: Optional[Manifest] = None  # None: missing or invalid; the normal start salvages what it can
    check: Optional[PageCheck] = None
    kernel_facts = None  # our own `criu check`, beside the checks: not a leftover of a restore
    stop_reading = threading.Event()
    try:
        m = compatibility.read_checkpoint_manifest(layout)
        tl.mark("manifest read")
        if runenv.value("FV_RESTORE") == "0":
            raise CheckpointUnusable("FV_RESTORE=0 asks for a normal start")
        kernel_facts = criu.warm_kernel_facts()  # CRIU's kernel probing, beside the checks
        # The cuda-checkpoint service starts first: its cuInit overlaps the checks and CRIU.
        with cuda_checkpoint_service.running(layout.run_dir, enabled=m.device.is_cuda) as service_env:
            here = compatibility.check_compatible(m, layout, run_args, devices)
            tl.mark("checks passed")
            # The big reads start after the checks, not beside them: a cold CPU restore measured
            # 0.24 s slower that way (bench/fvboot_ab.py --cold: CRIU's own small reads then queue
            # behind them). _supervise reaps the readers.
            check = PageCheck(layout.home, m.files)
            state = restore.RestoreState(layout, m, here, tl, pipes, service_env, settings, check,
                                         step_timeout_s=restore.step_timeout(),
                                         overlap_check=restore.weight_check_overlaps(),
                                         kv_first_when_cold=restore.kv_first_when_cold(),
                                         kv_beside_staged=restore.kv_beside_staged(),
                                         adopt=weight_stager.wake_memory() == "helper",
                                         kernel_facts=kernel_facts)
            if m.device.is_cuda:  # the dump onto the GPU while CRIU restores (FV_WEIGHT_STAGING)
                state.stager = weight_stager.start(layout.weights_dir, [g.uuid for g in here.gpus[:len(m.device.gpus)]],
                                                   m.gpu_bytes_at_checkpoint(), layout.run_dir,
                                                   m.sleep_pool() if state.adopt else (),
                                                   m.weights_at() if state.adopt else None)
                tl.mark("stager started")
            # a stager scans the dump's residency anyway: the prefetch takes its answer
            ahead = prefetch(layout, check, stop_reading,
                             weights=state.stager and weight_stager.StagerResidency(state.stager))
            state.residency = ahead.weights
            tl.mark("prefetch started")
            try:
                return restore.run(state)
            finally:
                if state.stager is not None:
                    state.stager.stop()  # done by now, or killed: its GPU memory is free either way
    except Exception as e:  # every failure of the restore path ends in the normal start
        stop_reading.set()  # the normal start must not share the disk with reads nobody needs
        # let it end (~60 ms, bounded): killed, its own children would be orphans called left
        criu.wait_kernel_facts(kernel_facts, timeout=criu.KDAT_WARM_WAIT_S)
        reason = errors.reason(e)
        if check is not None and check.problem and check.problem not in reason:
            reason = f"{check.problem} ({reason})"  # a damaged image explains what CRIU made of it
        killed = oom.since() if oom is not None else None
        if killed:  # what the restore saw was only a process gone or a connection closed
            reason = f"{killed} ({reason})"
        log(f"checkpoint not used: {reason}; starting vLLM normally (compile caches reused)")
        if outcome is not None:
            outcome["reason"] = reason
    left = kill_children()  # whatever the failed restore left (CRIU, a restored tree)
    if left:
        log(f"stopped {len(left)} process(es) the failed restore left")
    tl.mark("fallback start")
    return _cold_start(layout, m, run_args, pipes, tl, settings, oom)


def _first_request(tl: Timeline, args: list[str]) -> None:
    tl.mark("first request served", float(args[0]) if args else None)


def _salvage(layout: Layout) -> tuple[Optional[str], Optional[list], Optional[int]]:
    """(served name, vLLM args, port) from a manifest too damaged to restore from, where they can
    still be read: the normal start must be the same server (same name, same arguments)."""
    try:
        text = layout.manifest.read_text(errors="replace")
    except OSError:
        return None, None, None
    try:
        m = json.loads(text)
        name, args, port = m["model"]["served_name"], m["vllm"]["args"], m["vllm"]["port"]
        if isinstance(name, str) and isinstance(args, list) and isinstance(port, int):
            return name, [str(a) for a in args], port
    except (ValueError, KeyError, TypeError):
        pass
    name_m = re.search(r'"served_name"\s*:\s*("(?:[^"\\]|\\.)*")', text)
    args_m = re.search(r'"args"\s*:\s*(\[[^\]]*\])', text)
    port_m = re.search(r'"port"\s*:\s*(\d+)', text)
    try:
        name = json.loads(name_m.group(1)) if name_m else None
        args = [str(a) for a in json.loads(args_m.group(1))] if args_m else None
    except ValueError:
        name, args = None, None
    return name, args, int(port_m.group(1)) if port_m else None


def launch_command(layout: Layout, m: Optional[Manifest], run_args: list[str]) -> tuple[list[str], str, str]:
    """(command, served name, how it was found) for a normal start: the baked command, the run's
    arguments after it (vLLM takes the last value of an option given twice: `--port 9000` moves
    the baked server, it does not drop its --max-model-len); without a valid manifest (M None),
    what can be read from the damaged file."""
    if m is not None:
        added = args_from_env(list(m.vllm.command)) + list(run_args)  # the run's own last: they win
        cmd = list(m.vllm.command) + added
        how = "the baked command" + (f" and {shown_args(added)}" if added else "")
        name = arg_value(added, "--served-model-name") or m.model.served_name
        return [c for c in cmd if c != "--enable-sleep-mode"], name, how
    name, args, port = _salvage(layout)
    found = [what for what, v in (("name", name), ("arguments", args), ("port", port)) if v is not None]
    how = (f"the baked {', '.join(found)} read from the damaged manifest" if found
           else "the image's defaults (no baked name or arguments could be read)")
    name = name or os.environ.get("FV_SERVED_MODEL") or str(layout.model_dir)
    port = port or int(runenv.value("FV_PORT"))
    cmd = vllm_command(str(layout.model_dir), name, port, (args or []) + list(run_args), sleep_mode=False)
    return cmd, name, how


START_TIMEOUT_ENV = "FV_START_TIMEOUT_S"


def _cold_start(layout: Layout, m: Optional[Manifest], run_args: list[str], pipes: Pipes, tl: Timeline,
                settings: dict, oom: Optional[OomWatch] = None):
    cmd, name, how = launch_command(layout, m, run_args)
    port = server_port(cmd)
    timeout = runenv.seconds(START_TIMEOUT_ENV)
    check_serving_port(cmd)  # taken: no start can serve, and vLLM would say so only after its imports
    log(f"starting vLLM with {how}; waiting up to {timeout:.0f} s for it on port {port}")
    caches = writable_caches(layout)
    token = write_runtime_settings(layout.runtime_file, settings)
    # fvboot calls nothing but /health and the gate's state here: no dev routes in this server.
    tree = ServedTree(cmd, server_env(layout.runtime_file, dev_mode=False, extra=caches), pipes, namespaced=False)
    try:
        ServerControl(port, token, name).wait_healthy(timeout, tree.alive)
    except ServerDied as e:
        tree.terminate(timeout=5)
        killed = oom.since() if oom is not None else None
        if killed:  # vLLM's log shows nothing of a SIGKILL
            raise ServerDied(f"{e}: {killed}") from None
        low = too_few_open_files()
        if low:  # vLLM's log shows a worker's traceback, or "Too many open files" somewhere in it
            raise ServerDied(f"{e}; {low}") from None
        raise
    except BaseException:
        tree.terminate(timeout=5)  # within docker stop's 10 s grace
        raise
    tl.mark("ready")
    return tree


def _drain(pipes: Pipes, wait: float = 2.0) -> None:
    """Once the tree has ended: let the log pumps pass on what it wrote last (why it ended, most
    often) before fvboot's own last line and exit (found by review, 2026-12-06: a server's last
    lines were lost from `docker logs`), WAIT s at most."""
    pipes.close_write_ends()
    vllm_log.recent.said(wait)


def _supervise(tree, oom: Optional[OomWatch] = None, drain: Callable[[], None] = lambda: None) -> int:
    """Wait for the tree, reaping whatever is reparented to us; forward SIGTERM/SIGINT to it.
    Its end is said in one line (after DRAIN, which passes on its last output), with the OOM
    killer's part in it where it had one."""
    root = tree.pid if isinstance(tree, RestoredTree) else tree.proc.pid
    exitnoise.forward_stops(root)
    code = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == root:
            code = os.waitstatus_to_exitcode(status)
            break
    drain()
    quiet = exitnoise.dropped()
    stopped = exitnoise.stopping.is_set()
    killed = oom.since() if oom is not None and not stopped else None
    log(f"vLLM exited with code {code}" + (f" ({quiet} lines of its libraries' exit warnings not shown)"
                                           if quiet else "") + (f": {killed}" if killed else ""))
    if code == 0 and not stopped:
        # vLLM's API server shuts down cleanly, exit 0, when its engine dies (found by hand,
        # 2026-12-05: a worker killed): a container that ends so must not read as a job done
        log("the server ended while serving, unasked (its log above says why): exit 1, so that a restart"
            " policy (on-failure, a pod's) starts the container again")
        return 1
    return code & 0xFF if code >= 0 else 128 - code
