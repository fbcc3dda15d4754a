#!/usr/bin/env python3
"""Issue 11 (checkpoint <= 1.5 GB): where a CUDA engine's host memory comes from, phase by phase.

The 3B engine's checkpoint is 1.54 GB of its 2.28 (H200, 2026-12-04): a 0.94 GB malloc heap of
which Python's objects are ~0.36 GB, 324 MB of GPU code (cubins) in anonymous memory, 0.1 GB of
the CUDA checkpoint's copy of GPU memory; the API server adds 0.67 GB, 0.24 GB more than the CPU
build's (where it maps no GPU library). The checkpoint says what is there, not what put it
there. Here one process at a time goes through an engine's start in vLLM's own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, vLLM's `LLM`), measuring after each phase: anonymous
memory by kind (heap, other anonymous, private file pages), malloc's bytes in use, the cubins
found in anonymous memory, whether the CUDA driver is mapped, and GPU memory in use. Three
engines (eager; compiled without CUDA graphs; vLLM's defaults) tell the graphs' and the
compile's shares apart; an API-server-like process (vLLM's OpenAI server module imported, its
platform asked what it asks) says what starting CUDA's driver would cost such a process (the
checkpoint's anatomy says whether the real one maps libcuda).

    python3 bench/gpu_memory_phases.py [MODEL_DIR]   # default: makes synthetic:llama-3.2-3b in $FV_BENCH_HOME

FV_PHASES_ENGINES=default (comma-separated) runs only those engines after the API-like process.
Writes ($OUT or /tmp) gpu_memory_phases.json; each child's log beside it.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import link_fvboot, log, record  # noqa: E402
from checkpoint_anatomy import embedded_images  # noqa: E402

MODEL = os.environ.get("FV_BENCH_MODEL", "synthetic:llama-3.2-3b")
HOME = Path(os.environ.get("FV_BENCH_HOME", "/root/fv-phases"))
VLLM_ARGS = {"max_model_len": 4096, "gpu_memory_utilization": 0.85, "enable_sleep_mode": True}
ENGINES = {"eager": {"enforce_eager": True},
           "compiled": {"compilation_config": {"cudagraph_mode": "NONE"}},
           "default": {}}
CHILD_LIMIT_S = 420
HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
MAX_READ = 2 << 30  # larger areas (reserved address space) are not read for cubins


def _areas() -> list[dict]:
    """/proc/self/smaps as one dict per mapping: start, end, perms, path, anon and rss bytes."""
    out: list[dict] = []
    below = ""  # the last file mapped below: whose .bss or allocations an anonymous area may be
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = HEADER.match(line)
        if m:
            out.append({"start": int(m[1], 16), "end": int(m[2], 16), "perms": m[3], "path": m[4], "anon": 0,
                        "below": below})
            if m[4].startswith("/"):
                below = m[4]
        elif line.startswith("Anonymous:"):
            out[-1]["anon"] = int(line.split()[1]) * 1024
    return out


def _kind(area: dict) -> str:
    path = area["path"]
    if path == "[heap]":
        return "heap"
    if not path or path.startswith("[anon"):
        return "anon"
    return "file" if path.startswith("/") and not path.startswith("/dev/") else "other"


def measure(phase: str, t0: float, top: int = 0) -> dict:
    areas = _areas()
    by_kind: dict[str, int] = {}
    for a in areas:
        by_kind[_kind(a)] = by_kind.get(_kind(a), 0) + a["anon"]
    cubin = 0
    largest = []
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for a in areas:
            if _kind(a) not in ("heap", "anon") or not a["anon"] or "r" not in a["perms"] \
                    or a["end"] - a["start"] > MAX_READ:
                continue
            try:
                data = os.pread(mem.fileno(), a["end"] - a["start"], a["start"])
            except OSError:
                continue
            found = embedded_images(data)["cubin_bytes"]
            cubin += found
            largest.append({"mb": round(a["anon"] / 1e6, 1), "kind": _kind(a), "cubin_mb": round(found / 1e6, 1),
                            "first_bytes": data[:16].hex(),
                            "file_below": a["below"].rsplit("/", 1)[-1]})
    row = {"phase": phase, "t": round(time.monotonic() - t0, 1),
           "anon_mb": {k: round(v / 1e6, 1) for k, v in sorted(by_kind.items())},
           "anon_total_mb": round(sum(by_kind.values()) / 1e6, 1), "cubin_mb": round(cubin / 1e6, 1),
           "libcuda_mapped": any("/libcuda.so" in a["path"] for a in areas),
           "malloc_in_use_mb": _malloc_in_use_mb()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        row["gpu_used_mb"] = round((total - free) / 1e6, 1)
    if top:
        row["largest"] = sorted(largest, key=lambda r: -r["mb"])[:top]
    print("PHASE " + json.dumps(row), flush=True)
    return row


def _malloc_in_use_mb() -> float | None:
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        f = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        return None
    f.restype = Mallinfo2
    m = f()
    return round((m.uordblks + m.hblkhd) / 1e6, 1)


def child_engine(name: str, model_dir: str) -> None:
    import gc

    t0 = time.monotonic()
    measure("python", t0)
    import torch
    measure("import torch", t0)
    from vllm import LLM, SamplingParams
    measure("import vllm", t0)
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    measure("CUDA context", t0)
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    (a @ a).sum().item()
    del a
    measure("a bf16 matmul (cuBLAS)", t0)
    llm = LLM(model=model_dir, **VLLM_ARGS, **ENGINES[name])
    measure("engine built", t0)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    print("ANSWER " + json.dumps(out[0].outputs[0].text), flush=True)
    measure("answered", t0)
    llm.sleep(level=2)
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim:
        trim(0)
    measure("asleep (level 2), collected, trimmed", t0, top=12)
    sys._debugmallocstats()  # pymalloc's arenas and blocks in use (stderr, in the child's log)
    from fvboot.heap_census import census  # the worker's own census at the bake's trim

    print("CENSUS " + json.dumps(census()), flush=True)


def child_api(model_dir: str) -> None:
    t0 = time.monotonic()
    measure("python", t0)
    import torch
    measure("import torch", t0, top=8)
    import vllm.entrypoints.openai.api_server  # noqa: F401
    measure("import vLLM's OpenAI server", t0)
    from vllm.platforms import current_platform
    current_platform.get_device_capability()
    current_platform.get_device_name()
    measure("its platform asked (NVML)", t0)
    torch.cuda.is_available()
    measure("torch.cuda.is_available() (by NVML: vLLM sets PYTORCH_NVML_BASED_CUDA_CHECK)", t0, top=8)
    torch.cuda.init()
    measure("torch.cuda.init()", t0, top=8)
    sys._debugmallocstats()


def run_child(args: list[str], env_extra: dict, logfile: Path) -> dict:
    # fvboot (checkpoint_anatomy's reader) from this checkout, vLLM's engine in the child's own process
    path = f"{link_fvboot(HOME / 'lib')}:{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, PYTHONPATH=path, VLLM_ENABLE_V1_MULTIPROCESSING="0", **env_extra)
    t = time.monotonic()
    try:
        r = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                           timeout=CHILD_LIMIT_S)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    logfile.write_text(text)
    phases = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("PHASE ")]
    answer = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("ANSWER ")), None)
    heap = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("CENSUS ")), None)
    res = {"rc": rc, "seconds": round(time.monotonic() - t, 1), "phases": phases, "answer": answer,
           "heap_census": heap}
    if rc != 0:
        res["tail"] = text.splitlines()[-8:]
    log(f"{args[0]}: exit {rc} in {res['seconds']} s; last: {phases[-1] if phases else None}")
    return res


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        if sys.argv[2] == "api":
            child_api(sys.argv[3])
        else:
            child_engine(sys.argv[2], sys.argv[3])
        return 0
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    if len(sys.argv) > 1:
        model_dir = Path(sys.argv[1])
    else:
        model_dir = HOME / "model"
        if not (model_dir / "config.json").exists():
            env = dict(os.environ, PYTHONPATH=f"{link_fvboot(HOME / 'lib')}:{os.environ.get('PYTHONPATH', '')}")
            log(f"making {MODEL} in {model_dir}")
            subprocess.run([sys.executable, "-m", "fvboot", "make-model", MODEL, str(model_dir)], env=env, check=True)
    res: dict = {"bench": "gpu_memory_phases", "model": MODEL, "vllm_args": VLLM_ARGS, "children": {}}
    res["children"]["api"] = run_child(["api", str(model_dir)], {}, out_dir / "phases-api.log")
    for name in [n for n in ENGINES if n in os.environ.get("FV_PHASES_ENGINES", ",".join(ENGINES)).split(",")]:
        res["children"][name] = run_child([name, str(model_dir)], {}, out_dir / f"phases-{name}.log")
    record("gpu_memory_phases", res)
    return 0 if all(c["rc"] == 0 for c in res["children"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
