"""`fvbuild bench IMAGE`: seconds from `docker run` to the first correct answer, per start path,
all in one run on this machine, and the picture of where a restore's time goes.

Paths, each started in fresh containers:
  restore   the image as shipped (restore from the checkpoint), page cache warm: after one
            untimed restore, whatever ran before
  cold      the same with the page cache dropped first (needs root on the host)
  normal    a normal vLLM start of the same image (FV_RESTORE=0): the baked compile caches reused
  nocache   a normal start with empty compile caches: what a plain `vllm serve` pays

With --cold, the disk under Docker's data is measured in the same run (sequential read, page
cache dropped): the cold restore's target is relative to it. The table ends with the targets
that apply to the image and, for a GPU image, figures published elsewhere (labelled so).

"Correct" is the greedy answer recorded at bake for the first probe prompt. The restored server
and the normal start then answer prompts that are not the probe's (greedy text and logprobs);
the two must be identical. Containers are started with the `docker` command line, as operators
start them (so this module does not go through engine.py's docker-py): that is what is timed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import BenchError

EXTRA_PROMPTS = ("A list of colours: red,", "def fibonacci(n):", "The moon is")
PATHS = (("restore_s", "restore from checkpoint (warm)"), ("cold_s", "restore, page cache dropped"),
         ("normal_s", "normal vLLM start (baked compile caches)"),
         ("nocache_s", "normal vLLM start (empty compile caches)"))
EMPTY_CACHES = ("-e", "VLLM_CACHE_ROOT=/tmp/nc/vllm", "-e", "TORCHINDUCTOR_CACHE_DIR=/tmp/nc/inductor",
                "-e", "TRITON_CACHE_DIR=/tmp/nc/triton")

# What "fast" means here (the speed issue's targets), by device and model as baked: the warm
# restore's seconds, and the largest checkpoint. A cold restore's target follows from this run's
# own disk: COLD_FACTOR x the bytes the cold run read from it (the checkpoint and weight dump
# where its counters cannot be read) / the disk's sequential read bandwidth. The
# bake (with --nocache): BAKE_FACTOR x this run's plain start.
WARM_TARGET_S = {("cpu", "synthetic:tiny"): 0.5, ("cuda", "synthetic:llama-3.2-3b"): 1.5,
                 ("cuda", "synthetic:llama-3.1-8b"): 2.0}
CHECKPOINT_TARGET_BYTES = {("cuda", "synthetic:llama-3.2-3b"): 1.5e9}
COLD_FACTOR = 1.2
BAKE_FACTOR = 1.2
# Published elsewhere, printed beside a GPU run for reference: not measured by this command.
PUBLISHED_GPU = (
    ("the seed's recipe: plain vllm serve", 81.0),
    ("the seed's recipe: compile caches mounted", 38.0),
    ("the seed's recipe: CRIU + fast weight reload", 6.0),
    ("upstream vllm snapshot restore, Qwen3-0.6B, RTX 4090 Laptop (vllm-project/vllm#51360)", 3.1),
)


@dataclass(frozen=True)
class BenchPlan:
    image: str
    run_flags: tuple[str, ...]  # `docker run` flags: capabilities, network, GPUs
    runs: int = 3
    cold: bool = False
    normal: bool = True
    nocache: bool = False
    env: tuple[str, ...] = ()  # KEY=VALUE runtime settings for the restores
    limit_s: float = 1800
    disk_dir: Optional[Path] = None  # where the image's layers are (Docker's root): its disk is measured
    # seconds between one container's removal and the next timed start: the GPU driver clears the
    # memory a process leaves before handing it out again, and a start right after another pays
    # part of that (bench/gpu_vmm_adopt.py); a node starting one container sees a settled GPU
    settle_s: float = 0.0


@dataclass
class BenchResult:
    image: str
    date: str
    host: str
    device: dict
    vllm: str
    vllm_args: list
    model: str
    restore_env: list
    settle_s: float = 0.0  # the plan's: the pause before each timed start
    warmup_s: Optional[float] = None  # the untimed restore that fills the page cache for the warm runs
    restore_s: list[float] = field(default_factory=list)
    cold_s: list[float] = field(default_factory=list)
    normal_s: list[float] = field(default_factory=list)
    nocache_s: list[float] = field(default_factory=list)
    last_restore_timeline: list[dict] = field(default_factory=list)
    last_cold_timeline: list[dict] = field(default_factory=list)
    # the slowest run's timeline of each path (what to look at when one run stands out)
    slowest_restore_timeline: list[dict] = field(default_factory=list)
    slowest_cold_timeline: list[dict] = field(default_factory=list)
    last_restore_weights: Optional[str] = None  # fvboot's "weights:" line: the path the load took, its speed
    last_cold_weights: Optional[str] = None
    answers: dict[str, list] = field(default_factory=dict)
    restore_equals_normal_start: Optional[bool] = None
    checkpoint_bytes: int = 0
    weights_bytes: int = 0
    disk_read_gbps: Optional[float] = None  # measured in the same run, with --cold
    cold_read_bytes: list[int] = field(default_factory=list)  # read from that disk by each cold run: disk_reads()
    bake_s: Optional[float] = None  # the image's bake, from its model on disk to the checkpoint: bake_seconds()
    targets: list[dict] = field(default_factory=list)  # filled by run(): see targets()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def targets_met(self) -> list[dict]:
        """Each target that applies to this image: {what, target, now, unit, met}."""
        key = (self.device.get("kind", ""), self.model)
        out = []
        if key in WARM_TARGET_S and self.restore_s:
            out.append({"what": "warm restore", "unit": "s", "target": WARM_TARGET_S[key],
                        "now": statistics.median(self.restore_s)})
        if self.cold_s and self.disk_read_gbps:
            # the bytes a cold run read from the disk (the image's libraries and Python too),
            # where the disk's counters could be read; else the checkpoint and the weight dump
            read = statistics.median(self.cold_read_bytes) if self.cold_read_bytes else None
            read_gb = (read or self.checkpoint_bytes + self.weights_bytes) / 1e9
            what = "read" if read else "(checkpoint, weights)"
            out.append({"what": f"cold restore: {COLD_FACTOR} x {read_gb:.2f} GB {what} / {self.disk_read_gbps:.2f} GB/s",
                        "unit": "s", "target": round(COLD_FACTOR * read_gb / self.disk_read_gbps, 2),
                        "now": statistics.median(self.cold_s)})
        if self.bake_s is not None and self.nocache_s:
            plain = statistics.median(self.nocache_s)
            out.append({"what": f"bake: {BAKE_FACTOR} x a plain start ({plain:.2f} s)", "unit": "s",
                        "target": round(BAKE_FACTOR * plain, 2), "now": self.bake_s})
        if key in CHECKPOINT_TARGET_BYTES:
            out.append({"what": "checkpoint", "unit": "GB", "target": CHECKPOINT_TARGET_BYTES[key] / 1e9,
                        "now": round(self.checkpoint_bytes / 1e9, 2)})
        for t in out:
            t["met"] = t["now"] <= t["target"]
        return out

    def table(self) -> str:
        lines = [f"{'docker run -> first correct answer':<44}{'median s':>10}  runs"]
        lines += [f"{label:<44}{statistics.median(getattr(self, key)):>10.2f}  {getattr(self, key)}"
                  for key, label in PATHS if getattr(self, key)]
        lines.append(f"checkpoint {self.checkpoint_bytes / 1e9:.2f} GB, weight dump {self.weights_bytes / 1e9:.2f} GB")
        if self.restore_equals_normal_start is not None:
            lines.append(f"restored answers == normal start's (text + logprobs, {len(EXTRA_PROMPTS)} prompts): "
                         f"{self.restore_equals_normal_start}")
        if self.targets:
            lines.append(f"{'targets':<56}{'target':>7}{'now':>9}     met")
            lines += [f"{t['what']:<56}{t['target']:>6.2f} {t['unit']:<2}{t['now']:>6.2f} {t['unit']:<2} "
                      f"{'yes' if t['met'] else 'no'}" for t in self.targets]
        if self.device.get("kind") == "cuda":
            lines.append("published elsewhere, not measured here (their own models and GPUs):")
            lines += [f"  {what:<88}{s:>6.1f} s" for what, s in PUBLISHED_GPU]
        return "\n".join(lines)


def _post(port: int, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _greedy(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    c = _post(port, {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                     "logprobs": 2, "seed": 0}, 900)["choices"][0]
    return {"text": c["text"], "logprobs": [round(x, 4) for x in c["logprobs"]["token_logprobs"]]}


def _logs(cid: str) -> str:
    r = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
    return r.stdout + r.stderr


EXITED_POLL_S = 1.0  # how often a start that does not answer yet is asked whether its container ended


def _exit_code(cid: str) -> Optional[int]:
    """The container's exit code once it has ended, None while it runs (or Docker cannot say)."""
    r = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", cid],
                       capture_output=True, text=True, timeout=60)
    running, _, code = r.stdout.strip().partition(" ")
    return int(code) if r.returncode == 0 and running == "false" and code.lstrip("-").isdigit() else None


def first_answer(plan: BenchPlan, m: dict, flags: list[str], extra: bool = False) -> tuple[float, str, list]:
    """Seconds from `docker run` to the first correct answer, the container's log, and (with
    EXTRA) its answers to EXTRA_PROMPTS. BenchError on a wrong answer or none within the limit."""
    port, model, probe = m["vllm"]["port"], m["model"]["served_name"], m["probe"][0]
    # as many tokens as the bake's answer has (the probe asks 4; an answer may end sooner)
    body = {"model": model, "prompt": probe["prompt"], "max_tokens": max(1, len(probe["logprobs"])),
            "temperature": 0.0}
    t0 = time.monotonic()
    run = subprocess.run(["docker", "run", "-d", *plan.run_flags, *flags, plan.image], capture_output=True, text=True)
    if run.returncode != 0:
        raise BenchError(f"docker run {plan.image} failed: {run.stderr.strip()[-500:]}")
    cid = run.stdout.strip()
    looked = t0
    try:
        while time.monotonic() - t0 < plan.limit_s:
            try:
                text = _post(port, body, plan.limit_s)["choices"][0]["text"]
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() - looked >= EXITED_POLL_S:  # a container that ended answers never
                    looked = time.monotonic()
                    ended = _exit_code(cid)
                    if ended is not None:
                        raise BenchError(f"the container ended (exit code {ended}) before it answered:\n"
                                         f"{_logs(cid)[-3000:]}") from None
                time.sleep(0.01)
                continue
            took = time.monotonic() - t0
            if text != probe["text"]:
                raise BenchError(f"wrong answer {text!r}, baked {probe['text']!r}")
            answers = [_greedy(port, model, p, 16) for p in EXTRA_PROMPTS] if extra else []
            return took, _logs(cid), answers
        raise BenchError(f"no answer within {plan.limit_s:.0f} s:\n{_logs(cid)[-3000:]}")
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def disk_read_gbps(folder: Path, size: int = 1 << 30) -> float:
    """The sequential read bandwidth (GB/s) of FOLDER's disk, page cache dropped: a SIZE-byte file
    written there, read back once in 8 MiB reads, removed. The cold target is relative to it."""
    block = bytes(range(256)) * (8 << 12)  # 8 MiB that no filesystem stores as a hole
    path = folder / f".fvbuild-bench-{time.time_ns()}"
    try:
        with open(path, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        drop_page_cache()
        t0 = time.monotonic()
        with open(path, "rb", buffering=0) as f:
            while f.read(len(block)):
                pass
        return round(size / (time.monotonic() - t0) / 1e9, 2)
    except OSError as e:
        raise BenchError(f"cannot measure the disk's read speed in {folder} ({e.strerror})") from None
    finally:
        path.unlink(missing_ok=True)


def disk_reads(folder: Optional[Path]) -> Optional[int]:
    """Bytes read so far from the block device FOLDER's filesystem is on (the kernel's counter
    in /sys/dev/block/MAJ:MIN/stat, 512-byte sectors); None where that filesystem has no such
    device (an overlay, a network or pooled filesystem): a cold run's bytes read are then
    unknown."""
    if folder is None:
        return None
    try:
        dev = os.stat(folder).st_dev
        fields = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()
        return int(fields[2]) * 512
    except (OSError, IndexError, ValueError):
        return None


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise BenchError(f"cannot drop the page cache for the cold runs ({e.strerror}); run as root or leave out --cold")


def bake_seconds(timeline: dict) -> Optional[float]:
    """Seconds the bake took from the model on disk ("model ready": a download or a synthetic
    model is not a start's work) to its last mark (the checkpoint written, zero pages left out):
    a plain start's work plus what baking adds. None for a manifest without those marks."""
    marks = {k: v for k, v in timeline.items() if isinstance(v, (int, float))}
    if "model ready" not in marks or len(marks) < 2:
        return None
    return round(max(marks.values()) - marks["model ready"], 2)


def timeline_marks(logs: str) -> list[dict]:
    """fvboot's timeline marks ({kind, event, t}) in a container's log, in order."""
    return [json.loads(line)["fvboot_timeline"] for line in logs.splitlines() if line.startswith('{"fvboot_timeline"')]


def weights_line(logs: str) -> Optional[str]:
    """fvboot's last "weights:" line in a container's log (which load path, how fast, its notes)."""
    lines = [line for line in logs.splitlines() if line.startswith("fvboot: weights:")]
    return lines[-1] if lines else None


def run(plan: BenchPlan, m: dict, say=print) -> BenchResult:
    """Every path of PLAN against the image whose manifest is M."""
    env = [x for kv in plan.env for x in ("-e", kv)]
    res = BenchResult(plan.image, time.strftime("%Y-%m-%d %H:%M"), platform.node(), m["device"],
                      m["vllm"]["version"], m["vllm"]["args"], m["model"]["source"], list(plan.env),
                      settle_s=plan.settle_s)
    for i in range(-1, plan.runs):  # -1: one restore first, untimed, so that "warm" means the
        # image's files are in the page cache whatever ran before (another bench's cold runs)
        if i >= 0:
            time.sleep(plan.settle_s)
        took, logs, got = first_answer(plan, m, env, extra=i == 0)
        if "restored from checkpoint" not in logs:
            raise BenchError("the image did not restore: " + next(
                (line for line in logs.splitlines() if "checkpoint not used" in line), logs[-1000:]))
        if i < 0:
            res.warmup_s = round(took, 2)
            say(f"restore to fill the page cache (not counted): {took:.2f} s")
            continue
        res.restore_s.append(round(took, 2))
        res.answers.setdefault("restore", got)
        res.last_restore_timeline = timeline_marks(logs)
        if res.restore_s[-1] >= max(res.restore_s):
            res.slowest_restore_timeline = res.last_restore_timeline
        res.last_restore_weights = weights_line(logs)
        say(f"restore {i + 1}/{plan.runs}: {took:.2f} s")
    for i in range(plan.runs if plan.cold else 0):
        drop_page_cache()
        time.sleep(plan.settle_s)
        before = disk_reads(plan.disk_dir)
        took, logs, _ = first_answer(plan, m, env)
        after = disk_reads(plan.disk_dir)  # the container's removal's few reads counted too
        if before is not None and after is not None:
            res.cold_read_bytes.append(after - before)
        res.cold_s.append(round(took, 2))
        res.last_cold_timeline = timeline_marks(logs)
        if res.cold_s[-1] >= max(res.cold_s):
            res.slowest_cold_timeline = res.last_cold_timeline
        res.last_cold_weights = weights_line(logs)
        read = f", {res.cold_read_bytes[-1] / 1e9:.2f} GB read" if len(res.cold_read_bytes) == len(res.cold_s) else ""
        say(f"restore, page cache dropped {i + 1}/{plan.runs}: {took:.2f} s{read}")
    for i in range(min(plan.runs, 2) if plan.normal else 0):
        took, _, got = first_answer(plan, m, ["-e", "FV_RESTORE=0"], extra=i == 0)
        res.normal_s.append(round(took, 2))
        res.answers.setdefault("normal", got)
        say(f"normal start {i + 1}: {took:.2f} s")
    if plan.nocache:
        took, _, _ = first_answer(plan, m, ["-e", "FV_RESTORE=0", *EMPTY_CACHES])
        res.nocache_s.append(round(took, 2))
        say(f"normal start, empty compile caches: {took:.2f} s")
    if "normal" in res.answers:
        res.restore_equals_normal_start = res.answers["restore"] == res.answers["normal"]
    res.bake_s = bake_seconds(m.get("timeline") or {})
    res.checkpoint_bytes = sum(f["size"] for f in m["files"] if f["path"].startswith("checkpoint/"))
    res.weights_bytes = sum(f["size"] for f in m["files"] if f["path"].startswith("weights/"))
    if plan.cold and plan.disk_dir is not None:
        res.disk_read_gbps = disk_read_gbps(plan.disk_dir)
        say(f"disk read, page cache dropped: {res.disk_read_gbps:.2f} GB/s ({plan.disk_dir})")
    res.targets = res.targets_met()
    return res


def plot(res: BenchResult, out: Path):
    """Two panels, written to OUT (PNG): the median seconds of each path side by side, and where
    the last warm restore's time went, phase by phase. Returns the figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'fast-vllm[plot]'") from None
    fig, (paths, phases) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    rows = [(label, statistics.median(getattr(res, key))) for key, label in PATHS if getattr(res, key)]
    paths.barh([r[0] for r in rows], [r[1] for r in rows], color=["#2a9d8f", "#8ab17d", "#e9c46a", "#e76f51"][:len(rows)])
    for y, (_, v) in enumerate(rows):
        paths.text(v, y, f" {v:.2f} s", va="center")
    paths.set_xlim(0, max(v for _, v in rows) * 1.18)  # room for the labels
    paths.invert_yaxis()
    paths.set_xlabel("seconds, docker run -> first correct answer (median)")
    paths.set_title(f"{res.model} on {res.device.get('kind', '?')}", loc="left")
    left, events = 0.0, [(e["event"], e["t"]) for e in res.last_restore_timeline]
    for (name, t), color in zip(events, plt.cm.tab20.colors * 3):
        phases.barh([0], [max(t - left, 0.0)], left=left, color=color, label=f"{name} ({t - left:.2f} s)")
        left = t
    phases.set_yticks([])
    phases.set_xlabel("seconds since the container's process started")
    phases.set_title("inside the last warm restore", loc="left")
    phases.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig
