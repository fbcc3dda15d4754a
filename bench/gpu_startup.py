#!/usr/bin/env python3
"""GPU start-up benchmark, host mode (the GPU machine has no Docker): fvboot bake and fvboot
serve run directly, on synthetic:llama-3.2-3b (Llama-3.2-3B-Instruct's exact shapes).

Phases (each fits one device call; state lives in $FV_BENCH_HOME, default /root/fv):
  bake     make the model, `fvboot bake` (its first vLLM start is the naive start: no caches),
           then restores: warm as shipped (x3), warm without the cuda-checkpoint service and THP
           page reads (the previous way), warm without THP only, and with the page cache dropped
           (read-ahead prefetch as shipped, and vmtouch)
  restore  the same restores again (warm as shipped x3)
  cached   a normal vLLM start that reuses the compile caches the bake left (FV_RESTORE=0)

Every start is timed from launching `fvboot serve` to the first correct token (the greedy answer
recorded at bake); the restore timeline (criu restore, weights, wake, checks) comes from fvboot's
own JSON lines. Results: $OUT/gpu_startup_<phase>.json and $FV_BENCH_HOME/results/.

    source .devkit/remote.sh && python3 bench/gpu_startup.py bake
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import REPO, drop_page_cache, first_correct_token, link_fvboot, log, record, start, stop

HOME = Path(os.environ.get("FV_BENCH_HOME", "/root/fv"))
RUN = Path("/tmp/fvbench")
PORT = 8000
MODEL = os.environ.get("FV_BENCH_MODEL", "synthetic:llama-3.2-3b")
VLLM_ARGS = os.environ.get("FV_BENCH_VLLM_ARGS", "--max-model-len 4096 --gpu-memory-utilization 0.85").split()


def setup_env() -> dict:
    """fvboot importable, a `criu` executable (with its libraries) and `cuda-checkpoint` on PATH."""
    lib = link_fvboot(RUN / "pylib")
    bindir = RUN / "bin"
    bindir.mkdir(exist_ok=True)
    criu_dir = os.environ.get("FV_CRIU_DIR", "")
    (bindir / "criu").write_text(f'#!/bin/sh\nLD_LIBRARY_PATH={criu_dir}/lib exec {criu_dir}/criu "$@"\n')
    # as in the images: the C client of fvboot's cuda-checkpoint service (bench/devkit-criu.sh
    # builds it), falling back to the Python tool when no service listens
    (bindir / "fv-cuda-checkpoint").write_text(
        f'#!/bin/sh\nPYTHONPATH={lib} exec {sys.executable} -S -m fvboot.cuda_checkpoint "$@"\n')
    client = Path(criu_dir, "cuda-checkpoint-client")
    ccp = bindir / "cuda-checkpoint"
    ccp.unlink(missing_ok=True)
    if client.exists():
        ccp.symlink_to(client)
    else:
        ccp.write_text(f'#!/bin/sh\nexec {bindir}/fv-cuda-checkpoint "$@"\n')
    vmtouch = Path(criu_dir, "vmtouch")  # the kit carries one where the machine has none
    if vmtouch.exists() and not (bindir / "vmtouch").exists() and not shutil.which("vmtouch"):
        (bindir / "vmtouch").symlink_to(vmtouch)
    for f in ("criu", "fv-cuda-checkpoint", "cuda-checkpoint"):
        if not (bindir / f).is_symlink():
            (bindir / f).chmod(0o755)
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{lib}:{env.get('PYTHONPATH', '')}"
    env["PATH"] = f"{bindir}:{env['PATH']}"
    env["FV_CRIU_PLUGIN_DIR"] = criu_dir
    env["FV_CUDA_CHECKPOINT_FALLBACK"] = str(bindir / "fv-cuda-checkpoint")
    env["FV_HOME"] = str(HOME)
    env["FV_RUN_DIR"] = str(RUN / "run")
    for k, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                   ("TRITON_CACHE_DIR", "triton"), ("CUDA_CACHE_PATH", "nv"),
                   ("FLASHINFER_WORKSPACE_BASE", "flashinfer")):
        env[k] = str(HOME / "cache" / sub)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def drop_caches() -> None:
    """The whole page cache, or fail: a cold start that is not cold would be a wrong figure."""
    drop_page_cache(strict=True)


def expected_answer() -> tuple[str, str, str, int]:
    m = json.loads((HOME / "manifest.json").read_text())
    p = m["probe"][0]
    return m["model"]["served_name"], p["prompt"], p["text"], max(1, len(p["logprobs"]))


def serve_once(env: dict, label: str, extra_env: dict | None = None, limit: float = 400) -> dict:
    """Launch `fvboot serve`, time the first correct token, stop it; returns the measurement."""
    name, prompt, want, tokens = expected_answer()
    out = RUN / f"serve-{label}.log"
    t0 = time.monotonic()
    proc = start([sys.executable, "-m", "fvboot", "serve"], log=out, env={**env, **(extra_env or {})})
    try:
        took = first_correct_token(PORT, name, prompt, want, t0=t0, limit=limit, proc=proc, name="fvboot serve",
                                   max_tokens=tokens)
        log(f"{label}: first correct token after {took:.2f} s")
    finally:
        stop(proc, grace=60)
        _wait_gpu_free()
    criu_log = RUN / "run" / "criu-restore.log"
    if criu_log.exists():
        (RUN / "logs").mkdir(exist_ok=True)
        criu_log.replace(RUN / "logs" / f"criu-restore-{label}.log")
    text = out.read_text(errors="replace")
    timeline = [json.JSONDecoder().raw_decode(l)[0]["fvboot_timeline"] for l in text.splitlines()
                if l.startswith('{"fvboot_timeline"')]
    weights = [l for l in text.splitlines() if l.startswith("fvboot: weights:")]
    fell_back = [l for l in text.splitlines() if "checkpoint not used" in l]
    if fell_back:  # said now: a phase cut off by its timeout writes no JSON
        log(f"{label}: fell back: {fell_back[0].strip()[:400]}")
    return {"label": label, "env": extra_env or {}, "first_token_s": round(took, 3), "timeline": timeline,
            "cuda_plugin": _plugin_calls(RUN / "logs" / f"criu-restore-{label}.log"),
            "weights": weights[-1] if weights else None, "fallback": fell_back[0] if fell_back else None}


def _plugin_calls(log: Path) -> dict:
    """From CRIU's log: when the cuda plugin's late hook ran per process (its "resuming devices"
    line, logged at -v3, fvboot's restore level; the hook's own line is CRIU's debug), and
    CRIU's THP note."""
    out: dict = {"hooks": []}
    if not log.exists():
        return out
    prev = None
    for line in log.read_text(errors="replace").splitlines():
        if "thp:" in line:
            out["thp"] = line.split("thp:", 1)[1].strip()
        if line.startswith("(") and ("cuda_plugin: resuming devices" in line or "Restore finished" in line):
            t = float(line[1:line.index(")")])
            if prev is not None:
                out["hooks"].append(round(t - prev, 3))
            prev = t
            if "Restore finished" in line:
                out["restore_finished_s"] = t
    return out


def _wait_gpu_free(timeout: float = 60) -> None:
    """Let the previous tree's processes go before the next start (PIDs, ports, GPU memory)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if not r.stdout.strip():
            return
        time.sleep(0.5)


def phase_bake(env: dict) -> dict:
    res: dict = {}
    model_dir = HOME / "model"
    if not (model_dir / "config.json").exists():
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "fvboot", "make-model", MODEL, str(model_dir)], env=env, check=True)
        res["make_model_s"] = round(time.monotonic() - t, 1)
        log(f"model made in {res['make_model_s']} s")
    drop_caches()
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fvboot", "bake", "--model", MODEL, "--port", str(PORT), "--",
                        *VLLM_ARGS], env=env, stdout=(RUN / "bake.log").open("w"), stderr=subprocess.STDOUT)
    res["bake_s"] = round(time.monotonic() - t, 1)
    if r.returncode != 0:
        print((RUN / "bake.log").read_text()[-8000:])
        raise SystemExit(f"bake failed ({r.returncode})")
    m = json.loads((HOME / "manifest.json").read_text())
    res["bake_timeline"] = m["timeline"]
    res["naive_start_to_healthy_s"] = m["timeline"]["server healthy"] - m["timeline"]["model ready"]
    res["weights"] = m["weights"]
    res["device"] = m["device"]
    res["checkpoint_bytes"] = sum(f["size"] for f in m["files"] if f["path"].startswith("checkpoint/"))
    res["processes"] = m.get("processes")
    res["trim"] = m.get("trim")
    log(f"baked in {res['bake_s']} s; checkpoint {res['checkpoint_bytes'] / 1e9:.2f} GB")
    time.sleep(2)
    res.update(_restores(env, warm=3))
    return res


LEGACY = {"FV_CUDA_CHECKPOINT_SERVICE": "0", "FV_RESTORE_THP": "0"}  # how the previous stop restored
# FV_BENCH_VARIANTS (comma-separated, default "legacy,no-thp,vmtouch"): the restores measured
# beside the shipped ones; "read-pages" adds warm and cold restores with memory read back whole
# instead of mapped from the checkpoint (criu-patches/0003, the default since 2026-12-03);
# "map-pages" forces the mapping (a build from before); NAME=VALUE: warm restores with that setting;
# FV_BENCH_VARIANT_RUNS (default 1) warm ones each
VARIANTS = {"legacy": LEGACY, "no-thp": {"FV_RESTORE_THP": "0"}, "map-pages": {"FV_RESTORE_MAP_PAGES": "1"},
            "read-pages": {"FV_RESTORE_MAP_PAGES": "0"}}


def variant_env(v: str) -> dict | None:
    """The settings of variant V: a named one, or NAME=VALUE; None for what is not a warm variant."""
    if v in VARIANTS:
        return VARIANTS[v]
    name, eq, value = v.partition("=")
    return {name: value} if eq and name else None


def _restores(env: dict, warm: int) -> dict:
    """Warm restores as shipped, then each variant's warm restores (what each lever brings); then
    with the page cache dropped: as shipped (fvboot's read-ahead prefetch), with vmtouch, mapped,
    read back whole."""
    chosen = [v for v in os.environ.get("FV_BENCH_VARIANTS", "legacy,no-thp,vmtouch").split(",") if v]
    runs = int(os.environ.get("FV_BENCH_VARIANT_RUNS", "1"))
    res = {}
    for i in range(warm):
        res[f"restore_warm_{i + 1}"] = serve_once(env, f"restore-warm-{i + 1}")
    for v in chosen:
        extra = variant_env(v)
        for i in range(runs if extra is not None else 0):
            slug = re.sub(r"[^a-z0-9]+", "_", v.lower()).strip("_")
            key = slug + (f"_{i + 1}" if runs > 1 else "")
            res[f"restore_warm_{key}"] = serve_once(env, f"restore-warm-{slug}-{i + 1}", extra)
    drop_caches()
    res["restore_cold"] = serve_once(env, "restore-cold")
    if "vmtouch" in chosen:
        drop_caches()
        res["restore_cold_vmtouch"] = serve_once(env, "restore-cold-vmtouch", {"FV_PREFETCH": "vmtouch"})
    for v in ("map-pages", "read-pages"):
        if v in chosen:
            drop_caches()
            res[f"restore_cold_{v.replace('-', '_')}"] = serve_once(env, f"restore-cold-{v}", VARIANTS[v])
    return res


def phase_restore(env: dict) -> dict:
    return _restores(env, warm=3)


def phase_cached(env: dict) -> dict:
    drop_caches()
    return {"cached_start": serve_once(env, "cached-start", {"FV_RESTORE": "0"}, limit=500)}


def _python_startup(env: dict) -> dict:
    """What the interpreter costs fvboot before its first line runs (best of 3 each)."""
    def best(*argv: str) -> float:
        times = []
        for _ in range(3):
            t = time.monotonic()
            subprocess.run([sys.executable, *argv], env=env, capture_output=True)
            times.append(time.monotonic() - t)
        return round(min(times), 3)

    return {"bare": best("-c", "pass"), "no_site": best("-S", "-c", "pass"),
            "import_fvboot_serve": best("-c", "import fvboot.cli, fvboot.serve"),
            "import_fvboot_serve_no_site": best("-S", "-c", "import fvboot.cli, fvboot.serve")}


def main() -> None:
    phase = sys.argv[1] if len(sys.argv) > 1 else "bake"
    RUN.mkdir(parents=True, exist_ok=True)
    (RUN / "run").mkdir(exist_ok=True)
    HOME.mkdir(parents=True, exist_ok=True)
    env = setup_env()
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    log(f"phase {phase} on {gpu}")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    # the device's copy of the tree may carry a stale .git: the caller's word comes first
    commit = os.environ.get("FV_BENCH_COMMIT") or subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() \
        or "unknown"
    res = {"phase": phase, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": gpu,
           "model": MODEL, "vllm_args": VLLM_ARGS, "commit": commit, "thp_enabled": thp,
           "kernel": os.uname().release}
    res["python_startup"] = _python_startup(env)
    try:
        res.update({"bake": phase_bake, "restore": phase_restore, "cached": phase_cached}[phase](env))
    finally:
        out = record(f"gpu_startup_{phase}", res, copies=(HOME / "results",))
        if out:
            # every log of this phase in one archive (the device returns a few files only)
            logs = [f for f in RUN.glob("*.log")] + list((RUN / "logs").glob("*.log"))
            dump_log = HOME / "checkpoint" / "criu-dump.log"
            if dump_log.exists():
                logs.append(dump_log)
            subprocess.run(["tar", "-czf", str(out.parent / f"logs_{phase}.tar.gz"),
                            *[str(f) for f in logs]], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
