#!/usr/bin/env python3
"""Issue 11, lever 4 (cold): would the prefetch gain by reading the image's libraries too?

A cold restore reads the checkpoint's memory images (the prefetch, in order, 8 MiB at a time)
and then whatever the restored processes fault in from the image's files: the parts of torch's
and the other libraries' code they run, ~0.47 GB on the CPU image of `synthetic:tiny`, through
the kernel's readahead. This finds those parts (the file pages an answered cold restore left in
the page cache, outside the checkpoint), then alternates cold restores three ways:

- plain: today's restore;
- beside: the same, with those ranges read by 4 threads of 8 MiB reads from `docker run` on
  (what a prefetch of the libraries would do), or, with --after S, from S seconds after it (about
  when the prefetch has read the memory images, which CRIU needs first);
- before: the ranges read first, then the restore timed alone (the most a perfect overlap could
  give; the read's own time is printed beside it).

    python3 bench/cpu_library_prefetch.py IMAGE [--runs 4] [--after S ...] [--json OUT]

Root, Docker's overlay2 driver (the layers' files are read where Docker keeps them); CPU images
(fvbuild's CPU run flags)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fvbuild import bench
from fvboot.capabilities import docker_run_flags
from fvboot.residency import PAGE, FileMapping

CHUNK = 8 << 20


def layer_files(image: str) -> list[str]:
    out = subprocess.run(["docker", "inspect", "-f", "{{.GraphDriver.Data.LowerDir}}:{{.GraphDriver.Data.UpperDir}}",
                          image], capture_output=True, text=True, check=True).stdout.strip()
    files = []
    for layer in filter(os.path.isdir, out.split(":")):
        for root, _, names in os.walk(layer):
            if "/fv/checkpoint" in root or "/fv/weights" in root:
                continue  # the prefetch reads these already
            files += [p for n in names if os.path.isfile(p := os.path.join(root, n)) and not os.path.islink(p)]
    return files


def cached_ranges(path: str) -> list[tuple[int, int]]:
    """(offset, length) of each run of PATH's pages in the page cache (mincore over fvboot's own
    read-only mapping of the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if not size:
            return []
        try:
            m = FileMapping(fd, size)
        except OSError:
            return []
        try:
            vec = (ctypes.c_ubyte * m.pages)()
            m.libc.mincore(m.addr, size, vec)
        finally:
            m.close()
    finally:
        os.close(fd)
    runs, start = [], None
    for i, b in enumerate(bytes(vec) + b"\0"):
        if b & 1 and start is None:
            start = i
        elif not b & 1 and start is not None:
            runs.append((start * PAGE, min(i * PAGE, size) - start * PAGE))
            start = None
    return runs


def read_ranges(ranges: dict[str, list[tuple[int, int]]], after: float = 0.0) -> float:
    jobs = [(p, o, min(CHUNK, off + ln - o)) for p, rs in ranges.items() for off, ln in rs
            for o in range(off, off + ln, CHUNK)]

    def one(job):
        fd = os.open(job[0], os.O_RDONLY)
        try:
            os.pread(fd, job[2], job[1])
        finally:
            os.close(fd)
    time.sleep(after)
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, jobs))
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--after", type=float, action="append", default=[],
                   help="also an arm that reads the ranges from S seconds after docker run (repeat)")
    p.add_argument("--json")
    a = p.parse_args()
    arms = ["plain", "beside", *(f"beside after {s} s" for s in a.after), "before"]
    m = json.loads(subprocess.run(["docker", "run", "--rm", "--entrypoint", "fvboot", a.image, "inspect"],
                                  capture_output=True, text=True, check=True).stdout)
    plan = bench.BenchPlan(a.image, tuple(docker_run_flags() + ["--network", "host"]))
    files = layer_files(a.image)
    bench.drop_page_cache()
    took, logs, _ = bench.first_answer(plan, m, [])
    if "restored from checkpoint" not in logs:
        raise SystemExit(f"not restored:\n{logs[-2000:]}")
    ranges = {f: r for f in files if (r := cached_ranges(f))}
    size = sum(ln for rs in ranges.values() for _, ln in rs)
    print(f"a cold restore ({took:.2f} s) read {size / 1e9:.3f} GB of {len(ranges)} files outside the checkpoint,"
          f" {sum(map(len, ranges.values()))} ranges", flush=True)
    res: dict = {**{arm: [] for arm in arms}, "before_read_s": []}
    for i in range(a.runs):
        for arm in arms:
            bench.drop_page_cache()
            reader = None
            if arm == "before":
                res["before_read_s"].append(round(read_ranges(ranges), 3))
            elif arm.startswith("beside"):
                after = a.after[arms.index(arm) - 2] if arm != "beside" else 0.0
                reader = threading.Thread(target=read_ranges, args=(ranges, after))
                reader.start()
            took, logs, _ = bench.first_answer(plan, m, [])
            if reader:
                reader.join()
            if "restored from checkpoint" not in logs:
                raise SystemExit(f"{arm}: not restored:\n{logs[-2000:]}")
            res[arm].append(round(took, 3))
            print(f"{arm} {i + 1}: {took:.3f} s" + (f" (read before: {res['before_read_s'][-1]} s)"
                                                    if arm == "before" else ""), flush=True)
    for k, v in res.items():
        print(f"{k:<22}median {statistics.median(v):.3f}  {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"image": a.image, "library_bytes": size, "files": len(ranges),
                       "ranges": sum(map(len, ranges.values())), "disk_read_gbps":
                       bench.disk_read_gbps(Path("/var/lib/docker")), **res}, f, indent=1)


if __name__ == "__main__":
    main()
