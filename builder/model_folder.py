"""A local model folder given to the bake: what to mount so that its files read in the bake
container. A folder of the Hugging Face cache (`.../snapshots/REV/`) holds only symbolic links to
`../../blobs/`; mounted alone, every one of them dangled in the container, and the bake took the
folder's path for a repo id to download. The mount is the nearest folder that holds the model
folder and everything its links reach, so relative links resolve inside it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFolderError


@dataclass(frozen=True)
class ModelFolder:
    mount: Path  # what the bake container gets, read-only
    inside: str  # the model folder's path below it; "" where it is the mount itself

    @classmethod
    def of(cls, folder: Path) -> "ModelFolder":
        """ModelFolderError for links the bake container could not follow: an absolute one (its
        path means another file there), one that leads nowhere, or links that reach across the
        whole file system (which would be mounted)."""
        root = folder.resolve()
        reached = [root]
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                if not path.is_symlink():
                    continue
                link = os.readlink(path)
                if os.path.isabs(link):
                    raise ModelFolderError(f"{path} links to the absolute path {link}, which the bake container"
                                           f" cannot follow: give a copy with the links resolved (cp -rL {folder} DIR)")
                target = Path(os.path.realpath(path))
                if not target.exists():
                    raise ModelFolderError(f"{path} links to {target}, which does not exist")
                reached.append(target)
        mount = Path(os.path.commonpath(reached))
        if mount == Path(mount.anchor):
            raise ModelFolderError(f"the links in {folder} reach across the whole file system, which the bake"
                                   f" would have to mount: give a copy with the links resolved (cp -rL {folder} DIR)")
        if ":" in str(mount) or "," in str(mount):  # a bind's "SOURCE:TARGET:ro" splits there
            raise ModelFolderError(f"{mount} holds ':' or ',', which a Docker bind mount cannot take (docker: invalid"
                                   f" volume specification): give the model from a folder whose path has neither")
        return cls(mount, str(root.relative_to(mount)) if root != mount else "")
