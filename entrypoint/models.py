"""Puts the model to serve into FV_HOME/model: a synthetic one made here, a local folder given to
the bake container, or a Hugging Face repo downloaded with a token read from a file.

The token is read from a file (mounted only into the bake container) and only in this short
download step; it never enters the server's environment, so no checkpoint page holds it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

from . import synthetic
from .errors import BakeFailed

IMPORT_DIR = Path("/fv-import/model")
TOKEN_MOUNT_ROOT = "/run/fv-secrets"


def detach_build_inputs() -> list[str]:
    """Unmount what the builder bind-mounted for the download (token file, local model folder)
    before the server starts: the served tree's mount namespace must not contain them, or CRIU
    would need them again at every restore; and the token is then gone from the container."""
    gone = []
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in reversed(points):
        if mp.startswith((TOKEN_MOUNT_ROOT, str(IMPORT_DIR.parent))):
            r = subprocess.run(["umount", mp], capture_output=True, text=True)
            if r.returncode != 0:
                raise BakeFailed(f"cannot unmount {mp} before the checkpoint: {r.stderr.strip()}")
            gone.append(mp)
    return gone


def prepare_model(model: str, dest: Path, token_file: Optional[Path], model_dir: Optional[Path] = None) -> str:
    """Fill DEST, readable by every user (a container run with --user must be able to start
    vLLM normally from it); return the name clients use in requests (the model as the user wrote it).
    MODEL_DIR: where fvbuild mounted a local model folder, when not at IMPORT_DIR itself."""
    name = _fill(model, dest, token_file, model_dir or IMPORT_DIR)
    readable_by_all(dest)
    return name


def readable_by_all(root: Path) -> None:
    """Give everyone read access to ROOT's files and the way into its folders (safetensors writes
    its files 0600, a copied folder keeps its owner's modes); nothing gets write access."""
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | (0o555 if path.is_dir() else 0o444))


def _fill(model: str, dest: Path, token_file: Optional[Path], imported: Path = IMPORT_DIR) -> str:
    name = synthetic.parse_name(model)
    if (dest / "config.json").exists():
        return model
    if name is not None:
        synthetic.make_model(name, dest)
        return model
    local = Path(model)
    for candidate in (imported, local):
        if (candidate / "config.json").exists():
            shutil.copytree(candidate, dest, dirs_exist_ok=True)  # links followed: their files copied
            return model
    if local.is_absolute() or local.exists():  # a folder, not a repo id: say so, not a hub error
        raise BakeFailed(f"the model folder {model} holds no config.json that can be read here"
                         f" ({imported} is what fvbuild mounted; a link in it leads nowhere?)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BakeFailed("huggingface_hub is not installed; cannot download " + model) from None
    token = token_file.read_text().strip() if token_file and token_file.exists() else None
    try:
        snapshot_download(model, local_dir=str(dest), token=token,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as e:  # hub errors carry the reason (gated, not found, offline)
        raise BakeFailed(f"cannot download {model}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    finally:
        token = None
    return model
