#!/usr/bin/env python3
"""CPU start-up benchmark of a baked image: `docker run` to the first correct answer, restoring
from the checkpoint vs a normal vLLM start of the same image (FV_RESTORE=0, compile caches
reused). Answers are checked against the probe answers recorded at bake time.

    python3 bench/cpu_startup.py --image fast-vllm/synthetic-tiny:cpu --runs 3 [--out bench/results/cpu.json]
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

CAPS = docker_run_flags() + ["--network", "host"]  # the documented capability set


def manifest(image: str) -> dict:
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "cat", image, "/fv/manifest.json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def first_answer(image: str, m: dict, env: list[str], port: int) -> tuple[float, str]:
    probe = m["probe"][0]
    body = {"model": m["model"]["served_name"], "prompt": probe["prompt"], "max_tokens": 12,
            "temperature": 0.0}
    t0 = time.monotonic()
    cid = subprocess.run(["docker", "run", "-d", *CAPS, *env, image], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        while True:
            try:
                r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=900)
                if r.status_code == 200:
                    took = time.monotonic() - t0
                    text = r.json()["choices"][0]["text"]
                    if text != probe["text"]:
                        raise SystemExit(f"wrong answer {text!r} != {probe['text']!r}")
                    logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
                    return took, logs.stdout + logs.stderr
            except requests.ConnectionError:
                time.sleep(0.01)
            if time.monotonic() - t0 > 900:
                raise SystemExit("no answer within 900 s")
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-cold", action="store_true", help="skip the normal-start measurement")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="runtime setting for the restores (repeatable), e.g. FV_RESTORE_THP=0")
    a = ap.parse_args()
    m = manifest(a.image)
    port = m["vllm"]["port"]
    res: dict = {"image": a.image, "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
                 "cpu": platform.processor() or platform.machine(), "vllm": m["vllm"]["version"],
                 "model": m["model"]["source"], "restore_env": a.env, "restore_s": [], "cold_s": []}
    for _ in range(a.runs):
        took, logs = first_answer(a.image, m, [x for kv in a.env for x in ("-e", kv)], port)
        assert "restored from checkpoint" in logs, logs[-3000:]
        res["restore_s"].append(round(took, 2))
        timeline = [l for l in logs.splitlines() if l.startswith('{"fvboot_timeline"')]
        res["last_restore_timeline"] = [json.loads(l)["fvboot_timeline"] for l in timeline]
    if not a.no_cold:
        for _ in range(min(a.runs, 2)):
            took, logs = first_answer(a.image, m, ["-e", "FV_RESTORE=0"], port)
            res["cold_s"].append(round(took, 2))
    ckpt = sum(f["size"] for f in m["files"] if f["path"].startswith("checkpoint/"))
    weights = sum(f["size"] for f in m["files"] if f["path"].startswith("weights/"))
    res["checkpoint_bytes"], res["weights_bytes"] = ckpt, weights
    print(f"{'docker run -> first correct answer':<40}{'median s':>10}  runs")
    print(f"{'restore from checkpoint':<40}{statistics.median(res['restore_s']):>10.2f}  {res['restore_s']}")
    if res["cold_s"]:
        print(f"{'normal vLLM start (compile caches)':<40}{statistics.median(res['cold_s']):>10.2f}  {res['cold_s']}")
    print(f"checkpoint {ckpt / 1e9:.2f} GB, weight dump {weights / 1e6:.1f} MB")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
