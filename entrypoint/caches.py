"""vLLM's compile caches, writable for a normal start.

The bake leaves them in FV_HOME/cache (an image layer) and the image's settings name the folders
in it (VLLM_CACHE_ROOT, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, CUDA_CACHE_PATH, ...). A normal
start reuses them, and vLLM's compile takes lock files there even when everything is cached, so
they must be writable: under `docker run --read-only` fvboot lays an overlay in memory over them
(in its own mount namespace); under `docker run --user`, where it may not mount, each cache a
setting names is copied to the temporary folder and the setting moved to the copy. A cache that
is writable as it is (a volume mounted there) is left where it is.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import FvBootError
from .layout import Layout
from .output import log
from .private_mounts import writable_overlay


class CacheCopyFailed(FvBootError):
    """A cache could not be copied (a full or read-only disk, a file no copy can take)."""


def writable_caches(layout: Layout, env=os.environ) -> dict[str, str]:
    """Make the caches the settings of ENV name writable for a normal start, or say why they are
    not; returns the settings that start needs changed (those moved to a copy)."""
    cache = layout.cache_dir
    if not cache.is_dir() or os.access(cache, os.W_OK):
        return {}
    done, why = writable_overlay(str(cache), str(layout.run_dir / "cache-overlay"))
    if done:
        log(f"vLLM's caches in {cache} are read-only here (docker run --read-only?): what this start"
            f" writes there goes to memory and is gone with the container")
        return {}
    cause = (f"fvboot runs as uid {os.geteuid()}, not root: docker run --user?" if os.geteuid()
             else "docker run --read-only?")
    try:
        moved, copy = copied_settings(cache, env)
    except CacheCopyFailed as e:
        log(f"warning: vLLM's caches in {cache} cannot be written here ({cause}) and neither an overlay"
            f" ({why}) nor a copy ({e}) could make them so: vLLM's start needs to write there")
        return {}
    if moved:
        log(f"vLLM's caches in {cache} cannot be written here ({cause}): this start uses a copy of them"
            f" in {copy} ({', '.join(sorted(moved))}), gone with the container")
    return moved


def copied_settings(cache: Path, env) -> tuple[dict[str, str], str]:
    """Copy each folder below CACHE that a setting of ENV names and this process cannot write into
    a new folder of the temporary folder (TMPDIR, else /tmp); return those settings naming the
    copies, and the new folder. Raises CacheCopyFailed, having removed what it copied."""
    named = {k: Path(v) for k, v in env.items() if _below(v, cache)}
    todo = {k: p for k, p in named.items() if not (p.is_dir() and os.access(p, os.W_OK))}
    if not todo:
        return {}, ""
    # the copies of this container's earlier starts (docker restart keeps /tmp): gone first, so
    # restarts do not pile them up; a /tmp shared with other containers keeps theirs
    prefix = f"fvboot-cache-{socket.gethostname()}-"
    for earlier in Path(tempfile.gettempdir()).glob(prefix + "*"):
        shutil.rmtree(earlier, ignore_errors=True)
    try:
        dest = tempfile.mkdtemp(prefix=prefix)
    except OSError as e:
        raise CacheCopyFailed(f"{tempfile.gettempdir()}: {e.strerror or e}") from None
    moved = {}
    try:
        for name, path in sorted(todo.items()):
            target = Path(dest) / path.relative_to(cache)
            if path.is_dir():
                shutil.copytree(path, target, symlinks=True, dirs_exist_ok=True)
            else:  # not made at bake: the start makes it
                target.mkdir(parents=True, exist_ok=True)
            moved[name] = str(target)
    except shutil.Error as e:  # copytree's list of (source, destination, why), one per file it could not copy
        shutil.rmtree(dest, ignore_errors=True)
        failed = e.args[0]
        src, _, why = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise CacheCopyFailed(f"copying {src} to {dest}: {why}{more}") from None
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise CacheCopyFailed(f"copying to {dest}: {e.strerror or e}") from None
    return moved, dest


def _below(value: str, folder: Path) -> bool:
    """Whether VALUE is FOLDER or a path below it."""
    return value == str(folder) or value.startswith(str(folder).rstrip("/") + "/")
