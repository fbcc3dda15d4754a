"""The served Python's installed packages as the bake saw them. A restored server runs the code it
had imported at the bake; an image built FROM the baked one that installs, upgrades or removes a
package (`pip install` of a vLLM plugin, which vLLM loads only when it starts, or of a fixed
release) would restore without it, and nothing would say so. So the bake records what each
site folder of the served Python holds (pip's `*.dist-info`, `*.egg-info`, `*.egg-link` and `.pth`
entries: their names carry each package's version), and a start that finds them otherwise gets
the normal start, which imports the packages as they are now. One directory listing per folder:
a millisecond. Not seen: a package reinstalled at the same version, or a file edited in place."""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

ENTRY_SUFFIXES = (".dist-info", ".egg-info", ".egg-link", ".pth")
SITE_FOLDERS = ("site-packages", "dist-packages")
SHOWN = 3  # entries named per side in the reason


def site_folders(path: Optional[Sequence[str]] = None) -> list[str]:
    """The folders of PATH (default: sys.path as it is now, the bake's, which the served vLLM
    shares) where packages are installed, once each, in order."""
    seen: list[str] = []
    for p in sys.path if path is None else path:
        folder = os.path.realpath(p) if p else ""
        if os.path.basename(folder) in SITE_FOLDERS and os.path.isdir(folder) and folder not in seen:
            seen.append(folder)
    return seen


def served_site_folders() -> list[str]:
    """site_folders(), and the user's site folder wherever the served Python adds it once it
    exists (no virtual environment, `site` not told otherwise), though the bake finds none:
    `pip install --user` in an image built FROM this one makes it (found by review, 2026-12-06).
    Called in the bake's Python, which is the server's, with `site` imported."""
    import site

    folders = site_folders()
    if site.ENABLE_USER_SITE:
        user = os.path.realpath(site.getusersitepackages())
        if user not in folders:
            folders.append(user)
    return folders


def installed(folders: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each folder -> its package entries, sorted; a folder that cannot be listed holds none."""
    out = {}
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            names = []
        out[folder] = tuple(sorted(n for n in names if n.endswith(ENTRY_SUFFIXES)))
    return out


def changed(baked: Mapping[str, Sequence[str]]) -> Optional[str]:
    """None where every folder the bake listed holds the same package entries now, else what
    differs, in a sentence: the entries added and gone, a few of each."""
    now = installed(list(baked))
    for folder, entries in baked.items():
        added = sorted(set(now[folder]) - set(entries))
        gone = sorted(set(entries) - set(now[folder]))
        if added or gone:
            parts = [f"{_some(added)} {'was' if len(added) == 1 else 'were'} not there at the bake"] if added else []
            parts += [f"{_some(gone)} {'is' if len(gone) == 1 else 'are'} gone"] if gone else []
            return f"in {folder}, {' and '.join(parts)}"
    return None


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else "")
