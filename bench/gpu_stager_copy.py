#!/usr/bin/env python3
"""The product's weight stager alone on a GPU, in its two copy modes (FV_WEIGHT_STAGING_COPY=
register | ring): how soon after its start a cached dump is staged, and its check (issue 11).
No vLLM. On the GPU machine, after `source .devkit/remote.sh` and fvboot on PYTHONPATH:

    python3 bench/gpu_stager_copy.py [GB] [ROUNDS]      (default 7 GB, 2 rounds; $OUT/gpu_stager_copy.json)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from fvboot import weight_stager
from fvboot.cuda_driver import Driver
from fvboot.weights import write_weights


def main() -> int:
    gb = float(sys.argv[1]) if len(sys.argv) > 1 else 7.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    n = 294  # the 3B dump's tensor count
    each = int(gb * 1e9 / n) // 4096 * 4096
    path = os.path.join(os.environ.get("FV_BENCH_DIR", "/root"), "stager-bench.fvw")
    t = time.perf_counter()
    write_weights(path, ((f"w{i}", torch.full((each,), i % 251, dtype=torch.uint8)) for i in range(n)))
    with open(path, "rb") as f:  # all in the page cache, as for a warm restore
        while f.read(1 << 26):
            pass
    print(f"dump {os.path.getsize(path) / 1e9:.2f} GB written and cached in {time.perf_counter() - t:.1f} s", flush=True)
    drv = Driver()
    drv.init()
    gpu = drv.device_uuid(0)
    results = []
    try:
        for r in range(rounds):
            for mode in ("register", "ring"):
                os.environ[weight_stager.COPY_ENV] = mode
                t0 = time.perf_counter()
                s = weight_stager.Stager(path, gpu)
                ready = s.ready(timeout=60)
                after = time.perf_counter() - t0
                verdict = {}
                if ready is not None:
                    s.release(timeout=30)
                    verdict = s.verdict(timeout=60)
                s.stop()
                results.append({"mode": mode, "round": r, "ready_after_start_s": round(after, 3),
                                "stager_ready_t": ready and ready.get("t"), "context_s": ready and ready.get("context_s"),
                                "register_or_buffers_s": ready and ready.get("register_s"),
                                "check_s": verdict.get("seconds"), "why_not": s.why})
                print(results[-1], flush=True)
    finally:
        os.unlink(path)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_stager_copy.json"), "w") as f:
            json.dump({"gb": gb, "tensors": n, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
