#!/usr/bin/env python3
"""A/B of fvboot changes on one baked image, without rebuilding it: restores alternate between
the image's own fvboot (A) and a folder of fvboot's sources bind-mounted over it (B), and the
medians of `docker run` -> first correct answer and of each timeline step are printed side by
side. Alternating runs cancel most of the drift of a noisy machine.

    python3 bench/fvboot_ab.py IMAGE B_FOLDER [--a-folder A_FOLDER] [--b-manifest FILE] [--runs 7]
                               [--b-mount SRC:DST ...] [--cold] [--env KEY=VALUE ...] [--json OUT]

B_FOLDER is a copy of entrypoint/ with the change, byte-compiled (`git archive REV entrypoint`,
`python3 -m compileall`); A is the image's fvboot, or A_FOLDER. --b-manifest mounts FILE over
B's /fv/manifest.json (the same checkpoint recorded another way, e.g. its pieces' digests by
another algorithm). --b-mount bind-mounts a file over B's (read-only), e.g. another build of
criu over /usr/local/sbin/criu. --cold drops the page cache
before each restore. CPU images only (the run flags are fvbuild's CPU ones)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

from fvbuild import bench
from fvboot.capabilities import docker_run_flags


def steps(timeline: list[dict]) -> dict[str, float]:
    out, prev = {}, 0.0
    for mark in timeline:
        out[mark["event"]] = round(mark["t"] - prev, 4)
        prev = mark["t"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("b_folder")
    p.add_argument("--a-folder")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--b-manifest")
    p.add_argument("--b-mount", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--json")
    a = p.parse_args()
    m = json.loads(subprocess.run(["docker", "run", "--rm", "--entrypoint", "fvboot", a.image, "inspect"],
                                  capture_output=True, text=True, check=True).stdout)
    plan = bench.BenchPlan(a.image, tuple(docker_run_flags() + ["--network", "host"]))
    env = [x for kv in a.env for x in ("-e", kv)]
    mount = "{}:/opt/fast-vllm/lib/fvboot:ro".format
    arms = {"A": env + (["-v", mount(a.a_folder)] if a.a_folder else []), "B": env + ["-v", mount(a.b_folder)]
            + (["-v", f"{a.b_manifest}:/fv/manifest.json:ro"] if a.b_manifest else [])
            + [x for m in a.b_mount for x in ("-v", f"{m}:ro")]}
    res: dict = {k: {"s": [], "steps": []} for k in arms}
    bench.first_answer(plan, m, env)  # fills the page cache, not counted
    for i in range(a.runs):
        for k, flags in arms.items():
            if a.cold:
                bench.drop_page_cache()
            took, logs, _ = bench.first_answer(plan, m, flags)
            if "restored from checkpoint" not in logs:
                raise SystemExit(f"{k}: not restored:\n{logs[-2000:]}")
            res[k]["s"].append(round(took, 3))
            res[k]["steps"].append(steps(bench.timeline_marks(logs)))
            print(f"{k} {i + 1}: {took:.3f} s", flush=True)
    print(f"{'':<28}{'A':>8}{'B':>8}")
    print(f"{'docker run -> answer':<28}{statistics.median(res['A']['s']):>8.3f}{statistics.median(res['B']['s']):>8.3f}")
    for step in res["A"]["steps"][0]:
        med = [statistics.median(s.get(step, 0.0) for s in res[k]["steps"]) for k in arms]
        print(f"{step:<28}{med[0]:>8.3f}{med[1]:>8.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"image": a.image, "env": a.env, "a_folder": a.a_folder, "b_folder": a.b_folder,
                       "b_manifest": a.b_manifest, "b_mount": a.b_mount,
                       "cold": a.cold, **res}, f, indent=1)


if __name__ == "__main__":
    main()
