"""Run inside the image, as its restore runs (root, CRIU's capabilities): a parent, a forked
child and its forked grandchild whose private anonymous memory mixes the cases zeropages.py must
get right -- zeros the child wrote over the data it inherited, data over zeros, areas made after
the fork and written with zeros, zeros written before the forks and left alone in all three --
dumped by the image's CRIU, rewritten by fvboot.zeropages, restored (with CRIU_RESTORE_MAP_PAGES
as given), after which each process digests its memory again. bench/cpu_fork_cow.sh runs it with
the experimental CRIU of bench/experiments/criu-dump-cow-pages-once.patch (CRIU_DUMP_COW=1: the
pages nobody wrote since a fork stored once).

    python3 zero_pages_tree.py run WORKDIR     prints one JSON line: digests before and after, the
                                               pages left out, bytes stored per process, the
                                               tail of CRIU's restore log
(`tree` is the dumped processes' own entry point.)
"""

import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

PAGE = 4096
ROLES = ("parent", "child", "grandchild")
N = 512  # pages per area: 2 MiB, runs well over criu-patches/0003's 64 KiB


def fill(area: mmap.mmap, first: int, last: int, value) -> None:
    for i in range(first, last):
        area[i * PAGE:(i + 1) * PAGE] = bytes([value(i) if callable(value) else value]) * PAGE


def digest(areas) -> str:
    h = hashlib.sha256()
    for a in areas:
        h.update(a)
    return h.hexdigest()


def wait_for(path: str, limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise SystemExit(f"{path} did not appear within {limit_s:.0f} s")
        time.sleep(0.01)


def tree(workdir: str) -> None:
    inherited = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fill(inherited, 0, N, lambda i: i % 251 + 1)  # data on every page, before the fork
    fill(inherited, N // 2 + 20, N // 2 + 40, 0)  # zeros written before the fork, left alone
    role = "parent"
    if os.fork() == 0:
        role = "child"
        fill(inherited, 0, N // 4, 0)  # zeros over the parent's data: the DONTNEED case
        fill(inherited, N // 4, N // 4 + 5, 0xEE)
        fill(inherited, N // 2, N // 2 + 10, 0)
        if os.fork() == 0:
            role = "grandchild"
            fill(inherited, N // 4 + 2, N // 4 + 8, 0x77)  # over the child's and the parent's pages
    else:
        fill(inherited, 3 * N // 4, N, 0)  # the parent's zeros; the child keeps the data
    fresh = mmap.mmap(-1, N * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fill(fresh, 0, N, 0)
    fill(fresh, 0, N, lambda i: 0 if i % 7 else {"parent": 0x22, "child": 0x11, "grandchild": 0x44}[role])
    fill(fresh, 40, 60, 0x33)
    publish(f"{workdir}/{role}.before", digest([inherited, fresh]))
    wait_for(f"{workdir}/go", 600)
    publish(f"{workdir}/{role}.after", digest([inherited, fresh]))
    os._exit(0)


def publish(path: str, text: str) -> None:
    """Whole or not at all: the runner reads the file as soon as it exists."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def run(workdir: str) -> dict:
    from fvboot import zeropages
    from fvboot.criu import pagemap_bytes, tree_pids

    images = f"{workdir}/images"
    os.makedirs(images)
    with open(f"{workdir}/tree.out", "wb") as out:
        root = subprocess.Popen([sys.executable, __file__, "tree", workdir], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    for role in ROLES:
        wait_for(f"{workdir}/{role}.before")
    subprocess.run(["criu", "dump", "-t", str(root.pid), "-D", images, "-o", "dump.log", "-v4", "--shell-job"],
                   check=True, timeout=120)
    root.wait(10)
    try:  # the dumped child was re-parented to this process (PID 1 here): reap it, freeing its pid
        while True:
            os.waitpid(-1, 0)
    except ChildProcessError:
        pass
    dropped = zeropages.drop_zero_pages(Path(images))
    r = subprocess.run(["criu", "restore", "-D", images, "-o", "restore.log", "-v4", "--shell-job",
                        "--restore-detached"], timeout=120)
    if r.returncode != 0:
        log = open(f"{images}/restore.log", errors="replace").read().splitlines()
        raise SystemExit("criu restore failed:\n" + "\n".join(line for line in log if "Error" in line or "rror" in line)[-3000:])
    open(f"{workdir}/go", "w").close()
    for role in ROLES:
        wait_for(f"{workdir}/{role}.after")
    read = lambda name: open(f"{workdir}/{name}").read()  # noqa: E731
    log = open(f"{images}/restore.log", errors="replace").read().splitlines()
    pids = tree_pids(Path(images))  # parents first: parent, child, grandchild
    return {"before": {r: read(f"{r}.before") for r in ROLES},
            "after": {r: read(f"{r}.after") for r in ROLES},
            "left_out": {d.pid: d.pages for d in dropped},
            "stored_bytes": {r: pagemap_bytes(Path(images) / f"pagemap-{p}.img") for r, p in zip(ROLES, pids)},
            "restore_log": [line for line in log if "mapped" in line or "Error" in line or "cow:" in line][-20:]}


if __name__ == "__main__":
    if sys.argv[1] == "tree":
        tree(sys.argv[2])
    else:
        print(json.dumps(run(sys.argv[2])))
