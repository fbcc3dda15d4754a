#!/usr/bin/env python3
"""GPU micro-benchmark of the weight file paths (no vLLM): dump and load ~6.4 GB of bf16.

What it does, on one CUDA GPU:
  1. makes Llama-3.2-3B-shaped tensors (vLLM's fused names: qkv_proj, gate_up_proj; tied
     embeddings; plus a float32 rotary cache) on the GPU, ~6.4 GB (FV_BENCH_GB scales the
     number of layers), and a zeroed copy of each;
  2. dumps them with ``fvboot.weights.write_weights`` to $FV_BENCH_DIR (default /root/fvbench):
     the pinned-buffer path of ``fvboot.weights.dump`` (time split: transfer / fsync);
  3. loads them back with ``fvboot.weights.load_into`` into the zeroed tensors, checking every
     byte (torch.equal on uint8 views) after each run:
       (a) page cache warm, default settings (best of 2: the file is all cached, so the GPU
           copies straight from the page cache), the pinned ring alone, then verify=True;
       (b) a small sweep of the ring's FV_LOAD_BUFFERS / _BUFFER_MB / _THREADS / streams;
       (c) cold: a separate ~2 GB file (FV_BENCH_COLD_GB; the disk reads ~1.3 GB/s, so the
           whole model would not fit the time budget) after `sync` + drop_caches (or, where
           /proc/sys is read-only, posix_fadvise(DONTNEED) on the file), read through the page
           cache and with O_DIRECT; the share of the file still cached is measured (mincore);
       (d) the old simple path (FV_GPU_LOADER=0) on the ~2 GB file, dump and warm load, for
           comparison;
  4. prints a table and writes JSON to $OUT/gpu_weight_load.json when OUT is set.
Exit status 0 when every load was bit-exact and no phase failed. Stays within ~4 minutes
(FV_BENCH_DEADLINE_S, default 200, skips the phases that would not fit). Files are removed at
the end unless FV_BENCH_KEEP=1.

Run from the repository root:  python3 bench/gpu_weight_load.py
(it links /tmp/fvpath/fvboot -> <repo>/entrypoint itself and imports fvboot from there).
FV_BENCH_SELFTEST_CPU=1 runs the whole script on the CPU with the loader's host engine and a
small vocabulary (a check of the script itself, numbers meaningless).

Just over 400 lines on purpose: the model's shapes, the dump, the loads and their settings
sweep, the cold-cache cases and the table share one time budget and one result, and fit one
device call as one file.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import harness
from harness import drop_page_cache, record, resident_fraction

# ``import fvboot`` resolves to this checkout's entrypoint/ package
sys.path.insert(0, str(harness.link_fvboot(Path("/tmp/fvpath"), require="weights/load.py")))

import torch  # noqa: E402

from fvboot import weights as wf  # noqa: E402
from fvboot.weights import fileformat, pipeline, settings  # noqa: E402

DEADLINE = float(os.environ.get("FV_BENCH_DEADLINE_S", "200"))
BUDGET = harness.Budget(DEADLINE)
log = functools.partial(harness.log, since=BUDGET.start)
BENCH_GB = float(os.environ.get("FV_BENCH_GB", "0") or 0)  # 0: the real Llama-3.2-3B size
COLD_GB = float(os.environ.get("FV_BENCH_COLD_GB", "2"))
BENCH_DIR = Path(os.environ.get("FV_BENCH_DIR", "/root/fvbench"))
KEEP = os.environ.get("FV_BENCH_KEEP") == "1"
SEED = 1234
SELFTEST = os.environ.get("FV_BENCH_SELFTEST_CPU") == "1"

# Llama-3.2-3B: hidden 3072, intermediate 8192, 24 q heads / 8 kv heads of 128, 28 layers,
# vocab 128256, tied embeddings; vLLM fuses q/k/v and gate/up
HIDDEN, INTER, HEAD_DIM, Q_HEADS, KV_HEADS, LAYERS, VOCAB = 3072, 8192, 128, 24, 8, 28, 128256
ROPE_POSITIONS = 131072
if SELFTEST:
    VOCAB, ROPE_POSITIONS = 4096, 2048


def sync() -> None:
    if not SELFTEST:
        torch.cuda.synchronize()

LOAD_KEYS = ("FV_LOAD_BUFFERS", "FV_LOAD_BUFFER_MB", "FV_LOAD_THREADS", "FV_LOAD_STREAMS",
             "FV_LOAD_ODIRECT", "FV_GPU_LOADER", "FV_LOAD_REGISTER")
results: dict = {"runs": [], "errors": [], "skipped": [], "notes": []}
all_exact = True


def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    p = f"model.layers.{i}."
    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [(p + "input_layernorm.weight", (HIDDEN,), torch.bfloat16),
            (p + "self_attn.qkv_proj.weight", (qkv, HIDDEN), torch.bfloat16),
            (p + "self_attn.o_proj.weight", (HIDDEN, Q_HEADS * HEAD_DIM), torch.bfloat16),
            (p + "post_attention_layernorm.weight", (HIDDEN,), torch.bfloat16),
            (p + "mlp.gate_up_proj.weight", (2 * INTER, HIDDEN), torch.bfloat16),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER), torch.bfloat16)]


def model_shapes() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    def nbytes(shapes):
        return sum(math.prod(s) * d.itemsize for _, s, d in shapes)

    head = [("model.embed_tokens.weight", (VOCAB, HIDDEN), torch.bfloat16)]
    tail = [("model.norm.weight", (HIDDEN,), torch.bfloat16),
            ("model.layers.0.self_attn.rotary_emb.cos_sin_cache", (ROPE_POSITIONS, HEAD_DIM),
             torch.float32)]
    layers = LAYERS
    if BENCH_GB > 0:
        per = nbytes(layer_shapes(0))
        layers = max(1, round((BENCH_GB * 1e9 - nbytes(head) - nbytes(tail)) / per))
    shapes = head + [x for i in range(layers) for x in layer_shapes(i)] + tail
    results["model"] = {"layers": layers, "tensors": len(shapes), "bytes": nbytes(shapes)}
    return shapes


def make_tensors(shapes, device) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(SEED)
    out = {}
    for name, shape, dtype in shapes:
        out[name] = torch.randn(shape, dtype=dtype, device=device, generator=g)
    sync()
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def exact(dst: dict, src: dict) -> list[str]:
    return [k for k in src if not torch.equal(bits(dst[k]), bits(src[k]))]


def zero(dst: dict) -> None:
    for t in dst.values():
        t.zero_()
    sync()


class env_set:
    """Temporarily set (or with None, remove) environment variables."""

    def __init__(self, **kv):
        self.kv, self.old = kv, {}

    def __enter__(self):
        for k, v in self.kv.items():
            self.old[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def settings_env(**kv) -> dict:
    base = {k: None for k in LOAD_KEYS}
    base.update({k: v for k, v in kv.items()})
    return base


def run_load(label: str, path: Path, dst: dict, src: dict, env: dict, verify: bool = False,
             reps: int = 1, phase: str = "") -> dict | None:
    global all_exact
    walls, details, bad = [], None, []
    for _ in range(reps):
        zero(dst)
        with env_set(**env):
            t = time.perf_counter()
            stats = wf.load_into(path, dst, verify=verify)
            sync()
            walls.append(time.perf_counter() - t)
        details = (stats.details or {}).get("gpu", [{}])[0]
        bad = exact(dst, src)
        if bad:
            all_exact = False
            break
    nbytes = sum(t.numel() * t.element_size() for t in src.values())
    best = min(walls)
    row = {"phase": phase, "label": label, "bytes": nbytes, "wall_s": round(best, 4),
           "walls": [round(w, 4) for w in walls], "gb_per_s": round(nbytes / best / 1e9, 3),
           "verify": verify, "bit_exact": not bad, "mismatched": bad[:5],
           "env": {k: v for k, v in env.items() if v is not None}, "loader": details}
    results["runs"].append(row)
    d = details or {}
    log(f"{label:<44} {nbytes / 1e9:6.2f} GB {best:7.3f} s {nbytes / best / 1e9:7.2f} GB/s  "
        f"threads={d.get('threads')} buffers={d.get('buffers')}x{d.get('buffer_mb')}MiB "
        f"streams={d.get('streams')} odirect={d.get('odirect')} setup={d.get('setup_seconds')}s "
        f"{'OK' if not bad else 'MISMATCH ' + ','.join(bad[:3])}")
    return row


def dump(label: str, path: Path, tensors: dict, env: dict, phase: str) -> dict:
    with env_set(**env):
        t = time.perf_counter()
        info = wf.write_weights(path, tensors.items(), meta={"bench": label})
        wall = time.perf_counter() - t
    d = info.details or {}
    g = (d.get("gpu") or [{}])[0]
    row = {"phase": phase, "label": label, "bytes": info.bytes, "wall_s": round(wall, 4),
           "gb_per_s": round(info.bytes / wall / 1e9, 3), "fsync_s": d.get("fsync_seconds"),
           "gb_per_s_without_fsync": round(info.bytes / max(1e-9, wall - (d.get("fsync_seconds") or 0)) / 1e9, 3),
           "env": {k: v for k, v in env.items() if v is not None}, "loader": g}
    results["runs"].append(row)
    how = (f"transfer {g.get('transfer_seconds')} s, threads={g.get('threads')} "
           f"buffers={g.get('buffers')}x{g.get('buffer_mb')}MiB streams={g.get('streams')}"
           if g else "one tensor chunk at a time through .cpu()")
    log(f"{label:<44} {info.bytes / 1e9:6.2f} GB {wall:7.3f} s {info.bytes / wall / 1e9:7.2f} GB/s  "
        f"(fsync {d.get('fsync_seconds')} s; {how})")
    return row


def evict(path: Path) -> dict:
    """Drop the file from the page cache: sync, drop_caches where allowed, fadvise anyway."""
    how = drop_page_cache([path])
    return {"method": ", ".join(how), "resident_after": resident_fraction(path)}


def phase(name: str, need_s: float):
    """Decorator-free guard: returns False (and records why) when the deadline is too near."""
    left = BUDGET.left()
    if left < need_s:
        results["skipped"].append(f"{name}: {left:.0f} s left of FV_BENCH_DEADLINE_S={DEADLINE:.0f}, "
                                  f"needs ~{need_s:.0f} s")
        log(f"SKIP {name} (time budget)")
        return False
    log(f"== {name}")
    return True


def fail(name: str, exc: BaseException) -> None:
    results["errors"].append({"phase": name, "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()})
    log(f"ERROR in {name}: {type(exc).__name__}: {exc}")
    traceback.print_exc()


def main() -> int:
    if SELFTEST:
        dev = torch.device("cpu")
        settings.GPU_DEVICE_TYPES = ("cpu",)
        pipeline.engine_for = lambda device, cfg, engine: pipeline.HostEngine()
        results["notes"].append("FV_BENCH_SELFTEST_CPU=1: CPU run of the script, numbers meaningless")
    elif not torch.cuda.is_available():
        print("gpu_weight_load: CUDA is not available (torch "
              f"{torch.__version__}); this benchmark needs an NVIDIA GPU", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    shapes = model_shapes()
    total = results["model"]["bytes"]
    free_disk = shutil.disk_usage(BENCH_DIR).free
    fs = subprocess.run(["df", "-T", str(BENCH_DIR)], capture_output=True, text=True).stdout
    results["env"] = {
        "gpu": "cpu (self-test)" if SELFTEST else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "cpus": os.cpu_count(), "bench_dir": str(BENCH_DIR), "filesystem": fs.strip(),
        "free_disk_bytes": free_disk, "blake3": fileformat.blake3 is not None,
        "defaults": {**settings.Config.from_env().__dict__,
                     "reader_threads": settings.Config.from_env().reader_threads()},
        "fv_load_env": {k: os.environ[k] for k in LOAD_KEYS if k in os.environ},
    }
    log(f"GPU {results['env']['gpu']}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{os.cpu_count()} CPUs; model {total / 1e9:.2f} GB in {len(shapes)} tensors "
        f"({results['model']['layers']} layers); dir {BENCH_DIR} ({free_disk / 1e9:.0f} GB free)")
    need_disk = total + 2 * COLD_GB * 1e9 * 1.05 + (1 << 30)  # + cold and baseline files
    if free_disk < need_disk:
        print(f"gpu_weight_load: {BENCH_DIR} has {free_disk / 1e9:.1f} GB free, needs "
              f"{need_disk / 1e9:.1f} GB (set FV_BENCH_DIR or FV_BENCH_GB)", file=sys.stderr)
        return 2

    full_path, cold_path, base_path = (BENCH_DIR / "bench.fvw", BENCH_DIR / "cold.fvw",
                                       BENCH_DIR / "baseline.fvw")
    defaults = settings_env()
    try:
        log("== making tensors")
        src = make_tensors(shapes, dev)
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        if not SELFTEST:
            log(f"GPU memory allocated {torch.cuda.memory_allocated(dev) / 1e9:.1f} GB")

        name = "dump (pinned pipeline, default settings)"
        if phase(name, 30):
            try:
                dump(name, full_path, src, defaults, "dump")
            except Exception as exc:  # noqa: BLE001
                fail(name, exc)

        if full_path.exists():
            name = "(a) warm page cache"
            if phase(name, 20):
                try:
                    run_load("warm, default settings (best of 2)", full_path, dst, src, defaults,
                             reps=2, phase="a")
                    run_load("warm, pinned ring (FV_LOAD_REGISTER=0, best of 2)", full_path, dst, src,
                             settings_env(FV_LOAD_REGISTER=0), reps=2, phase="a")
                    run_load("warm, default settings, verify=True", full_path, dst, src, defaults,
                             verify=True, phase="a")
                except Exception as exc:  # noqa: BLE001
                    fail(name, exc)

            sweep = [dict(FV_LOAD_BUFFERS=4, FV_LOAD_BUFFER_MB=64, FV_LOAD_THREADS=2),
                     dict(FV_LOAD_BUFFERS=8, FV_LOAD_BUFFER_MB=64, FV_LOAD_THREADS=4, FV_LOAD_STREAMS=1),
                     dict(FV_LOAD_BUFFERS=12, FV_LOAD_BUFFER_MB=64, FV_LOAD_THREADS=8),
                     dict(FV_LOAD_BUFFERS=16, FV_LOAD_BUFFER_MB=32, FV_LOAD_THREADS=8, FV_LOAD_STREAMS=4)]
            sweep = [dict(cfg, FV_LOAD_REGISTER=0) for cfg in sweep]  # the ring's own settings
            for cfg in sweep:
                label = "warm " + " ".join(f"{k.removeprefix('FV_LOAD_').lower()}={v}"
                                           for k, v in cfg.items())
                if not phase(f"(b) {label}", 15):
                    continue
                try:
                    run_load(label, full_path, dst, src, settings_env(**cfg), reps=2, phase="b")
                except Exception as exc:  # noqa: BLE001
                    fail(label, exc)

        # (c) cold: a separate, smaller file
        cold_src: dict = {}
        acc = 0
        for k, t in src.items():
            if acc >= COLD_GB * 1e9:
                break
            cold_src[k] = t
            acc += t.numel() * t.element_size()
        cold_dst = {k: dst[k] for k in cold_src}
        results["cold_subset"] = {"bytes": acc, "tensors": len(cold_src),
                                  "why": f"disk reads ~1.3 GB/s: a {COLD_GB:g} GB subset keeps cold "
                                         "runs inside the time budget"}
        name = f"(c) cold runs on a {acc / 1e9:.2f} GB subset"
        if phase(name, 15 + 3 * acc / 1e9):
            log(f"cold runs use a {acc / 1e9:.2f} GB subset ({len(cold_src)} tensors), not the "
                f"whole {total / 1e9:.2f} GB: the disk reads ~1.3 GB/s")
            try:
                dump("dump of the cold subset", cold_path, cold_src, defaults, "c")
                for label, env in (("cold, page cache (default)", defaults),
                                   ("cold, O_DIRECT", settings_env(FV_LOAD_ODIRECT=1))):
                    if not phase(f"(c) {label}", 5 + 2 * acc / 1e9):
                        continue
                    ev = evict(cold_path)
                    log(f"evicted: {ev['method']}; resident after: {ev['resident_after']}")
                    row = run_load(label, cold_path, cold_dst, cold_src, env, phase="c")
                    if row is not None:
                        row["eviction"] = ev
                        if ev["resident_after"] not in (None, 0.0) and ev["resident_after"] > 0.05:
                            results["notes"].append(f"{label}: {ev['resident_after']:.0%} of the "
                                                    "file was still cached: not fully cold")
                    if row and env.get("FV_LOAD_ODIRECT") and not (row["loader"] or {}).get("odirect"):
                        results["notes"].append(f"{label}: O_DIRECT was refused by the file system, "
                                                f"fell back: {(row['loader'] or {}).get('notes')}")
            except Exception as exc:  # noqa: BLE001
                fail(name, exc)

        # (d) the old path, for comparison
        name = "(d) old path (FV_GPU_LOADER=0) on the subset"
        if phase(name, 10 + 6 * acc / 1e9):
            try:
                dump("dump, old path (FV_GPU_LOADER=0)", base_path, cold_src,
                     settings_env(FV_GPU_LOADER=0), "d")
                run_load("warm load, old path (FV_GPU_LOADER=0)", base_path, cold_dst, cold_src,
                         settings_env(FV_GPU_LOADER=0), phase="d")
                run_load("warm load, new path, same file", base_path, cold_dst, cold_src,
                         defaults, phase="d")
            except Exception as exc:  # noqa: BLE001
                fail(name, exc)
    except Exception as exc:  # noqa: BLE001
        fail("setup", exc)
    finally:
        if not KEEP:
            for p in (full_path, cold_path, base_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    results["elapsed_s"] = round(BUDGET.elapsed(), 1)
    results["all_bit_exact"] = all_exact
    ok = all_exact and not results["errors"]
    results["ok"] = ok

    print("\n" + "=" * 118)
    print(f"{'phase':<5} {'run':<52} {'GB':>6} {'s':>8} {'GB/s':>7} {'setup s':>8} "
          f"{'thr':>4} {'buf':>8} {'str':>4} {'exact':>6}")
    for r in results["runs"]:
        d = r.get("loader") or {}
        buf = f"{d.get('buffers')}x{d.get('buffer_mb')}" if d else "-"
        ex = r.get("bit_exact")
        print(f"{r['phase']:<5} {r['label'][:52]:<52} {r['bytes'] / 1e9:6.2f} {r['wall_s']:8.3f} "
              f"{r['gb_per_s']:7.2f} {str(d.get('setup_seconds', '-')):>8} "
              f"{str(d.get('threads', '-')):>4} {buf:>8} {str(d.get('streams', '-')):>4} "
              f"{'-' if ex is None else ('yes' if ex else 'NO'):>6}")
    for s in results["skipped"]:
        print("skipped:", s)
    for n in results["notes"]:
        print("note:", n)
    for e in results["errors"]:
        print("error:", e["phase"], e["error"])
    print(f"cold runs used a {results.get('cold_subset', {}).get('bytes', 0) / 1e9:.2f} GB subset "
          "(not the whole model): the disk reads ~1.3 GB/s cold")
    print(f"{'OK' if ok else 'FAILED'}: all loads bit-exact={all_exact}, errors={len(results['errors'])}, "
          f"{results['elapsed_s']} s")
    out = record("gpu_weight_load", results, show=False)
    if out:
        print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
