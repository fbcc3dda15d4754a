"""`fvbuild criu`: build the images' criu stage once and hand its results out as one tarball, so
that a site without network (or without a compiler) can build images with `--criu-prebuilt FILE`.

The tarball unpacks into /usr/local: `sbin/criu` is a wrapper that gives the real binary
(`libexec/fast-vllm/criu`) its libraries (`lib/fast-vllm/`) for that process only, so they can
never shadow the base image's own; `lib/criu/cuda_plugin.so`, `bin/cuda-checkpoint`, `bin/vmtouch`;
and `share/fast-vllm/criu-prebuilt.json`, the manifest that says what it was built from.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import CriuPrebuiltError

MANIFEST_PATH = "share/fast-vllm/criu-prebuilt.json"
FORMAT = "fast-vllm-criu/1"
EXPORT_TARGET = "criu-export"
LIB_DIR = "lib/fast-vllm"
REAL_CRIU = "libexec/fast-vllm/criu"

# Started as /usr/local/sbin/criu. The caller's LD_LIBRARY_PATH is kept for the tools CRIU runs
# (fv-cuda-checkpoint restores it), so the driver's libraries stay reachable and ours stay private.
WRAPPER = """#!/bin/sh
# fast-vllm: CRIU from `fvbuild criu`, with its own libraries for this process only.
FV_CRIU_SAVED_LD_LIBRARY_PATH=${LD_LIBRARY_PATH-}
FV_CRIU_WRAPPED=1
export FV_CRIU_SAVED_LD_LIBRARY_PATH FV_CRIU_WRAPPED
LD_LIBRARY_PATH=/usr/local/lib/fast-vllm${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec /usr/local/libexec/fast-vllm/criu "$@"
"""

# Where each file of the export stage's /out goes in the tarball (paths under /usr/local).
_PLACES = {
    "criu": REAL_CRIU,
    "cuda_plugin.so": "lib/criu/cuda_plugin.so",
    "cuda-checkpoint": "bin/cuda-checkpoint",
    "vmtouch": "bin/vmtouch",
}


def read_manifest(path: Path) -> dict:
    """The manifest of a `fvbuild criu` tarball; CriuPrebuiltError if PATH is not one."""
    try:
        with tarfile.open(path, "r:gz") as tf:
            try:
                f = tf.extractfile(MANIFEST_PATH)
            except KeyError:
                f = None
            if f is None:
                raise CriuPrebuiltError(f"{path} has no {MANIFEST_PATH}: not a tarball from `fvbuild criu`")
            manifest = json.loads(f.read())
            names = set(tf.getnames())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CriuPrebuiltError(f"{path} is not a gzip tarball from `fvbuild criu` ({e})") from None
    except json.JSONDecodeError:
        raise CriuPrebuiltError(f"{path}: {MANIFEST_PATH} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CriuPrebuiltError(f"{path}: manifest format is not {FORMAT}; remake it with this fvbuild's `fvbuild criu`")
    missing = [p for p in ("sbin/criu", REAL_CRIU, "bin/vmtouch") if p not in names]
    if manifest.get("device") == "cuda":
        missing += [p for p in ("lib/criu/cuda_plugin.so", "bin/cuda-checkpoint") if p not in names]
    if missing:
        raise CriuPrebuiltError(f"{path} lacks {', '.join(missing)}; remake it with `fvbuild criu`")
    return manifest


def pack(out_archive: bytes, dest: Path, fields: dict) -> dict:
    """Turn the tar of the export stage's /out (as Docker's archive API returns it) into the
    tarball layout above; returns the manifest written into it."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(out_archive)) as tf:
        for m in tf.getmembers():
            if m.isfile():
                f = tf.extractfile(m)
                files[m.name.split("/", 1)[1] if "/" in m.name else m.name] = f.read() if f else b""
    for need in ("criu", "vmtouch", "criu-version.txt", "glibc-version.txt"):
        if need not in files:
            raise CriuPrebuiltError(f"the criu-export stage wrote no /out/{need}")
    version = next((line.split(":", 1)[1].strip() for line in files["criu-version.txt"].decode().splitlines()
                    if line.startswith("Version:")), "")
    libs = sorted(n.split("/", 1)[1] for n in files if n.startswith("lib/"))
    manifest = {
        "format": FORMAT,
        **fields,
        "criu": {**fields.get("criu", {}), "version": version,
                 "version_output": files["criu-version.txt"].decode().strip()},
        "glibc": files["glibc-version.txt"].decode().strip(),
        # the newest glibc symbol version any file needs: the base must have at least this glibc
        "glibc_needed": files.get("glibc-needed.txt", b"").decode().strip(),
        "fvbuild": __version__,
        "libs": libs,
    }
    entries: list[tuple[str, bytes, int]] = [("sbin/criu", WRAPPER.encode(), 0o755)]
    for name, place in _PLACES.items():
        if name in files:
            entries.append((place, files[name], 0o755))
    entries += [(f"{LIB_DIR}/{lib}", files[f"lib/{lib}"], 0o644) for lib in libs]
    entries.append((MANIFEST_PATH, (json.dumps(manifest, indent=2) + "\n").encode(), 0o644))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        try:
            with tarfile.open(fileobj=tmp, mode="w:gz") as tf:
                for name, data, mode in sorted(entries):
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mode, ti.mtime = len(data), mode, 0
                    tf.addfile(ti, io.BytesIO(data))
        except BaseException:  # a full disk, an interrupt: no hidden half tarball stays beside DEST
            Path(tmp.name).unlink(missing_ok=True)
            raise
    os.chmod(tmp.name, 0o644)
    Path(tmp.name).replace(dest)  # a half-written tarball never carries the final name
    return manifest


def export(opts, dest: Path, on_line: Callable[[str], None]) -> dict:
    """Build the criu stage for OPTS (CriuOptions), write its tarball to DEST; return the manifest.
    Every image and container made on the way is removed again, whatever happens."""
    from .buildcontext import assemble
    from .engine import DockerEngine

    engine = DockerEngine.connect()
    engine.ensure_image(opts.resolved_base_image)
    image_id = None
    with tempfile.TemporaryDirectory(prefix="fvbuild-criu-") as tmp:
        bc = assemble(opts, Path(tmp) / "ctx")
        try:
            for ev in engine.build(bc.path, network_mode=opts.network, target=EXPORT_TARGET,
                                   base_image=opts.resolved_base_image):
                if hasattr(ev, "image_id"):
                    image_id = ev.image_id
                else:
                    on_line(ev.text)
            archive = engine.read_tree(image_id, "/out")
            return pack(archive, dest, {
                "device": opts.device.value,
                "base_image": opts.resolved_base_image,
                "criu": {"source": bc.ctx.criu.describe, "repo": bc.ctx.criu.repo, "ref": bc.ctx.criu.ref},
                "patches": list(bc.ctx.patches),
                "cuda_checkpoint": bc.ctx.cuda_checkpoint,
            })
        finally:
            if image_id is not None:
                engine.remove_image(image_id)
