"""The bake manifest (/fv/manifest.json): what was baked, with what, on which device, and the
files with sizes and checksums, so a start can tell in milliseconds whether the checkpoint fits."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FORMAT = 1
# CRIU's page images are large and read anyway by the restore; they are size-checked only, and the
# probe after restore proves their content. Everything else is checksummed.
_SIZE_ONLY_PREFIXES = ("pages-",)


def device_info() -> dict[str, Any]:
    """'cpu', or the GPUs with name, UUID, driver and CUDA versions. NVML through ctypes: a few
    milliseconds, where nvidia-smi or importing torch would cost seconds at every start."""
    try:
        return _nvml_info()
    except OSError:
        return {"kind": "cpu"}


def _nvml_info() -> dict[str, Any]:
    import ctypes

    nvml = ctypes.CDLL("libnvidia-ml.so.1")  # OSError where there is no NVIDIA driver
    if nvml.nvmlInit_v2() != 0:
        raise OSError("nvmlInit failed")
    try:
        buf = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buf, 96) != 0:
            raise OSError("nvmlSystemGetDriverVersion failed")
        driver = buf.value.decode()
        cuda = ctypes.c_int()
        nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda))
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            raise OSError("no NVIDIA GPU visible")
        gpus = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle))
            nvml.nvmlDeviceGetName(handle, buf, 96)
            name = buf.value.decode()
            nvml.nvmlDeviceGetUUID(handle, buf, 96)
            gpus.append({"name": name, "uuid": buf.value.decode(), "driver": driver})
    finally:
        nvml.nvmlShutdown()
    return {"kind": "cuda", "gpus": gpus, "driver": driver,
            "cuda": f"{cuda.value // 1000}.{cuda.value % 1000 // 10}" if cuda.value else None}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _needs_hash(path: Path) -> bool:
    return not path.name.startswith(_SIZE_ONLY_PREFIXES) and path.suffix != ".fvw"


def describe_files(home: Path, roots: list[Path]) -> list[dict[str, Any]]:
    files = sorted(p for r in roots if r.exists() for p in r.rglob("*") if p.is_file())
    with ThreadPoolExecutor(8) as pool:
        sums = list(pool.map(lambda p: _sha256(p) if _needs_hash(p) else None, files))
    return [{"path": str(p.relative_to(home)), "size": p.stat().st_size, "sha256": s}
            for p, s in zip(files, sums)]


def verify_files(home: Path, files: list[dict[str, Any]]) -> str | None:
    """None if every file is present with its size and checksum, else the first problem."""
    for f in files:
        p = home / f["path"]
        try:
            size = p.stat().st_size
        except OSError:
            return f"{f['path']} is missing"
        if size != f["size"]:
            return f"{f['path']} has {size} bytes, expected {f['size']}"
    hashed = [f for f in files if f.get("sha256")]
    with ThreadPoolExecutor(8) as pool:
        sums = list(pool.map(lambda f: _sha256(home / f["path"]), hashed))
    for f, s in zip(hashed, sums):
        if s != f["sha256"]:
            return f"{f['path']} is corrupt (sha256 mismatch)"
    return None


def write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
