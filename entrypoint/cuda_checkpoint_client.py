"""The `cuda-checkpoint` command CRIU's cuda plugin runs: hands the call to fvboot's
cuda-checkpoint service when one is up, else runs fv-cuda-checkpoint itself.

Why: the plugin starts the tool 5-10 times per restore (help, every process's restore thread,
restore, unlock), and each start of the full tool pays Python's start-up plus cuInit (~0.3 s):
measured, over a second of a 5 s restore. The service (cuda_checkpoint_service) initialises
the driver once, before CRIU starts; clients only forward argv and print the answer. Images
run the C twin of this client (cuda_checkpoint_client.c, ~1 ms instead of ~40 ms a call);
this one is the reference and the fallback, and imports next to nothing on purpose.

Protocol (both clients):
  request  b"FVCC1 <argc>\n", then the arguments and then KEY=VALUE entries of FORWARDED_ENV,
           each NUL-terminated; the client then shuts down its writing side.
  reply    b"<exit code> <stdout bytes> <stderr bytes>\n", stdout, stderr.
"""

from __future__ import annotations

import os
import socket
import sys

SOCKET_ENV = "FV_CUDA_CHECKPOINT_SOCKET"
TIMEOUT_ENV, TIMEOUT_S = "FV_CUDA_CHECKPOINT_TIMEOUT_S", 300.0  # a silent service ends the call
FORWARDED_ENV = ("FV_CUDA_DEVICE_MAP",)  # what a restore reads from the caller's environment
MAGIC = b"FVCC1"


def encode_request(argv: list[str], env: dict[str, str]) -> bytes:
    items = list(argv) + [f"{k}={v}" for k, v in env.items()]
    return MAGIC + b" %d\n" % len(argv) + b"".join(os.fsencode(i) + b"\0" for i in items)


def decode_reply(data: bytes) -> tuple[int, str, str]:
    head, sep, body = data.partition(b"\n")
    rc, n_out, n_err = (int(x) for x in head.split())
    if not sep or n_out + n_err != len(body):
        raise ValueError(f"reply of {len(body)} bytes, header says {n_out} + {n_err}")
    return rc, body[:n_out].decode(errors="replace"), body[n_out:].decode(errors="replace")


def forward(argv: list[str], path: str) -> tuple[int, str, str] | None:
    """(exit code, stdout, stderr) from the service, or None when no service answers at PATH
    (nothing was done: the caller may run the tool itself)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV) or TIMEOUT_S)
    except ValueError:
        timeout = TIMEOUT_S
    sock.settimeout(timeout if timeout > 0 else TIMEOUT_S)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        try:
            sock.sendall(encode_request(argv, env))
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
            return decode_reply(b"".join(chunks))
        except socket.timeout:
            return 1, "", (f"fv-cuda-checkpoint: the cuda-checkpoint service at {path} failed: "
                           f"no answer within {sock.gettimeout():.0f} s\n")
        except (OSError, ValueError) as exc:
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
