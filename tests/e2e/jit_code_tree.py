"""Run inside the image, as its restore runs (root, CRIU's capabilities): a process with code
written at run time in read-write-execute anonymous memory (as oneDNN's JIT kernels are), in a
run far longer than criu-patches/0003 maps from the page images (64 KiB), dumped and restored
by the image's CRIU with CRIU_RESTORE_MAP_PAGES as given, then called again. Found by review,
2026-12-06: mapped, such a run lost PROT_EXEC and its first call killed the process.

    python3 jit_code_tree.py run WORKDIR    prints one JSON line: the code's answer before the
                                            dump and after the restore (None: it died), and the
                                            restore log's map-pages lines
(`tree` is the dumped process's own entry point; x86-64 only.)
"""

import ctypes
import json
import mmap
import os
import subprocess
import sys
import time

SIZE = 256 << 10
CODE = bytes([0xB8, 0x2A, 0x00, 0x00, 0x00, 0xC3])  # mov eax, 42; ret


def wait_for(path: str, limit_s: float) -> bool:
    end = time.monotonic() + limit_s
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def publish(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def tree(workdir: str) -> None:
    area = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    for i in range(0, SIZE, 4096):
        area[i:i + 4096] = bytes([0xC3]) * 4096  # `ret` on every page: each one is dumped
    area[SIZE // 2:SIZE // 2 + len(CODE)] = CODE
    code = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(area)) + SIZE // 2)
    publish(f"{workdir}/before", str(code()))
    wait_for(f"{workdir}/go", 600)
    publish(f"{workdir}/after", str(code()))
    os._exit(0)


def run(workdir: str, images: str = "") -> dict:
    images = f"{workdir}/images"
    os.makedirs(images)
    with open(f"{workdir}/tree.out", "wb") as out:
        root = subprocess.Popen([sys.executable, __file__, "tree", workdir], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    wait_for(f"{workdir}/before", 60)
    subprocess.run(["criu", "dump", "-t", str(root.pid), "-D", images, "-o", "dump.log", "-v4", "--shell-job"],
                   check=True, timeout=120)
    root.wait(10)
    r = subprocess.run(["criu", "restore", "-D", images, "-o", "restore.log", "-v4", "--shell-job",
                        "--restore-detached"], timeout=120)
    if r.returncode != 0:
        raise SystemExit("criu restore failed: " + open(f"{images}/restore.log", errors="replace").read()[-3000:])
    open(f"{workdir}/go", "w").close()
    after = open(f"{workdir}/after").read() if wait_for(f"{workdir}/after", 20) else None
    log = open(f"{images}/restore.log", errors="replace").read().splitlines()
    return {"before": open(f"{workdir}/before").read(), "after": after,
            "restore_log": [line for line in log if "map-pages" in line][-10:]}


if __name__ == "__main__":
    if sys.argv[1] == "tree":
        tree(sys.argv[2])
    else:
        print(json.dumps(run(sys.argv[2])))
