"""Run inside the image, as its bake and restore run (root, CRIU's capabilities): a process with
sockets bound as vLLM's distributed setup binds them when left alone -- a listener on the
container's own address (the host's, with --network host) with a connection to it (a TCP
store), and one on loopback -- dumped by the image's CRIU in one container, restored in another.

    python3 socket_addresses_tree.py dump WORKDIR      prints one JSON line: the container's own
                                                       address (null: it has none but loopback), what fvboot.sockets reads from the images
    python3 socket_addresses_tree.py restore WORKDIR   prints one JSON line: CRIU's exit status, what
                                                       fvboot.criu.last_error makes of its log, and
                                                       what fvboot.sockets.missing_here says here
(`tree` is the dumped process's own entry point.)
"""

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SIOCGIFADDR = 0x8915


def own_address() -> str | None:
    """This network namespace's first IPv4 address other than loopback (the host's, with
    --network host): the one the default route leaves from, else any interface's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel picks the source address
            return s.getsockname()[0]
        except OSError:
            pass
        for _, name in socket.if_nameindex():
            if name == "lo":
                continue
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            return socket.inet_ntoa(packed[20:24])
    return None


def tree(workdir: str, own: str) -> None:
    store = socket.create_server((own, 0))
    client = socket.create_connection(store.getsockname())
    accepted, _ = store.accept()
    local = socket.create_server(("127.0.0.1", 0))
    keep = [store, client, accepted, local]
    Path(workdir, "ready").write_text("ready")
    while keep:  # dumped while here (and killed by the dump)
        time.sleep(1)


def dump(workdir: str) -> dict:
    from fvboot import sockets

    own = own_address()
    if own is None:
        return {"own": None, "recorded": []}
    images = Path(workdir, "images")
    images.mkdir(parents=True)
    root = subprocess.Popen([sys.executable, __file__, "tree", workdir, own], stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not Path(workdir, "ready").exists():
        if time.monotonic() > deadline or root.poll() is not None:
            raise SystemExit("the tree did not start")
        time.sleep(0.05)
    subprocess.run(["criu", "dump", "-t", str(root.pid), "-D", str(images), "-o", "dump.log", "-v4",
                    "--shell-job", "--tcp-established", "--network-lock", "skip"], check=True, timeout=120)
    root.wait(10)
    return {"own": own, "recorded": list(sockets.bound_addresses(images))}


def restore(workdir: str) -> dict:
    from fvboot import criu, sockets

    images = Path(workdir, "images")
    recorded = list(sockets.bound_addresses(images))
    # in a PID namespace of its own, as fvboot restores (here the dumped PIDs may be taken), at
    # the log level fvboot restores at
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "criu", "restore", "-D", str(images),
                        "-o", "restore.log", f"-v{criu.restore_log_level()}", "--shell-job", "--tcp-established",
                        "--network-lock", "skip", "--restore-detached"], capture_output=True, text=True, timeout=120)
    return {"rc": r.returncode, "last_error": criu.last_error(images / "restore.log", r.stderr, r.stdout),
            "missing_here": sockets.missing_here(recorded)}


if __name__ == "__main__":
    if sys.argv[1] == "tree":
        tree(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps({"dump": dump, "restore": restore}[sys.argv[1]](sys.argv[2])))
        sys.stdout.flush()
        os._exit(0)
