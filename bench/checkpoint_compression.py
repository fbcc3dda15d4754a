#!/usr/bin/env python3
"""Issue 11, lever 4: would a compressed checkpoint beat the disk? Compresses a baked image's
memory images (the pages-*.img files, concatenated) in independent frames, the way fvboot would
have to store them to decompress them on every core, and times what a start would pay:

- warm (page cache full): decompressing every frame into a file in /dev/shm (a tmpfs file is what
  CRIU would then restore from), against today's restore, which maps the page cache's own pages
  and pays nothing for them;
- cold (page cache dropped, root only): reading the memory images as fvboot's prefetch does (4
  threads, 8 MiB reads) against reading the compressed frames and decompressing them, pipelined
  on every core;
- shipped: the whole checkpoint folder as an image layer travels through a registry, a tar
  compressed with gzip (what `docker push` sends; Go's default level, 6) or zstd (containerd's
  and buildx's `compression=zstd`, level 3): the bytes a node pulls, not the bytes it keeps.

    python3 bench/checkpoint_compression.py IMAGE|CHECKPOINT_FOLDER [--json OUT] [--frame-mib 16] [--rounds 3]

Needs Docker and the Python packages zstandard and lz4 (`pip install -e ".[bench]"`; GPU CI carries their wheels in
.whl/bench); the codecs run in threads (both release the GIL)."""

from __future__ import annotations

import argparse
import json
import tarfile
import zlib
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lz4.frame
import zstandard

CODECS = {
    "zstd -1": (lambda b: zstandard.ZstdCompressor(level=1).compress(b),
                lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "zstd -3": (lambda b: zstandard.ZstdCompressor(level=3).compress(b),
                lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "lz4 -1": (lambda b: lz4.frame.compress(b, compression_level=1), lz4.frame.decompress),
}


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(path: Path, threads: int = 4, block: int = 8 << 20) -> float:
    """The prefetch's way of reading a file: `threads` readers of `block`-sized pieces."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda off: os.pread(fd, block, off), range(0, size, block)))
    finally:
        os.close(fd)
    return time.perf_counter() - t


class _Counted:
    """A write-only file that counts what the gzip and zstd streams of what is written would be."""

    def __init__(self) -> None:
        self.raw = 0
        self.gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing, Go's gzip.DefaultCompression
        self.gz_bytes = 0
        self.zst = zstandard.ZstdCompressor(level=3).compressobj()
        self.zst_bytes = 0

    def write(self, data: bytes) -> int:
        self.raw += len(data)
        self.gz_bytes += len(self.gz.compress(data))
        self.zst_bytes += len(self.zst.compress(data))
        return len(data)

    def close(self) -> None:
        self.gz_bytes += len(self.gz.flush())
        self.zst_bytes += len(self.zst.flush())


def shipped(folder: Path) -> dict:
    """The layer FOLDER would be (a tar of it, as an image layer is) and its gzip and zstd sizes."""
    out = _Counted()
    t = time.perf_counter()
    with tarfile.open(fileobj=out, mode="w|", bufsize=8 << 20) as tar:
        tar.add(folder, arcname=folder.name)
    out.close()
    return {"layer_tar_bytes": out.raw, "gzip_6_bytes": out.gz_bytes, "zstd_3_bytes": out.zst_bytes,
            "gzip_ratio": round(out.raw / out.gz_bytes, 2), "zstd_ratio": round(out.raw / out.zst_bytes, 2),
            "took_s": round(time.perf_counter() - t, 1)}


def compress(pages: Path, packed: Path, codec: str, frame: int, cores: int) -> tuple[list, float]:
    """Independent frames of `frame` bytes; returns [(offset in packed, length, offset in pages)]."""
    comp = CODECS[codec][0]
    size = pages.stat().st_size
    fd = os.open(pages, os.O_RDONLY)
    t = time.perf_counter()
    try:
        with ThreadPoolExecutor(cores) as pool:
            frames = list(pool.map(lambda off: comp(os.pread(fd, frame, off)), range(0, size, frame)))
    finally:
        os.close(fd)
    took = time.perf_counter() - t
    index, at = [], 0
    with packed.open("wb") as out:
        for i, data in enumerate(frames):
            out.write(data)
            index.append((at, len(data), i * frame))
            at += len(data)
    return index, took


def decompress(packed: Path, index: list, codec: str, target: Path, size: int, cores: int) -> float:
    """Every frame read, decompressed and written at its place in `target`, on `cores` threads."""
    decomp = CODECS[codec][1]
    src = os.open(packed, os.O_RDONLY)
    dst = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    try:
        os.ftruncate(dst, size)

        def one(entry):
            at, length, to = entry
            os.pwrite(dst, decomp(os.pread(src, length, at)), to)

        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(one, index))
    finally:
        os.close(src)
        os.close(dst)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", help="a baked image, or a checkpoint folder (a host-mode bake's $FV_HOME/checkpoint)")
    p.add_argument("--json")
    p.add_argument("--frame-mib", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--codecs", default=",".join(CODECS), help="comma-separated, of: " + ", ".join(CODECS))
    a = p.parse_args()
    cores = os.cpu_count() or 1
    frame = a.frame_mib << 20
    work = Path(tempfile.mkdtemp(prefix="fv-compress-", dir="/var/tmp"))
    target = Path("/dev/shm/fv-compress-out")
    try:
        given = Path(a.image).is_dir()  # a host-mode bake's checkpoint folder (its criu/ inside), read in place
        checkpoint = Path(a.image) if given else work / "checkpoint"
        if not given:
            cid = subprocess.run(["docker", "create", "--entrypoint", "true", a.image],
                                 capture_output=True, text=True, check=True).stdout.strip()
            try:
                subprocess.run(["docker", "cp", f"{cid}:/fv/checkpoint", str(work)], capture_output=True, check=True)
            finally:
                subprocess.run(["docker", "rm", cid], capture_output=True)
        layer = shipped(checkpoint)
        print(json.dumps({"shipped (the checkpoint layer through a registry)": layer}), flush=True)
        pages = work / "pages.bin"
        with pages.open("wb") as out:
            for img in sorted((checkpoint / "criu").glob("pages-*.img")):
                with img.open("rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)
        if not given:
            shutil.rmtree(checkpoint)
        size = pages.stat().st_size
        can_drop = drop_caches()
        res = {"image": a.image, "cores": cores, "pages_bytes": size, "frame_bytes": frame,
               "cold_measured": can_drop, "shipped": layer, "codecs": []}
        if can_drop:
            reads = []
            for _ in range(a.rounds):
                drop_caches()
                reads.append(read_all(pages))
            res["cold_read_s"] = sorted(reads)
            res["disk_gb_per_s"] = round(size / min(reads) / 1e9, 2)
            print(json.dumps({"cold read of the memory images, s": sorted(reads),
                              "disk GB/s": res["disk_gb_per_s"]}), flush=True)
        for codec in a.codecs.split(","):
            packed = work / "packed"
            index, took = compress(pages, packed, codec, frame, cores)
            n = packed.stat().st_size
            read_all(packed)  # in the page cache
            warm = [decompress(packed, index, codec, target, size, cores) for _ in range(a.rounds)]
            row = {"codec": f"{codec}, {a.frame_mib} MiB frames", "ratio": round(size / n, 2),
                   "compressed_bytes": n, "compress_gb_per_s": round(size / took / 1e9, 2),
                   "warm_decompress_to_tmpfs_s": sorted(round(w, 3) for w in warm),
                   "decompress_gb_per_s": round(size / min(warm) / 1e9, 2)}
            if can_drop:
                cold = []
                for _ in range(a.rounds):
                    drop_caches()
                    cold.append(round(decompress(packed, index, codec, target, size, cores), 3))
                row["cold_read_and_decompress_s"] = sorted(cold)
            res["codecs"].append(row)
            print(json.dumps(row), flush=True)
            packed.unlink()
            target.unlink(missing_ok=True)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        target.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
