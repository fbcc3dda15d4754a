"""The restore, as a short pipeline of named steps over one state object.

Once `compatibility.check_compatible` has found that this checkpoint can serve here, `run`
takes the steps in order, each marked on the timeline under its name: a fresh admin token
for the restored middleware, /dev/shm as it was at the dump, `criu restore` (bounded; the GPU
UUID map and the huge-page choice go to it), the weights back (every tensor checked, or with
FV_WEIGHT_CHECK=overlap the checking left to finish meanwhile), the KV cache awake, the probe's
answers equal to the bake's, the weights' checks done, every memory-image piece matched
(pagecheck), and only then the gate opens. A step raises (CheckpointUnusable with the reason, or
anything else) and `run` kills what was restored; the caller (`serve._start`) makes the one
fallback decision for every failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import control, criu, exitnoise, pagecheck, runenv
from .control import ServerControl
from .errors import CheckpointUnusable, ServerError
from .launcher import Pipes, load_settings
from .layout import Layout
from .manifest import Device, Manifest, ProbeAnswer
from .output import log
from .pagecheck import PageCheck
from .prefetch import Residency
from .runtime_file import write_runtime_settings
from .timeline import Timeline
from .weight_stager import Stager

PROBE_LOGPROB_TOL = 1e-3


def gpu_device_map(baked: Device, here: Device) -> str:
    """`old=new,...` GPU UUID pairs (by index) where this node's GPUs are not the baking node's:
    an image baked on one node restores on any node of the same GPU model."""
    if not (baked.is_cuda and here.is_cuda):
        return ""
    pairs = [(b.uuid, h.uuid) for b, h in zip(baked.gpus, here.gpus) if b.uuid != h.uuid]
    return ",".join(f"{old}={new}" for old, new in pairs)


class RestoredTree:
    """The restored namespace init, reparented to us."""

    def __init__(self, pid: int, runtime_file: Optional[Path] = None) -> None:
        self.pid = pid
        self.runtime_file = runtime_file  # where its middleware reads this start's settings
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

    def terminate(self, timeout: float = 10) -> None:
        """SIGKILL to the init (the PID namespace dies with it); waits at most TIMEOUT."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                log(f"the restored tree (pid {self.pid}) did not die within {timeout:.0f} s of SIGKILL")
                return
            time.sleep(0.02)


def same_answers(now: list[dict], baked: Sequence[ProbeAnswer]) -> Optional[str]:
    """None if the answers NOW (as ServerControl.probe gives them) are the baked ones, else how not.
    No baked answers, or not one answer for each, is a difference: nothing was compared."""
    if not baked:
        return "the manifest holds no probe answers to compare the restored server's with"
    if len(now) != len(baked):
        return f"the probe gave {len(now)} answers for the bake's {len(baked)}"
    for a, b in zip(now, baked):
        if a.get("prompt", b.prompt) != b.prompt:
            return f"the probe asked {a['prompt']!r} where the bake asked {b.prompt!r}"
        if a["text"] != b.text:
            return f"probe {b.prompt!r} answered {a['text']!r}, baked answer {b.text!r}"
        if len(a["logprobs"]) != len(b.logprobs) or any(
                abs(x - y) > PROBE_LOGPROB_TOL for x, y in zip(a["logprobs"], b.logprobs)):
            return f"probe {b.prompt!r}: logprobs differ from the bake's"
    return None


STEP_TIMEOUT_ENV = "FV_RESTORE_STEP_TIMEOUT_S"
STEP_TIMEOUT_S = float(runenv.SETTINGS[STEP_TIMEOUT_ENV].default)
# The probe's own bound, within the step's: a warmed engine answers it in well under a second
# (0.16 s at 3B on an H200, the same prompts as the bake's warm-up, nothing to compile); one
# that does not answer in a minute has lost its GPU state, and the normal start should not
# wait the step's five minutes behind it
PROBE_TIMEOUT_S = 60.0


def step_timeout() -> float:
    """FV_RESTORE_STEP_TIMEOUT_S (default 300): how long each call to the restored server (wake,
    weight load, each probe, the gate) may stay silent; a tree that stops answering (a GPU state
    that did not come back blocks its CUDA calls) then ends in the normal start. Read once,
    before the restore: a bad value is found before CRIU runs."""
    return runenv.seconds(STEP_TIMEOUT_ENV)


WEIGHT_CHECK_ENV = "FV_WEIGHT_CHECK"


def weight_check_overlaps() -> bool:
    """FV_WEIGHT_CHECK: "overlap" (default) lets the weights' checksums finish beside the KV wake
    and the probe, and waits for them before the gate opens (3B CUDA image on an H200, restores
    interleaved with inline ones: ~0.1 s sooner in 5 rounds of 7); "inline" checks every weight
    before the KV cache wakes. Either way nothing is served before every weight is checked.
    Read before the restore: a bad value is found before CRIU runs."""
    return runenv.value(WEIGHT_CHECK_ENV) == "overlap"


WAKE_ORDER_ENV = "FV_WAKE_ORDER"


def kv_first_when_cold() -> bool:
    """FV_WAKE_ORDER: "auto" (default) wakes a GPU engine's KV cache before its weights are
    loaded when they come from the disk (the dump not all cached, nothing staged): the disk is
    what the load waits for, the prefetch keeps it reading during the wake, and the wake (~0.26
    s on an H200) leaves the path to the first token. With the weights in memory, and always
    with "weights-first", the KV cache wakes after the load (a staged copy is freed first:
    the KV cache may need that memory). "kv-beside" is "auto", and with staged weights the
    KV cache wakes while the worker takes the stager's copy, where the GPU has room for both
    (see ``kv_beside_staged``). Read before the restore."""
    return runenv.value(WAKE_ORDER_ENV) != "weights-first"


def kv_beside_staged() -> bool:
    """FV_WAKE_ORDER=kv-beside: the worker takes the stager's copy in a thread of its own while
    the engine wakes the KV cache (the copy is ~0.06 s, the wake ~0.26 s on an H200), where the
    GPU's free memory holds the KV cache beside the stager's buffer; else the buffer is freed
    first, as by default. Read before the restore."""
    return runenv.value(WAKE_ORDER_ENV) == "kv-beside"


@dataclass
class RestoreState:
    """What the steps share: their inputs, and what earlier steps made for later ones."""

    layout: Layout
    manifest: Manifest
    here: Device
    tl: Timeline
    pipes: Pipes
    criu_env: dict[str, str]
    settings: dict
    check: PageCheck
    ctl: Optional[ServerControl] = None
    tree: Optional[RestoredTree] = None
    step_timeout_s: float = STEP_TIMEOUT_S  # bound of each call to the restored server: step_timeout()
    residency: Optional[Residency] = None  # the prefetch's finding: is the weight dump all cached?
    overlap_check: bool = False  # weight_check_overlaps(): the checksums finish beside the wake and probe
    kv_first_when_cold: bool = False  # kv_first_when_cold(): the KV cache wakes before weights read from disk
    kv_beside_staged: bool = False  # kv_beside_staged(): the KV cache wakes while the staged copy is taken
    adopt: bool = False  # FV_WAKE_MEMORY=helper: the stager made the sleeping memory, the worker adopts it
    adopted: bool = False  # and the worker did adopt it
    kv_awake: bool = False  # the KV cache woke already (before a load from the disk, or beside a staged copy)
    checks_left: int = 0  # weight checks the load said it left running
    load_deferred_checks: bool = False  # the worker's load was asked to leave checks running
    stager: Optional[Stager] = None  # the weight dump being staged on the GPU (FV_WEIGHT_STAGING)
    staged: bool = False  # the worker took the stager's copy: its verdict is the weights' check
    kernel_facts: Optional[subprocess.Popen] = None  # criu.warm_kernel_facts(), started beside the checks

    @property
    def gpu(self) -> bool:
        return self.manifest.device.is_cuda


def fresh_token(s: RestoreState) -> None:
    """This container's own admin token, where the restored middleware will look for it."""
    if not s.manifest.runtime_file:
        raise CheckpointUnusable("baked by an fvboot that froze its admin token in the checkpoint; re-bake the image")
    token = write_runtime_settings(Path(s.manifest.runtime_file), s.settings)
    s.ctl = ServerControl(s.manifest.vllm.port, token, s.manifest.model.served_name)


def dev_shm(s: RestoreState) -> None:
    """Put /dev/shm back as it was at the dump (over any leftovers of an earlier run)."""
    r = subprocess.run(["tar", "--sparse", "--overwrite", "-xf", str(s.layout.shm_archive), "-C", "/dev/shm"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise CheckpointUnusable(f"cannot restore /dev/shm: {r.stderr.strip()}")


def criu_restore(s: RestoreState) -> None:
    """`criu restore` of the tree (bounded by FV_CRIU_RESTORE_TIMEOUT_S), onto this node's GPUs."""
    device_map = gpu_device_map(s.manifest.device, s.here)
    if device_map:
        log(f"restoring onto other GPUs of the same model: {device_map}")
    thp, why = criu.restore_thp()
    if not thp:
        log(f"memory is restored into 4 KiB pages: {why}")
    mapped, why = criu.restore_map_pages(s.manifest.zeroing_allocators())
    if not mapped:
        log(f"memory is read back whole, not mapped from the checkpoint: {why}")
    criu.wait_kernel_facts(s.kernel_facts)  # done by now, as a rule: the restore loads its cache
    issued = time.time()
    s.tl.mark("restore issued", issued)
    control.warm_up()  # the HTTP client the steps after CRIU need, imported while it runs
    m = s.manifest
    pid = criu.restore(s.layout.images_dir, s.layout.run_dir,
                       [(s.pipes.out_w, m.pipes.stdout), (s.pipes.err_w, m.pipes.stderr)],
                       env={**s.criu_env, **({"FV_CUDA_DEVICE_MAP": device_map} if device_map else {}),
                            **({} if mapped else {"CRIU_RESTORE_MAP_PAGES": "0"})})
    s.tree = RestoredTree(pid, Path(m.runtime_file))
    restore_log = criu.read_restore_log(s.layout.run_dir / "criu-restore.log")
    if s.gpu and restore_log.gpu_failure:  # CRIU carried on; the tree would block on its first CUDA call
        onto = f" (onto other GPUs: {device_map})" if device_map else ""
        raise CheckpointUnusable(f"the GPU state was not resumed{onto}: {restore_log.gpu_failure}")
    phases = restore_log.phases
    if "cuda_resume_start" in phases:
        s.tl.mark("criu: memory restored", issued + phases["cuda_resume_start"])
        s.tl.mark("criu: CUDA resumed", issued + phases.get("restore_finished", phases["cuda_resume_start"]))


def load_weights(s: RestoreState) -> None:
    """The weights back from the dump, every tensor checked against its checksum, with this
    start's FV_LOAD_* settings; the loader is told when the prefetch found the dump all cached,
    so it does not check again. With a weight stager, the worker first tries its copy already on
    the GPU (``take_staged``). The KV cache wakes after, not beside (both take the driver's
    locks; overlapping them with the page-cache load measured no faster), except that weights
    read from the disk wait for it to wake first (``kv_first_when_cold``), and a staged copy
    may be taken beside it (``kv_beside_staged``)."""
    if s.gpu and s.adopt and s.stager is not None:
        adopt_memory(s)
    if s.gpu:
        s.ctl.wake_up(["weights"], timeout=s.step_timeout_s)
        s.tl.mark("weight memory mapped")
    if s.stager is not None and take_staged(s):
        return
    cached = s.residency is not None and s.residency.resident()
    if s.gpu and s.kv_first_when_cold and not cached:
        wake_engine(s)  # while the prefetch keeps the disk busy with the weights
        s.tl.mark("KV cache awake (the weights come from the disk)")
    stats = s.ctl.rpc("fv_load_weights", str(s.layout.weights_dir), True, load_settings(), cached,
                      s.overlap_check, timeout=s.step_timeout_s)
    s.load_deferred_checks = s.overlap_check
    s.checks_left = sum(int(r.get("checking", 0)) for r in stats if isinstance(r, dict))
    log(f"weights: {stats}")


def adopt_memory(s: RestoreState) -> None:
    """FV_WAKE_MEMORY=helper: the worker takes the allocations the stager made while CRIU
    restored it, and the wakes after map them instead of creating memory (fvboot.adopt).
    Whatever fails is said, the stager gives that memory back before the wakes need it, and
    vLLM then allocates its memory itself."""
    if not s.stager.makes_pool:
        log("the engine allocates its memory itself: this image's bake did not record its sleeping memory")
        return
    pool = s.stager.pool()
    if pool is None:
        log(f"the engine allocates its memory itself: {s.stager.why_no_pool}")
        s.stager.drop_pool()  # one still being made must not take the KV cache's room
        return
    try:
        stats = s.ctl.rpc("fv_adopt_memory", pool["socket"], pool["pool"], timeout=s.step_timeout_s)
    except ServerError as e:
        log(f"the engine allocates its memory itself: the worker could not adopt the stager's: {e}")
        s.stager.drop_pool()
        return
    s.adopted = True
    s.tl.mark("memory adopted")
    log(f"memory made by the stager in {pool.get('seconds')} s, adopted: {stats}")


def take_staged(s: RestoreState) -> bool:
    """The worker copies the weights from the stager's buffer on its GPU, or, where the stager
    put the dump straight into the weights memory the worker adopted (``in_place``), takes them
    as they are; True when it did. The stager frees its buffer before this returns, used or not
    (the KV cache may need that memory), without waiting where the KV cache woke already.
    Whatever fails is said, and the worker then loads the weights itself."""
    stager = s.stager
    ready = stager.ready()
    stats = None
    if ready is not None and ready.get("in_place"):
        if not s.adopted:
            stager.why = "the stager put the dump into memory the worker did not adopt"
        else:
            try:
                stats = s.ctl.rpc("fv_weights_in_place", timeout=s.step_timeout_s)
                s.staged = True
            except ServerError as e:
                stager.why = f"the weights the worker adopted are not all the stager's: {e}"
    elif ready is not None:
        args = (str(s.layout.weights_dir), ready["handle"], ready["size"], ready["gpu"])
        try:
            if s.kv_beside_staged:
                stats = _take_beside_kv_wake(s, args)
            else:
                stats = s.ctl.rpc("fv_take_staged", *args, timeout=s.step_timeout_s)
            s.staged = True
        except ServerError as e:
            stager.why = f"the worker could not take the stager's copy: {e}"
    if s.staged:
        in_place = bool(ready.get("in_place"))
        s.tl.mark("weights in place" if in_place else "staged copy taken")
        stager.release(wait=not s.kv_awake)
        yielded = f", yielded to the CUDA resume {ready['yielded_s']} s" if "yielded_s" in ready else ""
        how = "put in place by the stager" if in_place else "taken from the stager's copy on the GPU"
        log(f"weights: {how} (staged {ready.get('t')} s after it started,"
            f" context {ready.get('context_s')} s, {ready.get('copy', 'register')}: page-locking"
            f" {ready.get('register_s')} s{yielded}): {stats}")
    else:
        stager.stop()
        log(f"weights not staged: {stager.why}; the worker loads them")
    return s.staged


def _take_beside_kv_wake(s: RestoreState, args: tuple) -> list:
    """The worker starts taking the staged copy in a thread and says whether the GPU has room
    for the KV cache beside the stager's buffer; if it has, the engine wakes the KV cache
    meanwhile. Then wait for the copy (its failure raises ServerError, as an inline take's)."""
    started = s.ctl.rpc("fv_take_staged", *args, True, timeout=s.step_timeout_s)
    rooms = [r.get("kv_room") if isinstance(r, dict) else None for r in started]
    if rooms and all(isinstance(r, dict) and r.get("room") for r in rooms):
        wake_engine(s)
        s.tl.mark("KV cache awake (beside the staged copy)")
    else:
        why = "; ".join(str((r or {}).get("why", r)) for r in rooms) or "no answer"
        log(f"the KV cache wakes after the stager's buffer is freed: {why}")
    return s.ctl.rpc("fv_staged_taken", s.step_timeout_s, timeout=s.step_timeout_s + 10)


def wake_engine(s: RestoreState) -> None:
    if not s.kv_awake:
        # only a tag vLLM's sleep set (weights, kv_cache): its executor refuses a whole wake
        # that names another, and the KV cache then stays unmapped (the first request hangs).
        # The graphs' memory, where the bake put it to sleep, carries the KV cache's tag
        s.ctl.wake_up(["kv_cache"] if s.gpu else None, timeout=s.step_timeout_s)
        if s.gpu and s.ctl.is_sleeping(timeout=s.step_timeout_s):
            # vLLM answers a refused wake with 200 and a warning; the first request would then
            # wait on memory that is not mapped until the probe's bound
            raise CheckpointUnusable("vLLM did not wake its engine: it still counts part of it asleep"
                                     " (its log above says which tag)")
        s.kv_awake = True


def check_answers(s: RestoreState) -> None:
    """The probe's answers must be the bake's. Where the bake recorded steady answers to all its
    prompts in one request, ask that way first (one batch: a third of the steps); a batch that
    formed otherwise can round otherwise, so a difference there only sends the prompts again
    one at a time, and those answers decide."""
    bound = min(s.step_timeout_s, PROBE_TIMEOUT_S)
    together = s.manifest.probe_together
    if together:
        mismatch = same_answers(s.ctl.probe_together(timeout=bound), together)
        if mismatch is None:
            return
        log(f"the probe's prompts asked in one request answered otherwise ({mismatch}); asking one at a time")
        s.tl.mark("probe asked together: other answers")
    mismatch = same_answers(s.ctl.probe(timeout=bound), s.manifest.probe)
    if mismatch:
        raise CheckpointUnusable("restored server gives other answers than the baked one: " + mismatch)


def check_weights(s: RestoreState) -> None:
    """The weight checksums the load left running (FV_WEIGHT_CHECK=overlap), or the stager's
    check of the dump its copy came from, before any client is served; a mismatch names the
    tensor, as an inline check does."""
    if s.staged:
        verdict = s.stager.verdict(s.step_timeout_s)
        log(f"weights checked by the stager: every entry of the cached dump in {verdict.get('seconds')} s")
    if s.checks_left or s.load_deferred_checks:  # asked, not counted: an answer of another shape counts 0
        stats = s.ctl.rpc("fv_weights_checked", s.step_timeout_s, timeout=s.step_timeout_s + 10)
        log(f"weights checked: {stats}")


def check_memory_images(s: RestoreState) -> None:
    problem = s.check.result(pagecheck.check_timeout())
    if problem:
        raise CheckpointUnusable(problem)


def open_gate(s: RestoreState) -> None:
    log(f"restored from checkpoint in {s.tl.events[-1][1]:.2f} s since start; opening the gate")
    try:
        metrics = s.ctl.gate("open", timeout=s.step_timeout_s).get("metrics") or {}
    except (OSError, ValueError, ServerError) as e:
        # the middleware opens the gate before it answers: an answer lost or late may leave a
        # server already serving checked answers, which stopping now would cut off mid-request
        if not s.ctl.gate_is_open():
            raise
        log(f"the gate is open, though opening it answered: {e}")
        metrics = {}
    if s.tree is not None:  # serving now: a stop from here on is the server's graceful one
        exitnoise.forward_stops(s.tree.pid)
    if metrics.get("not_zeroed") or metrics.get("skipped"):  # served anyway: monitoring only
        log(f"vLLM's metrics still count the bake's warm-up and this start's probe: {metrics}")


# (timeline mark when done, step): the restore, in order.
STEPS: tuple[tuple[str, Callable[[RestoreState], None]], ...] = (
    ("token written", fresh_token),
    ("/dev/shm restored", dev_shm),
    ("restore done", criu_restore),
    ("weights loaded", load_weights),
    ("engine awake", wake_engine),
    ("answers checked", check_answers),
    ("weights checked", check_weights),
    ("memory images checked", check_memory_images),
    ("ready", open_gate),
)


def run(s: RestoreState) -> RestoredTree:
    """Every step in order; on any failure, what was restored is killed and the error goes up."""
    try:
        for mark, step in STEPS:
            step(s)
            s.tl.mark(mark)
    except BaseException:
        if s.tree is not None:
            s.tree.terminate()
        raise
    return s.tree
