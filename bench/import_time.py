#!/usr/bin/env python3
"""How long a new process takes to import what `fvboot serve` imports before its first line
(`python3 -S`, as the image runs it): the median of N processes, in ms. The modules come from
this checkout (linked as fvboot, bench/harness.py).

    python3 bench/import_time.py [N]        # default 15
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import link_fvboot  # noqa: E402


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    lib = link_fvboot(Path("/tmp/fv-bench-lib"))
    code = f"import sys; sys.path.insert(0, {str(lib)!r}); import fvboot.serve"
    took = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-S", "-c", code], check=True)
        took.append(time.perf_counter() - t)
    print(f"python3 -S -c 'import fvboot.serve': median {statistics.median(took) * 1000:.1f} ms of {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
