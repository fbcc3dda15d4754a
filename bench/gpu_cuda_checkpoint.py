#!/usr/bin/env python3
"""GPU check of fv-cuda-checkpoint: a real CUDA process checkpointed and restored with it.

Why: the unit tests pin the ABI and the command line, but only a driver can say that the
tool really moves a process's GPU memory out and back. This script:

  1. starts a child Python process that fills GPU tensors from a fixed seed and keeps them,
     and records the sha256 of their bytes (plus of a GPU-computed derivative);
  2. with the tool (through a `cuda-checkpoint` wrapper, as CRIU runs it): --get-state,
     --get-restore-tid, lock, checkpoint (the GPU's used memory must fall back to what it was
     before the child started), restore, unlock, then asks the child to hash again: equal;
     also --toggle twice, an identity --device-map restore (driver >= 580), and the error path
     on a process without CUDA;
  3. if FV_CRIU_DIR is set (a folder with `criu` and `cuda_plugin.so`): the same round trip
     through `criu dump` / `criu restore` with the wrapper on PATH, so CRIU's cuda_plugin
     drives the tool; skipped with the reason otherwise.

Prints a JSON summary (and writes it to $OUT/cuda_checkpoint.json when OUT is set); exits 0
when every check passed. Everything it starts is killed before it exits; it stays well under
three minutes (FV_BENCH_GIB, default 1, sets the GPU memory the child holds).
Needs: an NVIDIA GPU, driver >= 570, PyTorch with CUDA. No network.

Over 400 lines on purpose: one device call carries one file, and this one holds the child
process it checkpoints, the GPU memory readings (NVML, nvidia-smi) and both round trips (the
tool alone, then through CRIU), each of which needs the others' state.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from harness import BenchError, Budget, link_fvboot, record, start, stop

DEADLINE_S = 170.0
SEED = 20240607

# The mailbox both children of the GPU scripts answer in (gpu_cross_node.py's too): a child's
# source is its own part between MAILBOX_POST and MAILBOX_LOOP, which runs digest() on request.
MAILBOX_POST = r'''

def post(name, obj):
    tmp = os.path.join(box, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, os.path.join(box, name))
'''

MAILBOX_LOOP = r'''
request = os.path.join(box, "request.json")
while True:
    if not os.path.exists(request):
        time.sleep(0.02)
        continue
    with open(request) as f:
        req = json.load(f)
    os.unlink(request)
    try:
        answer = digest() if req["cmd"] == "digest" else {"bye": True}
    except BaseException:
        answer = {"error": traceback.format_exc()}
    post(f"answer-{req['id']}.json", answer)
    if req["cmd"] == "exit":
        break
'''

CHILD_SOURCE = r'''
"""Holds seeded GPU tensors; answers requests dropped into its mailbox folder.

A mailbox (files polled every 20 ms) rather than a pipe: CRIU can dump and restore a process
that only sleeps and opens files, but a pipe to the bench would be an external resource.
"""
import ctypes, hashlib, json, os, sys, time, traceback

box, gib, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
''' + MAILBOX_POST + r'''

try:
    import torch

    dev = torch.device("cuda", 0)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    count = 4
    per = int(gib * 2**30) // count // 4  # float32 elements per tensor
    tensors = [torch.randn(per, device=dev, generator=gen) for _ in range(count)]
    torch.cuda.synchronize()

    def digest():
        t0 = time.perf_counter()
        plain, derived = hashlib.sha256(), hashlib.sha256()
        for t in tensors:
            for h, src in ((plain, t), (derived, t * 2 + 1)):  # the second runs a kernel
                c = src.cpu().contiguous()
                # (string_at takes a C int: tensors of 2 GiB or more would overflow it)
                h.update(memoryview((ctypes.c_char * (c.numel() * c.element_size())).from_address(c.data_ptr())))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # give the temporaries back, keep the footprint steady
        return {"sha256": plain.hexdigest(), "derived_sha256": derived.hexdigest(),
                "seconds": round(time.perf_counter() - t0, 3)}

    ready = {"pid": os.getpid(), "bytes": sum(t.numel() * t.element_size() for t in tensors),
             "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
             "torch_cuda": torch.version.cuda}
    ready.update(digest())
    post("ready.json", ready)
except BaseException:
    post("ready.json", {"error": traceback.format_exc()})
    sys.exit(1)
''' + MAILBOX_LOOP


class Child:
    """The CUDA process under test, addressed by pid and its mailbox folder."""

    def __init__(self, box: Path, proc: subprocess.Popen | None, pid: int) -> None:
        self.box, self.proc, self.pid = box, proc, pid
        self.asked = 0

    @classmethod
    def start(cls, work: Path, name: str, gib: float, log: Path | None) -> Child:
        box = work / name
        box.mkdir()
        script = work / "child.py"
        script.write_text(CHILD_SOURCE)
        proc = start([sys.executable, str(script), str(box), str(gib), str(SEED)], log=log,
                     stdin=subprocess.DEVNULL)
        return cls(box, proc, proc.pid)

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def _wait_file(self, name: str, budget: Budget, wanted: float) -> dict:
        path = self.box / name
        end = time.monotonic() + budget.timeout(wanted)
        while time.monotonic() < end:
            if path.exists():
                answer = json.loads(path.read_text())
                path.unlink()
                if "error" in answer:
                    raise BenchError(f"child {self.pid}: {answer['error'].strip().splitlines()[-1]}")
                return answer
            if not self.alive():
                raise BenchError(f"child {self.pid} is gone while waiting for {name}")
            time.sleep(0.02)
        raise BenchError(f"child {self.pid} did not write {name} in {wanted:.0f}s")

    def wait_ready(self, budget: Budget) -> dict:
        return self._wait_file("ready.json", budget, 90)

    def ask(self, cmd: str, budget: Budget, wanted: float = 60) -> dict:
        self.asked += 1
        tmp = self.box / "request.tmp"
        tmp.write_text(json.dumps({"id": self.asked, "cmd": cmd}))
        os.replace(tmp, self.box / "request.json")
        return self._wait_file(f"answer-{self.asked}.json", budget, wanted)

    def is_ours(self) -> bool:
        """The pid still runs our child script (not a recycled pid of someone else)."""
        try:
            return str(self.box) in Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL and reap (as parent, or as subreaper for a CRIU-restored process)."""
        if self.proc is not None:
            stop(self.proc, sig=signal.SIGKILL, grace=10, reap=10)
            return
        if self.is_ours():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# GPU facts: nvidia-smi when present, NVML through ctypes otherwise


def _smi(*query: str) -> list[list[str]] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        proc = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in proc.stdout.splitlines() if line.strip()]


class Nvml:
    """The four NVML calls the bench needs, for hosts without nvidia-smi."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        if self.lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit_v2 failed")

    def handles(self) -> list[ctypes.c_void_p]:
        count = ctypes.c_uint()
        self.lib.nvmlDeviceGetCount_v2(ctypes.byref(count))
        out = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            self.lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle))
            out.append(handle)
        return out

    def used_mib(self) -> float:
        class Memory(ctypes.Structure):
            _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

        total = 0
        for handle in self.handles():
            mem = Memory()
            self.lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem))
            total += mem.used
        return total / 2**20

    def uuids(self) -> list[str]:
        out = []
        for handle in self.handles():
            buf = ctypes.create_string_buffer(96)
            self.lib.nvmlDeviceGetUUID(handle, buf, 96)
            out.append(buf.value.decode())
        return out


_nvml: Nvml | None = None


def nvml() -> Nvml | None:
    global _nvml
    if _nvml is None:
        try:
            _nvml = Nvml()
        except (OSError, AttributeError):
            return None
    return _nvml


def gpu_used_mib() -> float | None:
    """Memory used on all GPUs together (device level: works inside PID namespaces too)."""
    rows = _smi("--query-gpu=memory.used")
    if rows is not None:
        return float(sum(float(r[0]) for r in rows))
    lib = nvml()
    return round(lib.used_mib(), 1) if lib else None


def gpu_uuids() -> list[str]:
    rows = _smi("--query-gpu=uuid")
    if rows is not None:
        return [r[0] for r in rows]
    lib = nvml()
    return lib.uuids() if lib else []


def process_used_mib(pid: int) -> float | None:
    """The child's own entry in nvidia-smi (None: not listed, e.g. another PID namespace)."""
    rows = _smi("--query-compute-apps=pid,used_memory") or []
    for row in rows:
        if row[0] == str(pid):
            return float(row[1])
    return None


def device_facts() -> dict:
    facts: dict = {}
    rows = _smi("--query-gpu=name,driver_version,uuid,memory.total")
    if rows:
        facts["gpus"] = [{"name": r[0], "driver": r[1], "uuid": r[2], "memory_mib": r[3]} for r in rows]
    try:
        sys.path.insert(0, str(fvboot_path_dir()))
        from fvboot.cuda_checkpoint import CudaDriver, format_version

        version = CudaDriver.load().version()
        facts["cuda_driver_api"] = format_version(version)
        facts["cuda_driver_api_int"] = version
    except Exception as exc:  # reported, the tool steps will say more
        facts["cuda_driver_api_error"] = str(exc)
    return facts


# ---------------------------------------------------------------------------------------------
# The tool, run exactly as CRIU runs it: `cuda-checkpoint` from PATH, a wrapper script

_WORK: Path | None = None


def fvboot_path_dir() -> Path:
    """A folder where `fvboot` is the repository's entrypoint/ package."""
    assert _WORK is not None
    return link_fvboot(_WORK / "pypath")


def make_wrapper(work: Path) -> Path:
    """work/bin/cuda-checkpoint: execs `python -m fvboot.cuda_checkpoint "$@"`."""
    bindir = work / "bin"
    bindir.mkdir()
    wrapper = bindir / "cuda-checkpoint"
    wrapper.write_text(
        "#!/bin/sh\n"
        "# cuda-checkpoint for CRIU's cuda_plugin: fast-vllm's implementation on the driver API\n"
        '[ -n "$FV_CC_CALL_LOG" ] && printf \'%s\\n\' "$*" >> "$FV_CC_CALL_LOG"\n'
        f"PYTHONPATH={shlex.quote(str(fvboot_path_dir()))}${{PYTHONPATH:+:$PYTHONPATH}} "
        f'exec {shlex.quote(sys.executable)} -m fvboot.cuda_checkpoint "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


class Run:
    """Steps, checks and timings of one phase."""

    def __init__(self, wrapper: Path, budget: Budget) -> None:
        self.wrapper, self.budget = wrapper, budget
        self.steps: list[dict] = []
        self.checks: dict[str, bool] = {}

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        return bool(ok)

    def tool(self, name: str, *args: str, expect_rc: int | None = 0, expect_out: str | None = None,
             timeout: float = 60) -> dict:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([str(self.wrapper), *args], capture_output=True, text=True,
                                  timeout=self.budget.timeout(timeout))
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired:
            rc, out, err = None, "", "timed out"
        step = {"name": name, "args": " ".join(args), "rc": rc, "stdout": out.strip(), "stderr": err.strip(),
                "seconds": round(time.perf_counter() - t0, 3)}
        ok = (expect_rc is None or rc == expect_rc) and (expect_out is None or out.strip() == expect_out)
        step["ok"] = self.check(name, ok)
        self.steps.append(step)
        return step

    def timed(self, name: str, fn):
        t0 = time.perf_counter()
        value = fn()
        self.steps.append({"name": name, "seconds": round(time.perf_counter() - t0, 3)})
        return value

    def summary(self, **extra) -> dict:
        return {"ok": all(self.checks.values()) and bool(self.checks), "checks": self.checks,
                "steps": self.steps, **extra}


def memory_released(baseline: float | None, running: float | None, after: float | None, tensor_mib: float) -> bool:
    """After checkpoint the GPU is back to its pre-child level (the child holds ~0)."""
    if None in (baseline, running, after):
        return False
    slack = max(256.0, 0.1 * (running - baseline))
    return running - after >= 0.9 * tensor_mib and after <= baseline + slack


# ---------------------------------------------------------------------------------------------
# Phase 1: the tool alone


def phase_tool(work: Path, wrapper: Path, budget: Budget, gib: float, facts: dict) -> dict:
    run = Run(wrapper, budget)
    memory: dict = {"baseline": gpu_used_mib()}
    child = Child.start(work, "box-tool", gib, work / "child-tool.log")
    bystander = subprocess.Popen(["sleep", "120"], start_new_session=True)
    result: dict = {}
    try:
        ready = run.timed("child_start", lambda: child.wait_ready(budget))
        pid = str(child.pid)
        tensor_mib = ready["bytes"] / 2**20
        memory["running"] = gpu_used_mib()
        memory["child_listed_running"] = process_used_mib(child.pid)
        result.update(child={k: ready[k] for k in ("pid", "bytes", "device", "torch", "torch_cuda")},
                      sha256_start=ready["sha256"])

        run.tool("get_state_running", "--get-state", "--pid", pid, expect_out="running")
        tid = run.tool("get_restore_tid", "--get-restore-tid", "--pid", pid)
        run.check("restore_tid_is_a_thread_of_child",
                  tid["stdout"].isdigit() and Path(f"/proc/{pid}/task/{tid['stdout']}").exists())
        run.tool("lock", "--action", "lock", "--pid", pid, "--timeout", "10000")
        run.tool("get_state_locked", "--get-state", "--pid", pid, expect_out="locked")
        run.tool("checkpoint", "--action", "checkpoint", "--pid", pid)
        memory["checkpointed"] = gpu_used_mib()
        memory["child_listed_checkpointed"] = process_used_mib(child.pid)
        run.check("gpu_memory_released_after_checkpoint",
                  memory_released(memory["baseline"], memory["running"], memory["checkpointed"], tensor_mib))
        run.tool("get_state_checkpointed", "--get-state", "--pid", pid, expect_out="checkpointed")
        run.tool("restore", "--action", "restore", "--pid", pid)
        run.tool("get_state_restored", "--get-state", "--pid", pid, expect_out="locked")
        run.tool("unlock", "--action", "unlock", "--pid", pid)
        run.tool("get_state_unlocked", "--get-state", "--pid", pid, expect_out="running")
        memory["restored"] = gpu_used_mib()
        after = run.timed("child_digest", lambda: child.ask("digest", budget))
        run.check("sha256_identical_after_restore", after["sha256"] == ready["sha256"])
        run.check("gpu_compute_identical_after_restore", after["derived_sha256"] == ready["derived_sha256"])

        run.tool("toggle_to_checkpointed", "--toggle", "--pid", pid)
        run.tool("get_state_toggled", "--get-state", "--pid", pid, expect_out="checkpointed")
        run.tool("toggle_to_running", "--toggle", "--pid", pid)
        after = run.timed("child_digest_after_toggle", lambda: child.ask("digest", budget))
        run.check("sha256_identical_after_toggle", after["sha256"] == ready["sha256"])

        uuids = gpu_uuids()
        if facts.get("cuda_driver_api_int", 0) >= 13000 and uuids:
            identity = ",".join(f"{u}={u}" for u in uuids)
            result["device_map"] = identity
            run.tool("dm_lock", "--action", "lock", "--pid", pid, "--timeout", "10000")
            run.tool("dm_checkpoint", "--action", "checkpoint", "--pid", pid)
            run.tool("dm_restore_identity_map", "--action", "restore", "--pid", pid, "--device-map", identity)
            run.tool("dm_unlock", "--action", "unlock", "--pid", pid)
            after = run.timed("child_digest_after_device_map", lambda: child.ask("digest", budget))
            run.check("sha256_identical_after_device_map_restore", after["sha256"] == ready["sha256"])
        else:
            result["device_map_skipped"] = "needs driver >= 580 (CUDA 13.0 driver API) and GPU UUIDs"

        other = str(bystander.pid)  # a live process that never used CUDA
        for name, args in (("no_cuda_get_state", ["--get-state"]), ("no_cuda_get_restore_tid", ["--get-restore-tid"])):
            step = run.tool(name, *args, "--pid", other, expect_rc=None, timeout=20)
            run.check(f"{name}_fails_cleanly", step["rc"] not in (0, None) and step["stdout"] == ""
                      and "Traceback" not in step["stderr"] and step["stderr"].count("\n") == 0)
        run.tool("bad_action_exit_2", "--action", "pause", "--pid", pid, expect_rc=2)

        run.timed("child_exit", lambda: child.ask("exit", budget, 20))
    except BenchError as exc:
        run.check("phase_completed", False)
        result["error"] = str(exc)
        log = work / "child-tool.log"
        if log.exists():
            result["child_log_tail"] = log.read_text(errors="replace")[-3000:]
    finally:
        child.kill()
        stop(bystander, sig=signal.SIGKILL)
    return run.summary(memory_mib=memory, **result)


# ---------------------------------------------------------------------------------------------
# Phase 2: CRIU with its cuda_plugin driving the tool


def _criu_binary(criu_dir: Path) -> str | None:
    own = criu_dir / "criu"
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    return shutil.which("criu")


def _become_subreaper() -> None:
    """Restored processes are re-parented to us, so we can reap them (PR_SET_CHILD_SUBREAPER)."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def phase_criu(work: Path, wrapper: Path, budget: Budget, gib: float, out_dir: Path | None) -> dict:
    criu_dir_env = os.environ.get("FV_CRIU_DIR")
    if not criu_dir_env:
        return {"skipped": "FV_CRIU_DIR is not set (a folder with criu and cuda_plugin.so)"}
    criu_dir = Path(criu_dir_env)
    criu = _criu_binary(criu_dir)
    if criu is None:
        return {"skipped": f"no criu binary in {criu_dir} or on PATH"}
    if not (criu_dir / "cuda_plugin.so").is_file():
        return {"skipped": f"no cuda_plugin.so in {criu_dir}"}
    if os.geteuid() != 0:
        return {"skipped": "criu dump/restore needs root"}

    _become_subreaper()
    run = Run(wrapper, budget)
    images = work / "images"
    images.mkdir()
    calls = work / "cuda-checkpoint-calls.log"
    env = dict(os.environ, PATH=f"{wrapper.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               FV_CC_CALL_LOG=str(calls))
    memory: dict = {"baseline": gpu_used_mib()}
    result: dict = {"criu": criu}
    child = Child.start(work, "box-criu", gib, None)  # std fds on /dev/null: nothing external
    try:
        ready = run.timed("child_start", lambda: child.wait_ready(budget))
        pid = str(child.pid)
        tensor_mib = ready["bytes"] / 2**20
        memory["running"] = gpu_used_mib()

        def criu_cmd(name: str, *args: str) -> bool:
            t0 = time.perf_counter()
            console = work / f"criu-{name}.out"  # a file, not a pipe: restored tasks never hold it
            try:
                with open(console, "wb") as sink:
                    rc = subprocess.run([criu, *args, "-L", str(criu_dir), "-v4", "-o", f"{name}.log"],
                                        env={**env, "LD_LIBRARY_PATH": str(criu_dir / "lib")}, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                                        timeout=budget.timeout(75)).returncode
            except subprocess.TimeoutExpired:
                rc = None
            run.steps.append({"name": f"criu_{name}", "rc": rc, "output": _tail(console, 20),
                              "seconds": round(time.perf_counter() - t0, 3)})
            if rc != 0:
                result[f"{name}_log_tail"] = _tail(images / f"{name}.log")
            return run.check(f"criu_{name}_ok", rc == 0)

        if criu_cmd("dump", "dump", "-t", pid, "-D", str(images), "--shell-job"):
            child.proc.wait(timeout=budget.timeout(15))  # reap, so the pid is free for restore
            memory["after_dump"] = gpu_used_mib()
            result["image_mib"] = round(sum(f.stat().st_size for f in images.iterdir()) / 2**20, 1)
            child.proc = None  # from here on the pid belongs to the restored process
            if criu_cmd("restore", "restore", "-D", str(images), "--shell-job", "-d"):
                run.check("restored_process_alive", child.alive())
                memory["restored"] = gpu_used_mib()
                run.tool("get_state_after_restore", "--get-state", "--pid", pid, expect_out="running")
                after = run.timed("child_digest_after_restore", lambda: child.ask("digest", budget))
                run.check("sha256_identical_after_criu_restore", after["sha256"] == ready["sha256"])
                run.check("gpu_compute_identical_after_criu_restore",
                          after["derived_sha256"] == ready["derived_sha256"])
        result["cuda_checkpoint_calls"] = calls.read_text().splitlines() if calls.exists() else []
        run.check("cuda_plugin_used_the_tool",
                  any(c.startswith("--action checkpoint") for c in result["cuda_checkpoint_calls"]))
        result["tensor_mib"] = round(tensor_mib, 1)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        run.check("phase_completed", False)
        result["error"] = str(exc)
    finally:
        child.kill()
        if out_dir is not None:
            for name in ("dump.log", "restore.log"):
                if (images / name).exists():
                    shutil.copy(images / name, out_dir / f"criu-{name}")
    return run.summary(memory_mib=memory, **result)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    global _WORK
    t0 = time.perf_counter()
    budget = Budget(DEADLINE_S)
    gib = float(os.environ.get("FV_BENCH_GIB", "1"))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fv-cc-bench-"))
    _WORK = work
    summary: dict = {"bench": "cuda_checkpoint", "gib": gib, "seed": SEED, "python": sys.version.split()[0]}
    try:
        wrapper = make_wrapper(work)
        summary["device"] = device_facts()
        summary["tool"] = phase_tool(work, wrapper, budget, gib, summary["device"])
        summary["criu"] = phase_criu(work, wrapper, budget, gib, out_dir)
    except Exception:  # the summary must still be written
        summary["error"] = traceback.format_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    criu_ok = summary.get("criu", {}).get("ok", "skipped" in summary.get("criu", {}))
    summary["ok"] = "error" not in summary and summary.get("tool", {}).get("ok", False) and criu_ok
    summary["seconds_total"] = round(time.perf_counter() - t0, 2)
    record("cuda_checkpoint", summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
