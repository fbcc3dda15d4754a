#!/usr/bin/env python3
"""How much of a restored server's memory does serving touch? (issue 11: restore pages lazily)

A restore reads every dumped page back before the server may answer. If serving then touches
only a small part of that memory, reading pages on first touch (a mapped page image or CRIU's
lazy pages) would take most of that time off the start. This clears the kernel's "referenced"
bits of every process in a running container (`/proc/PID/clear_refs`), sends completions, and
sums, over the private writable memory (heap and anonymous areas: what the checkpoint holds),
how much is resident and how much was read or written since. Run as root beside the container:

    docker run -d --name fv --network host $(fvbuild run-flags IMAGE) IMAGE
    python3 bench/pages_touched.py fv [--requests 3] [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request

from harness import record

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "def fibonacci(n):", "Dear Sir,"]


def container_pids(container: str) -> list[int]:
    out = subprocess.run(["docker", "top", container, "-eo", "pid"], capture_output=True, text=True,
                         check=True).stdout.split()
    return [int(p) for p in out[1:]]


def private_memory_kb(pid: int) -> tuple[int, int]:
    """(resident, referenced) kB of PID's private writable heap and anonymous areas."""
    resident = referenced = 0
    counted = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # an area's header line
                path = head[5] if len(head) > 5 else ""
                counted = "w" in head[1] and head[1].endswith("p") and path in ("", "[heap]")
            elif counted and head[0] == "Rss:":
                resident += int(head[1])
            elif counted and head[0] == "Referenced:":
                referenced += int(head[1])
    return resident, referenced


def complete(port: int, model: str, prompt: str) -> str:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://localhost:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["text"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("container")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    with urllib.request.urlopen(f"http://localhost:{args.port}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    pids = container_pids(args.container)
    for pid in pids:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("1")  # clear the referenced bits of all pages
    rounds = []
    for i in range(args.requests):
        complete(args.port, model, PROMPTS[i % len(PROMPTS)])
        sums = [private_memory_kb(pid) for pid in pids]
        resident, referenced = sum(s[0] for s in sums), sum(s[1] for s in sums)
        rounds.append({"requests": i + 1, "resident_mb": round(resident / 1e3, 1),
                       "touched_mb": round(referenced / 1e3, 1),
                       "touched_share": round(referenced / max(resident, 1), 4)})
    record("pages_touched", {"container": args.container, "model": model, "processes": len(pids), "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
