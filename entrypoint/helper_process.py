"""How fvboot starts its own helper processes (the cuda-checkpoint service, the weight stager):
`python3 -m fvboot.<module>`, and, where fvboot sits in a folder of its own (the image, the
host-mode benches), without site (-S): the CUDA base's .pth hooks would cost each start ~70 ms,
and the helpers need none of them. Elsewhere (an editable install) with site, which finds fvboot.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def helper_command(module: str, args: Sequence[str], package_dir: str,
                   site_folders: bool = False) -> tuple[list[str], Optional[dict[str, str]]]:
    """(argv, environment; None: this process's) of `python3 -m fvboot.MODULE ARGS`. Without
    site, fvboot's folder leads PYTHONPATH; with SITE_FOLDERS, this process's sys.path follows it
    (`fvboot serve` put there by hand the folders site would add: a helper that needs a package
    from one, e.g. blake3, finds it), else the PYTHONPATH this process was given."""
    argv = [sys.executable, "-m", f"fvboot.{module}", *args]
    if os.path.basename(package_dir) != "fvboot":
        return argv, None
    folders = [os.path.dirname(package_dir)]
    if site_folders:
        folders += [p for p in sys.path if p and p not in folders]
    elif os.environ.get("PYTHONPATH"):
        folders.append(os.environ["PYTHONPATH"])
    return [argv[0], "-S", *argv[1:]], {**os.environ, "PYTHONPATH": os.pathsep.join(folders)}
