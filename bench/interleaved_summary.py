#!/usr/bin/env python3
"""The tables of an interleaved run (bench/gpu_variants_interleaved.sh, `.ci/gpu-run variants`):
per setting, each round's `docker run` -> first correct answer and their median, a round that
did not restore named as such with its reason; then where the time went, step by step (medians
of the rounds' timelines); and the restores with the page cache dropped, for a setting that
asked for them (`--cold`). Markdown, for the results' README.

    python3 bench/interleaved_summary.py bench/results/<run>/interleaved
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

# (label, from mark, to mark): the restore's steps as fvboot's timeline marks them
STEPS = (
    ("`docker run` -> fvboot running", None, "fvboot running"),
    ("checks, stager, prefetch, token, /dev/shm", "fvboot running", "restore issued"),
    ("CRIU memory", "restore issued", "criu: memory restored"),
    ("CUDA resume", "criu: memory restored", "criu: CUDA resumed"),
    ("memory adopted (helper)", "restore done", "memory adopted"),
    ("weights' memory mapped", ("memory adopted", "restore done"), "weight memory mapped"),
    ("staged copy taken / weights in place", "weight memory mapped", ("staged copy taken", "weights in place")),
    ("KV cache wake", "weights loaded", "engine awake"),
    ("probe", "engine awake", "answers checked"),
    ("gate, first request", "answers checked", "first request served"),
)


def _t(marks: dict[str, float], name) -> float | None:
    if name is None:
        return 0.0
    for n in (name if isinstance(name, tuple) else (name,)):
        if n in marks:
            return marks[n]
    return None


def label(run: dict) -> str:
    parts = list(run.get("restore_env") or [])
    if run.get("settle_s"):
        parts.append(f"--settle={run['settle_s']:g}")
    if run.get("cold_s"):
        parts.append("--cold")
    return " ".join(f"`{p}`" for p in parts) or "defaults"


def load(folder: Path) -> dict[int, dict]:
    """variant number -> {"label", "rounds": {round: seconds or "why"}, "timelines": [...]}"""
    out: dict[int, dict] = {}
    for log in sorted(folder.glob("v*-r*.log")):
        m = re.fullmatch(r"v(\d+)-r(\d+)\.log", log.name)
        if not m:
            continue
        v, r = int(m.group(1)), int(m.group(2))
        entry = out.setdefault(v, {"label": None, "rounds": {}, "timelines": [], "cold": {}})
        res = log.with_suffix(".json")
        if res.exists():
            run = json.loads(res.read_text())
            entry["label"] = entry["label"] or label(run)
            entry["rounds"][r] = run["restore_s"][0]
            if run.get("cold_s"):
                entry["cold"][r] = run["cold_s"][0]
            entry["timelines"].append({e["event"]: e["t"] for e in run.get("last_restore_timeline", [])})
        else:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            why = re.search(r"checkpoint not used: (.*?); starting vLLM normally", last)
            entry["rounds"][r] = "fell back" + (f" ({why.group(1)[:90]})" if why else "")
    return out


def tables(variants: dict[int, dict]) -> str:
    rounds = sorted({r for v in variants.values() for r in v["rounds"]})
    lines = ["| `docker run` -> first correct answer, s | " + " | ".join(f"r{r}" for r in rounds) + " | median |",
             "| --- |" + " --- |" * (len(rounds) + 1)]
    for k in sorted(variants):
        v = variants[k]
        got = [v["rounds"].get(r, "") for r in rounds]
        times = [x for x in got if isinstance(x, float)]
        med = f"{statistics.median(times):.2f}" if times else "-"
        if times and len(times) < len(got):
            med += f" ({len(times)} of {len(got)} restored)"
        cells = [f"{x:.2f}" if isinstance(x, float) else ("fell back" if x else "") for x in got]
        lines.append(f"| {v['label'] or f'variant {k}'} | " + " | ".join(cells) + f" | {med} |")
    why = [f"- {variants[k]['label'] or k}, round {r}: {x}" for k in sorted(variants)
           for r, x in sorted(variants[k]["rounds"].items()) if isinstance(x, str) and "(" in x]
    lines += ["", "Where the time goes (medians of the rounds' timelines, seconds):", "",
              "| step | " + " | ".join(variants[k]["label"] or f"variant {k}" for k in sorted(variants)) + " |",
              "| --- |" + " --- |" * len(variants)]
    for name, a, b in STEPS:
        cells = []
        for k in sorted(variants):
            d = [tb - ta for tl in variants[k]["timelines"]
                 if (ta := _t(tl, a)) is not None and (tb := _t(tl, b)) is not None]
            cells.append(f"{statistics.median(d):.2f}" if d else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cold = [k for k in sorted(variants) if variants[k]["cold"]]
    if cold:
        lines += ["", "Page cache dropped (`--cold`), s:", "",
                  "| setting | " + " | ".join(f"r{r}" for r in rounds) + " | median |", "| --- |" + " --- |" * (len(rounds) + 1)]
        for k in cold:
            c = variants[k]["cold"]
            lines.append(f"| {variants[k]['label']} | " + " | ".join(f"{c[r]:.2f}" if r in c else "" for r in rounds)
                         + f" | {statistics.median(c.values()):.2f} |")
    return "\n".join(lines + ([""] + why if why else []))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    print(tables(load(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
