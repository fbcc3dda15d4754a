#!/usr/bin/env python3
"""Start-up benchmark of a baked image, CPU or GPU: `docker run` to the first correct answer.

Paths, each started N times in fresh containers on the same machine, in one run:
  restore   the image as shipped (restore from the checkpoint), page cache warm
  cold      the same with the page cache dropped first (--cold; needs root on the host)
  normal    a normal vLLM start of the same image (FV_RESTORE=0): the baked compile caches reused
  nocache   a normal start with empty compile caches (--nocache): what a plain `vllm serve` pays

"Correct" means the greedy answer recorded at bake for the first probe prompt. Afterwards the
restored server and the normal start answer the same extra prompts (not the probe's) with
greedy text and logprobs, and the two are compared: they must be identical.

    python3 bench/startup.py --image fast-vllm/synthetic-tiny:cpu --runs 3 [--out bench/results/x.json]
    python3 bench/startup.py --image IMG --gpu-access devices --cold --nocache --runs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import requests

from fvbuild.engine import docker_run_flags
from fvbuild.gpu import gpu_run_flags

CAPS = docker_run_flags() + ["--network", "host"]  # the documented capability set
EXTRA_PROMPTS = ("A list of colours: red,", "def fibonacci(n):", "The moon is")
def manifest(image: str) -> dict:
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "cat", image, "/fv/manifest.json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _complete(port: int, model: str, prompt: str, max_tokens: int, timeout: float = 900) -> dict:
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=timeout, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "logprobs": 2, "seed": 0})
    r.raise_for_status()
    c = r.json()["choices"][0]
    return {"text": c["text"], "logprobs": [round(x, 4) for x in c["logprobs"]["token_logprobs"]]}


def first_answer(image: str, m: dict, flags: list[str], port: int, extra: bool = False,
                 limit: float = 1800) -> tuple[float, str, list[dict]]:
    """Seconds from `docker run` to the first correct answer, the container's log, and (with
    EXTRA) its answers to EXTRA_PROMPTS."""
    probe = m["probe"][0]
    body = {"model": m["model"]["served_name"], "prompt": probe["prompt"], "max_tokens": 12,
            "temperature": 0.0}
    t0 = time.monotonic()
    cid = subprocess.run(["docker", "run", "-d", *CAPS, *flags, image], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        while True:
            try:
                r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=limit)
                if r.status_code == 200:
                    took = time.monotonic() - t0
                    text = r.json()["choices"][0]["text"]
                    if text != probe["text"]:
                        raise SystemExit(f"wrong answer {text!r} != {probe['text']!r}")
                    answers = [_complete(port, m["model"]["served_name"], p, 16) for p in EXTRA_PROMPTS] \
                        if extra else []
                    logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
                    return took, logs.stdout + logs.stderr, answers
            except requests.ConnectionError:
                time.sleep(0.01)
            if time.monotonic() - t0 > limit:
                logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
                raise SystemExit(f"no answer within {limit:.0f} s:\n{(logs.stdout + logs.stderr)[-3000:]}")
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also restore with the page cache dropped")
    ap.add_argument("--no-normal", "--no-cold-start", dest="normal", action="store_false",
                    help="skip the normal-start measurement")
    ap.add_argument("--nocache", action="store_true", help="also a normal start with empty compile caches")
    ap.add_argument("--gpu-access", choices=["none", "auto", "toolkit", "devices"], default="none")
    ap.add_argument("--nvidia-driver-dir", default="/usr/local/nvidia")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="runtime setting for the restores (repeatable), e.g. FV_RESTORE_THP=0")
    a = ap.parse_args()
    m = manifest(a.image)
    port = m["vllm"]["port"]
    gpu = gpu_run_flags(a.gpu_access, a.nvidia_driver_dir) if a.gpu_access != "none" else []
    env = [x for kv in a.env for x in ("-e", kv)]
    res: dict = {"image": a.image, "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                 "cpu": platform.processor() or platform.machine(), "device": m["device"],
                 "vllm": m["vllm"]["version"], "vllm_args": m["vllm"]["args"], "model": m["model"]["source"],
                 "restore_env": a.env, "restore_s": [], "cold_s": [], "normal_s": [], "nocache_s": []}
    answers: dict[str, list] = {}
    for i in range(a.runs):
        took, logs, got = first_answer(a.image, m, gpu + env, port, extra=i == 0)
        assert "restored from checkpoint" in logs, logs[-3000:]
        res["restore_s"].append(round(took, 2))
        answers.setdefault("restore", got)
        timeline = [l for l in logs.splitlines() if l.startswith('{"fvboot_timeline"')]
        res["last_restore_timeline"] = [json.loads(l)["fvboot_timeline"] for l in timeline]
        res["last_restore_log_tail"] = [l for l in logs.splitlines() if l.startswith("fvboot:")][-12:]
    if a.cold:
        for _ in range(a.runs):
            drop_page_cache()
            took, logs, _ = first_answer(a.image, m, gpu + env, port)
            assert "restored from checkpoint" in logs, logs[-3000:]
            res["cold_s"].append(round(took, 2))
            res["last_cold_timeline"] = [json.loads(l)["fvboot_timeline"] for l in logs.splitlines()
                                         if l.startswith('{"fvboot_timeline"')]
    if a.normal:
        for i in range(min(a.runs, 2)):
            took, _, got = first_answer(a.image, m, gpu + ["-e", "FV_RESTORE=0"], port, extra=i == 0)
            res["normal_s"].append(round(took, 2))
            answers.setdefault("normal", got)
    if a.nocache:
        empty = ["-e", "FV_RESTORE=0", "-e", "VLLM_CACHE_ROOT=/tmp/nc/vllm", "-e",
                 "TORCHINDUCTOR_CACHE_DIR=/tmp/nc/inductor", "-e", "TRITON_CACHE_DIR=/tmp/nc/triton"]
        took, _, _ = first_answer(a.image, m, gpu + empty, port)
        res["nocache_s"].append(round(took, 2))
    if "normal" in answers:
        res["restore_equals_normal_start"] = answers["restore"] == answers["normal"]
        res["answers"] = answers
    ckpt = sum(f["size"] for f in m["files"] if f["path"].startswith("checkpoint/"))
    weights = sum(f["size"] for f in m["files"] if f["path"].startswith("weights/"))
    res["checkpoint_bytes"], res["weights_bytes"] = ckpt, weights
    print(f"{'docker run -> first correct answer':<44}{'median s':>10}  runs")
    for key, label in (("restore_s", "restore from checkpoint (warm)"), ("cold_s", "restore, page cache dropped"),
                       ("normal_s", "normal vLLM start (baked compile caches)"),
                       ("nocache_s", "normal vLLM start (empty compile caches)")):
        if res[key]:
            print(f"{label:<44}{statistics.median(res[key]):>10.2f}  {res[key]}")
    print(f"checkpoint {ckpt / 1e9:.2f} GB, weight dump {weights / 1e9:.2f} GB")
    if "restore_equals_normal_start" in res:
        print(f"restored answers == normal start's (text + logprobs, {len(EXTRA_PROMPTS)} prompts): "
              f"{res['restore_equals_normal_start']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    if res.get("restore_equals_normal_start") is False:
        raise SystemExit("the restored server answers differently from a normal start")


if __name__ == "__main__":
    main()
