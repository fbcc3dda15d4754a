#!/usr/bin/env python3
"""Issue 11, lever 4: would a compressed checkpoint beat the disk on a cold start? Compresses a
baked image's memory images (the pages-*.img files, concatenated) with zstd and lz4 at fast
levels, in independent frames (pzstd), and times decompression with every core, page cache warm
(so it is the CPU's speed, not the disk's). A cold restore reads the whole checkpoint at the
disk's speed; compressed, it would read the smaller file and decompress it, every start, warm
ones included.

    python3 bench/checkpoint_compression.py IMAGE [--json OUT]

Needs Docker, zstd, pzstd and lz4 on the host."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], out: Path | None = None) -> float:
    t = time.perf_counter()
    with (out.open("wb") if out else open(os.devnull, "wb")) as f:
        subprocess.run(cmd, stdout=f, check=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--json")
    a = p.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="fv-compress-"))
    try:
        cid = subprocess.run(["docker", "create", a.image], capture_output=True, text=True, check=True).stdout.strip()
        try:
            subprocess.run(["docker", "cp", f"{cid}:/fv/checkpoint", str(work)], capture_output=True, check=True)
        finally:
            subprocess.run(["docker", "rm", cid], capture_output=True)
        pages = work / "pages.bin"
        with pages.open("wb") as out:
            for img in sorted((work / "checkpoint" / "criu").glob("pages-*.img")):
                with img.open("rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)
        size = pages.stat().st_size
        timed(["cat", str(pages)])  # in the page cache for every run below
        res = {"image": a.image, "cores": cores, "pages_bytes": size, "codecs": []}
        for name, comp, decomp in (
                ("zstd -1, pzstd frames", ["pzstd", "-1", "-p", str(cores), "-q", "-c", str(pages)],
                 ["pzstd", "-d", "-p", str(cores), "-q", "-c"]),
                ("zstd -3, pzstd frames", ["pzstd", "-3", "-p", str(cores), "-q", "-c", str(pages)],
                 ["pzstd", "-d", "-p", str(cores), "-q", "-c"]),
                ("lz4 -1 (one thread)", ["lz4", "-1", "-q", "-c", str(pages)], ["lz4", "-d", "-q", "-c"])):
            packed = work / "packed"
            c = timed(comp, packed)
            n = packed.stat().st_size
            d = min(timed([*decomp, str(packed)]) for _ in range(3))
            row = {"codec": name, "ratio": round(size / n, 2), "compressed_bytes": n,
                   "compress_gb_per_s": round(size / c / 1e9, 2), "decompress_gb_per_s": round(size / d / 1e9, 2)}
            res["codecs"].append(row)
            print(json.dumps(row), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
