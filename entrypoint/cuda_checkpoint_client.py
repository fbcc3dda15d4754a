"""The `cuda-checkpoint` command CRIU's cuda plugin runs: hands the call to fvboot's
cuda-checkpoint service when one is up, else runs fv-cuda-checkpoint itself.

Why: the plugin starts the tool 5-10 times per restore (help, every process's restore thread,
restore, unlock), and each start of the full tool pays Python's start-up plus cuInit (~0.3 s):
measured, over a second of a 5 s restore. The service (cuda_checkpoint_service) initialises
the driver once, while CRIU is still restoring memory; this client only forwards argv and
prints the answer. It imports nothing but the standard library's basics, on purpose.
"""

from __future__ import annotations

import json
import os
import socket
import sys

SOCKET_ENV = "FV_CUDA_CHECKPOINT_SOCKET"
FORWARDED_ENV = ("FV_CUDA_DEVICE_MAP",)  # what a restore reads from the caller's environment


def forward(argv: list[str], path: str) -> tuple[int, str, str] | None:
    """(exit code, stdout, stderr) from the service, or None when no service answers at PATH
    (nothing was done: the caller may run the tool itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None
        request = {"argv": argv, "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
            reply = json.loads(b"".join(chunks))
            return int(reply["rc"]), str(reply["out"]), str(reply["err"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # The request may have reached the driver: never run it a second time.
            return 1, "", f"fv-cuda-checkpoint: the cuda-checkpoint service at {path} failed: {exc}\n"
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(SOCKET_ENV)
    answer = forward(args, path) if path else None
    if answer is None:
        from .cuda_checkpoint import main as run_here

        return run_here(args)
    rc, out, err = answer
    sys.stdout.write(out)
    sys.stdout.flush()
    sys.stderr.write(err)
    sys.stderr.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
