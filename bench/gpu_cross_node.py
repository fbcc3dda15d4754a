#!/usr/bin/env python3
"""Does a CUDA process checkpointed on one GPU come back on another GPU of the same model?

The product's promise is an image baked on one node that serves on any node with the same GPU
model and driver. Every GPU run so far baked and restored on one machine, so on one GPU: the
UUID map fvboot gives the CUDA restore where the GPUs differ (`fvboot.restore.gpu_device_map`,
`FV_CUDA_DEVICE_MAP`, read by fvboot's cuda-checkpoint) never met a GPU other than the bake's.
A vLLM checkpoint (1.9 GB at the least) cannot travel between two device machines (64 MiB each
way), so this moves a small CUDA process instead, through the same pieces: fvboot's driver
binding (no torch: its checkpoint packs into a few MiB), CRIU with its cuda plugin, fvboot's
cuda-checkpoint, fvboot's own device listing and map.

    python3 bench/gpu_cross_node.py dump OUT_DIR      on one machine: a child fills GPU memory from a
        seed and runs a PTX kernel on it; `criu dump` takes it (the plugin moves its GPU state
        out); the images, the child's digests and this GPU's facts go to OUT_DIR as xz pieces
        of 15 MiB at most (the device tool returns 8 files of 16 MiB)
    python3 bench/gpu_cross_node.py restore IN_DIR    on another machine (a fresh device call): the
        pieces unpacked, this GPU compared with the dump's (same model and driver, or it says
        why not), the map made as fvboot serve makes it, `criu restore` with it; the child then
        hashes its GPU memory and runs the kernel again: both must equal what a CPU computes
        from the seed, and the child's context must be on this machine's GPU. FV_XNODE_NO_MAP=1:
        the control, the same restore without the map (expected to fail where the GPUs differ)

FV_CRIU_DIR: a folder with `criu`, `cuda_plugin.so` and `lib/` (the device kit's, .devkit/criu).
Writes its summary to $OUT/cross_node_<step>.json; exits 0 when every check passed. Root only
(CRIU). The child runs in /root/fv-xnode on both machines: CRIU gives it back its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gpu_cuda_checkpoint as cc
from harness import BenchError, Budget, link_fvboot, record, start

WORK = Path("/root/fv-xnode")
SEED = 20261206
NBYTES = 4 << 20  # per buffer: random bytes do not compress, and the pieces must travel
PIECE = 15 << 20
DEADLINE_S = 300.0

# y[i] = x[i] * 2 + 1 on 32-bit words (checked with ptxas 12.9 for sm_90; the driver JITs it)
PTX = r"""
.version 7.0
.target sm_52
.address_size 64
.visible .entry derive(.param .u64 px, .param .u64 py, .param .u32 n)
{
    .reg .pred %p;
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [px];
    ld.param.u64 %rd2, [py];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p, %r5, %r1;
    @%p bra DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r5, 4;
    add.s64 %rd6, %rd3, %rd5;
    add.s64 %rd7, %rd4, %rd5;
    ld.global.u32 %r6, [%rd6];
    mad.lo.u32 %r7, %r6, 2, 1;
    st.global.u32 [%rd7], %r7;
DONE:
    ret;
}
"""

CHILD_SOURCE = r'''
"""Holds GPU memory filled from a seed and a loaded kernel; answers requests in its mailbox."""
import ctypes, hashlib, json, os, sys, time, traceback

box, nbytes, seed, ptx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
''' + cc.MAILBOX_POST + r'''

try:
    from fvboot.cuda_driver import Driver

    drv = Driver()
    drv.init()
    drv.use_primary_context(0)
    lib = drv.lib
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [ctypes.c_uint, ctypes.c_void_p,
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]

    def check(rc, call):
        if rc:
            name = ctypes.c_char_p()
            lib.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{call}: {(name.value or b'?').decode()}")

    data = hashlib.shake_256(f"fv-xnode-{seed}".encode()).digest(nbytes)
    host = ctypes.create_string_buffer(nbytes)
    x, y = drv.alloc(nbytes), drv.alloc(nbytes)
    stream = drv.stream()
    ctypes.memmove(host, data, nbytes)
    drv.copy_to_device(x, ctypes.addressof(host), nbytes, stream)
    drv.synchronize(stream)
    del data
    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    check(lib.cuModuleLoadData(ctypes.byref(module), open(ptx, "rb").read() + b"\0"), "cuModuleLoadData")
    check(lib.cuModuleGetFunction(ctypes.byref(fn), module, b"derive"), "cuModuleGetFunction")

    def digest():
        t0 = time.perf_counter()
        drv.memset(y, 0, nbytes)
        check(lib.cuCtxSynchronize(), "cuCtxSynchronize")  # the memset ran on the legacy stream
        px, py, n = ctypes.c_uint64(x), ctypes.c_uint64(y), ctypes.c_uint32(nbytes // 4)
        args = (ctypes.c_void_p * 3)(ctypes.cast(ctypes.byref(px), ctypes.c_void_p),
                                     ctypes.cast(ctypes.byref(py), ctypes.c_void_p),
                                     ctypes.cast(ctypes.byref(n), ctypes.c_void_p))
        check(lib.cuLaunchKernel(fn, (nbytes // 4 + 255) // 256, 1, 1, 256, 1, 1, 0, stream, args, None),
              "cuLaunchKernel")
        drv.synchronize(stream)
        out = {}
        for name, ptr in (("sha256", x), ("derived_sha256", y)):
            drv.copy_to_host(ctypes.addressof(host), ptr, nbytes)
            out[name] = hashlib.sha256(host.raw).hexdigest()
        out["gpu"] = drv.current_device_uuid()
        out["seconds"] = round(time.perf_counter() - t0, 3)
        return out

    ready = {"pid": os.getpid()}
    ready.update(digest())
    post("ready.json", ready)
except BaseException:
    post("ready.json", {"error": traceback.format_exc()})
    sys.exit(1)
''' + cc.MAILBOX_LOOP


def expected_digests() -> dict:
    """What the child's GPU must hold and compute, computed on the CPU from the seed."""
    import numpy as np

    data = hashlib.shake_256(f"fv-xnode-{SEED}".encode()).digest(NBYTES)
    derived = (np.frombuffer(data, dtype="<u4").astype(np.uint64) * 2 + 1).astype("<u4").tobytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "derived_sha256": hashlib.sha256(derived).hexdigest()}


def this_device() -> dict:
    from fvboot.manifest import device_info

    d = device_info()
    if not d.is_cuda:
        raise BenchError("no NVIDIA GPU here (NVML lists none)")
    return {"kind": d.kind, "gpus": [{"name": g.name, "uuid": g.uuid, "driver": g.driver} for g in d.gpus],
            "driver": d.driver, "cuda": d.cuda}


def criu(criu_dir: Path, wrapper: Path, budget: Budget, name: str, *args: str, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    console = WORK / f"criu-{name}.out"
    full = {**os.environ, "PATH": f"{wrapper.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "LD_LIBRARY_PATH": str(criu_dir / "lib"), **(env or {})}
    try:
        with open(console, "wb") as sink:
            rc = subprocess.run([str(criu_dir / "criu"), *args, "-L", str(criu_dir), "-v4", "-o", f"{name}.log"],
                                env=full, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                                timeout=budget.timeout(120)).returncode
    except subprocess.TimeoutExpired:
        rc = None
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 3), "output": cc._tail(console, 20)}


def setup(criu_dir: Path) -> Path:
    if os.geteuid() != 0:
        raise BenchError("criu needs root")
    if not (criu_dir / "criu").is_file() or not (criu_dir / "cuda_plugin.so").is_file():
        raise BenchError(f"FV_CRIU_DIR={criu_dir} has no criu and cuda_plugin.so (carry .devkit/criu)")
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "box").mkdir(parents=True)
    sys.path.insert(0, str(link_fvboot(WORK / "pypath")))  # fvboot from this checkout
    os.chdir(WORK)  # the child's folder: the restore on another machine has it too
    cc._WORK = WORK
    cc._become_subreaper()
    return cc.make_wrapper(WORK)


def dump(out: Path, criu_dir: Path, budget: Budget) -> dict:
    wrapper = setup(criu_dir)
    result: dict = {"device": this_device(), "seed": SEED, "nbytes": NBYTES, "expected": expected_digests()}
    (WORK / "derive.ptx").write_text(PTX)
    (WORK / "child.py").write_text(CHILD_SOURCE)
    env = {**os.environ, "PYTHONPATH": str(WORK / "pypath")}
    proc = start([sys.executable, str(WORK / "child.py"), str(WORK / "box"), str(NBYTES), str(SEED),
                  str(WORK / "derive.ptx")], env=env, stdin=subprocess.DEVNULL)
    child = cc.Child(WORK / "box", proc, proc.pid)
    try:
        result["before"] = child.wait_ready(budget)
        images = WORK / "images"
        images.mkdir()
        result["dump"] = criu(criu_dir, wrapper, budget, "dump", "dump", "-t", str(child.pid), "-D", str(images),
                              "--shell-job")
        if result["dump"]["rc"] != 0:
            result["dump"]["log_tail"] = cc._tail(images / "dump.log", 40)
            return result
        proc.wait(timeout=budget.timeout(15))
        child.proc = None
        result["images_mib"] = round(sum(f.stat().st_size for f in images.iterdir()) / 2**20, 1)
        (images / "cross-node.json").write_text(json.dumps(result))
        archive = WORK / "xnode.tar.xz"
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            tar.add(images, arcname="images")
        data = archive.read_bytes()
        result["archive_mib"] = round(len(data) / 2**20, 2)
        if len(data) > 3 * PIECE:
            raise BenchError(f"the packed checkpoint is {len(data) / 2**20:.1f} MiB: more than a device call carries")
        out.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(data), PIECE):
            (out / f"xnode.tar.xz.part{i // PIECE}").write_bytes(data[i:i + PIECE])
        result["ok"] = True
        return result
    finally:
        child.kill()


def restore(into: Path, criu_dir: Path, budget: Budget) -> dict:
    wrapper = setup(criu_dir)
    from fvboot.manifest import Device
    from fvboot.restore import gpu_device_map

    pieces = sorted(into.glob("xnode.tar.xz.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not pieces:
        raise BenchError(f"no xnode.tar.xz.part* in {into}: run `dump` first and carry its pieces")
    archive = WORK / "xnode.tar.xz"
    with open(archive, "wb") as f:
        for p in pieces:
            f.write(p.read_bytes())
    with tarfile.open(archive) as tar:
        tar.extractall(WORK, filter="fully_trusted")
    images = WORK / "images"
    dumped = json.loads((images / "cross-node.json").read_text())
    here = this_device()
    result: dict = {"dumped_on": dumped["device"], "here": here, "dumped_digests": dumped["before"]}
    baked_gpus = [(g["name"], g["driver"]) for g in dumped["device"]["gpus"]]
    if baked_gpus != [(g["name"], g["driver"]) for g in here["gpus"]][:len(baked_gpus)]:
        raise BenchError(f"this machine's GPUs {here['gpus']} are not the dump's model and driver "
                         f"{dumped['device']['gpus']}: a restore is not expected to work")
    device_map = gpu_device_map(Device.from_json(dumped["device"]), Device.from_json(here))
    result["device_map"] = device_map
    if os.environ.get("FV_XNODE_NO_MAP") == "1":  # the control: the same restore without the map
        result["map_withheld"], device_map = True, ""
    result["another_gpu"] = bool(device_map)
    pid = int(dumped["before"]["pid"])
    if Path(f"/proc/{pid}").exists():
        raise BenchError(f"pid {pid}, the dumped child's, is taken on this machine; CRIU needs it free")
    result["restore"] = criu(criu_dir, wrapper, budget, "restore", "restore", "-D", str(images), "--shell-job", "-d",
                             env={"FV_CUDA_DEVICE_MAP": device_map} if device_map else None)
    checks = {"criu_restore_ok": result["restore"]["rc"] == 0}
    if not checks["criu_restore_ok"]:
        result["restore"]["log_tail"] = cc._tail(images / "restore.log", 40)
    else:
        child = cc.Child(WORK / "box", None, pid)
        try:
            after = child.ask("digest", budget)
            result["after"] = after
            want = dumped["expected"]
            checks["memory_identical"] = after["sha256"] == want["sha256"] == dumped["before"]["sha256"]
            checks["kernel_computes_the_same"] = after["derived_sha256"] == want["derived_sha256"]
            checks["context_on_this_gpu"] = after["gpu"] == here["gpus"][0]["uuid"]
        except BenchError as e:
            result["error"] = str(e)
            checks["child_answered"] = False
        finally:
            child.kill()
    result["checks"] = checks
    result["ok"] = all(checks.values())
    return result


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("dump", "restore"):
        print(__doc__.split("\n\n")[-3], file=sys.stderr)
        return 2
    step, folder = sys.argv[1], Path(sys.argv[2]).resolve()
    criu_dir = Path(os.environ.get("FV_CRIU_DIR", ".devkit/criu")).resolve()
    budget = Budget(DEADLINE_S)
    t0 = time.perf_counter()
    try:
        result = dump(folder, criu_dir, budget) if step == "dump" else restore(folder, criu_dir, budget)
    except BenchError as e:
        result = {"ok": False, "error": str(e)}
    result["seconds_total"] = round(time.perf_counter() - t0, 2)
    record(f"cross_node_{step}", result)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
