#!/usr/bin/env python3
"""The start-up benchmark is `fvbuild bench` now (builder/bench.py); this keeps the commands that
the recorded results name working:

    python3 bench/startup.py --image IMG [--out FILE.json] [fvbuild bench options]
    = fvbuild bench IMG [--json FILE.json] [...]
"""

from __future__ import annotations

import sys

from fvbuild.cli import main

if __name__ == "__main__":
    args, out = sys.argv[1:], []
    while args:
        a = args.pop(0)
        if a == "--image" and args:
            out.insert(0, args.pop(0))
        elif a == "--out":
            out.append("--json")
        elif a == "--no-cold-start":
            out.append("--no-normal")
        else:
            out.append(a)
    main(["bench", *out], prog_name="bench/startup.py")
