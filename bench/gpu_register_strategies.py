#!/usr/bin/env python3
"""Where the page-cache weight path's time goes, and what would take it off the restore.

The 3B image's restore (2026-12-03, H200) loaded 7.04 GB in 0.71 s through
fvboot.weights.pagecache: cudaHostRegister 0.35 s of the 0.51 s of copies (one thread, 1 GiB
windows), blake3 of every entry 0.53 s beside them, residency check (mincore) 0.09 s. Each is
timed here alone and in other shapes, on one file in the page cache, read plainly and through an
overlayfs mount (what a container sees):

- mincore over the mapping (today's residency check in a container);
- registration + copies: the loader's loop (``pagecache._copy_windows``, one thread), windows
  registered by several threads at once (2026-12-03's run named these rows after
  FV_LOAD_REGISTER_THREADS, a setting of the loader then, removed for giving nothing), one
  registration of the whole file;
- the hash alone (MappedVerifier, no copies), and the two together as the restore runs them;
- a checksum computed on the GPU over the copied bytes, for comparison.

    python3 bench/gpu_register_strategies.py [GIB]     (default 7; writes $OUT/gpu_register_strategies.json)

Bare GPU machine of the device kind, no vLLM or Docker needed (root: the overlay mount).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness

sys.path.insert(0, str(harness.link_fvboot(Path(tempfile.gettempdir()) / "fv-bench-pkg")))

import torch  # noqa: E402

from fvboot import residency  # noqa: E402
from fvboot.weights import pagecache  # noqa: E402
from fvboot.weights.fileformat import WeightEntry  # noqa: E402
from fvboot.weights.settings import verify_threads  # noqa: E402

GIB = 1 << 30
RO = 0x08  # cudaHostRegisterReadOnly


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


def make_file(path: Path, size: int) -> None:
    block = os.urandom(64 << 20)
    with path.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    with path.open("rb") as f:  # in the page cache, as after the prefetch
        while f.read(64 << 20):
            pass


def entries_of(size: int) -> list[WeightEntry]:
    """Entries shaped like a 3B model's: one 788 MB embedding, the rest 50-100 MB each."""
    sizes, left = [788 << 20], size - (788 << 20)
    while left > 0:
        n = min(left, (96 if len(sizes) % 2 else 48) << 20)
        sizes.append(n)
        left -= n
    out, off = [], 0
    for k, n in enumerate(sizes):
        out.append(WeightEntry(key=f"t{k}", offset=off, nbytes=n, dtype="uint8", shape=(n,), checksum=""))
        off += n
    return out


def copy_parallel(mapping, dst: torch.Tensor, window: int, threads: int) -> tuple[float, float]:
    """Windows registered by THREADS threads at once, each copying its own windows on its stream."""
    cudart = torch.cuda.cudart()
    size = mapping.size
    offs = list(range(0, size, window))
    reg = [0.0] * threads

    def work(k: int) -> None:
        torch.cuda.set_device(dst.device)
        s = torch.cuda.Stream()
        done = []
        for off in offs[k::threads]:
            n = min(window, size - off)
            t = time.perf_counter()
            err = int(cudart.cudaHostRegister(mapping.addr + off, n, RO))
            reg[k] += time.perf_counter() - t
            if err:
                raise RuntimeError(f"cudaHostRegister: {err}")
            host = torch.frombuffer((ctypes.c_ubyte * n).from_address(mapping.addr + off), dtype=torch.uint8)
            with torch.cuda.stream(s):
                dst[off:off + n].copy_(host, non_blocking=True)
            done.append(mapping.addr + off)
        s.synchronize()
        for a in done:
            cudart.cudaHostUnregister(a)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))
    torch.cuda.synchronize()
    return time.perf_counter() - t0, max(reg)


def copy_whole(mapping, dst: torch.Tensor) -> tuple[float, float]:
    cudart = torch.cuda.cudart()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    err = int(cudart.cudaHostRegister(mapping.addr, mapping.size, RO))
    reg = time.perf_counter() - t0
    if err:
        raise RuntimeError(f"cudaHostRegister: {err}")
    host = torch.frombuffer((ctypes.c_ubyte * mapping.size).from_address(mapping.addr), dtype=torch.uint8)
    dst.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    cudart.cudaHostUnregister(mapping.addr)
    return took, reg


def gpu_checksum(flat: torch.Tensor, chunk: int = 1 << 28) -> tuple[float, int]:
    """A positional sum over int32 words (odd coefficients, wrapping int64): the GPU's cost of a
    checksum of the bytes it already holds."""
    words = flat[: flat.numel() // 4 * 4].view(torch.int32)
    n = min(chunk, words.numel())
    coef = (torch.arange(n, device=flat.device, dtype=torch.int64) * 0x9E3779B97F4A7C15 | 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for k, a in enumerate(range(0, words.numel(), chunk)):
        w = words[a:a + chunk]
        total += (w.to(torch.int64) * coef[: w.numel()]).sum() * (2 * k + 1)
    value = int(total.item())
    return time.perf_counter() - t0, value


def one_file(path: Path, label: str, dst: torch.Tensor, reps: int) -> dict:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    out: dict = {"file": label}
    try:
        def fresh():
            return residency.FileMapping(fd, size)

        m = fresh()
        out["mincore_s"] = [round(timed(m.mincore_missing)[0], 4) for _ in range(reps)]
        out["cachestat_pages"] = residency.cachestat_pages(m.libc, fd, size)
        m.close()
        ents = entries_of(size)
        flats = [dst[e.offset:e.offset + e.nbytes] for e in ents]
        rows = []
        for rep in range(reps):
            for name, fn in (
                ("today: one thread, 1 GiB windows", lambda mm: pagecache._copy_windows(ents, flats, mm, dst.device)[::2]),
                ("2 threads, 1 GiB windows", lambda mm: copy_parallel(mm, dst, GIB, 2)),
                ("4 threads, 1 GiB windows", lambda mm: copy_parallel(mm, dst, GIB, 4)),
                ("8 threads, 256 MiB windows", lambda mm: copy_parallel(mm, dst, 256 << 20, 8)),
                ("4 threads, 256 MiB windows", lambda mm: copy_parallel(mm, dst, 256 << 20, 4)),
                ("whole file, one registration", lambda mm: copy_whole(mm, dst)),
            ):
                mm = fresh()
                try:
                    took, reg = fn(mm)
                finally:
                    mm.close()
                rows.append({"rep": rep, "how": name, "seconds": round(took, 4),
                             "register_s": round(reg, 4), "gb_per_s": round(size / took / 1e9, 2)})
                harness.log(f"{label} {name}: {took:.3f} s (register {reg:.3f}), {size / took / 1e9:.1f} GB/s")
        out["copies"] = rows
        import blake3  # noqa: F401 - the checksum the dumps record
        from fvboot.weights.fileformat import entry_hasher
        for e in ents:  # real digests, so the verifier's checks pass
            h = entry_hasher("blake3", e.nbytes)
            mm = fresh()
            h.update(memoryview((ctypes.c_char * e.nbytes).from_address(mm.addr + e.offset)).cast("B"))
            mm.close()
            object.__setattr__(e, "checksum", h.hexdigest())
        hashes = []
        for rep in range(reps):
            for threads in (verify_threads(), 16, 8):
                mm = fresh()
                try:
                    with pagecache.MappedVerifier(mm, ents, "blake3", str(path), threads) as v:
                        v.result()
                finally:
                    mm.close()
                hashes.append({"rep": rep, "threads": threads, "seconds": round(v.seconds, 4)})
                harness.log(f"{label} blake3 alone, {threads} threads: {v.seconds:.3f} s")
            mm = fresh()
            try:
                t0 = time.perf_counter()
                with pagecache.MappedVerifier(mm, ents, "blake3", str(path), verify_threads()) as v:
                    took, _, reg = pagecache._copy_windows(ents, flats, mm, dst.device)
                    v.result()
                both = time.perf_counter() - t0
            finally:
                mm.close()
            hashes.append({"rep": rep, "together_with_today's_copies_s": round(both, 4), "copies_s": round(took, 4),
                           "hash_s": round(v.seconds, 4), "register_s": round(reg, 4)})
            harness.log(f"{label} today's load (copies + blake3): {both:.3f} s (copies {took:.3f}, hash {v.seconds:.3f})")
        out["hashes"] = hashes
    finally:
        os.close(fd)
    return out


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 7.0
    size = int(gib * GIB) // (64 << 20) * (64 << 20)
    work = Path(os.environ.get("FV_BENCH_DIR", "/root/fv-reg"))
    lower, upper, wd, ovl = (work / d for d in ("lower", "upper", "work", "ovl"))
    for d in (lower, upper, wd, ovl):
        d.mkdir(parents=True, exist_ok=True)
    path = lower / "w.bin"
    if not path.exists() or path.stat().st_size != size:
        harness.log(f"writing {size / 1e9:.2f} GB")
        make_file(path, size)
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              f"lowerdir={lower},upperdir={upper},workdir={wd}", str(ovl)],
                             capture_output=True, text=True)
    torch.cuda.init()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    result: dict = {"bytes": size, "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count(), "runs": []}
    try:
        result["runs"].append(one_file(path, "plain", dst, 2))
        if mounted.returncode == 0:
            result["runs"].append(one_file(ovl / "w.bin", "overlayfs", dst, 2))
        else:
            result["overlay_mount_error"] = mounted.stderr.strip()
        took, value = gpu_checksum(dst)
        took2, _ = gpu_checksum(dst)
        result["gpu_checksum_s"] = [round(took, 4), round(took2, 4)]
        harness.log(f"GPU positional checksum of {size / 1e9:.2f} GB: {took:.4f} s, then {took2:.4f} s")
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(ovl)])
    harness.record("gpu_register_strategies", result)


if __name__ == "__main__":
    main()
