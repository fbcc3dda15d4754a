#!/usr/bin/env python3
"""What a checkpoint's memory images hold, to decide what to cut (issue 11, "fewer bytes").

Every byte of `pages-*.img` is read back at each restore. This reads CRIU's own images (the
process tree, each process's VMAs and page map) and says, per process and for the largest
memory areas: how many bytes are dumped, of what kind (heap, private anonymous, private file,
shared), how many of them are all-zero pages (which need no reading at all) and how many are
byte-for-byte the same as a page of another process (which one read could serve), and per
process the GPU code it holds in its memory (CUDA cubins and fatbins the driver or a library
copied there: a candidate for what a sleeping engine's heap keeps). Each of the largest areas
comes with the longest text found at its start, its first bytes and the file mapped right
below it (hints of whose memory it is: a tokenizer's vocabulary, a library's tables or .bss),
and each process with the GPU libraries it
has mapped (a process that maps libcuda has started CUDA's driver, whose host memory the
checkpoint carries). No CRIU or crit needed:
fvboot's own reader of CRIU's images (fvboot.criu) decodes the few fields read here.

    python3 bench/checkpoint_anatomy.py DIR [--top 15]       (DIR: a criu images folder)
    python3 bench/checkpoint_anatomy.py --image IMAGE         (the baked image's /fv/checkpoint/criu)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fvboot.criu import image_entries, proto_fields, read_pagemap, tree_pids
from harness import record

PAGE = 4096
ZERO = bytes(PAGE)
SAMPLE = 256 << 10  # the bytes of each area kept for its text hints
TEXT = re.compile(rb"[\x20-\x7e]{12,}")
# VMA status bits (criu/include/image.h)
STATUS = {1 << 1: "stack", 1 << 5: "heap", 1 << 6: "file-private", 1 << 7: "file-shared",
          1 << 8: "anon-shared", 1 << 9: "anon-private", 1 << 14: "memfd", 1 << 27: "plugin"}


@dataclass
class Area:
    start: int
    end: int
    kind: str
    prot: int
    dumped: int = 0
    zero: int = 0
    shared_with_others: int = 0
    sample: bytearray = field(default_factory=bytearray)
    file: str = ""  # a file mapping's file; for an anonymous area, see `after`
    # an anonymous area's nearest file mapping right below it: a library's .bss follows its file;
    # other anonymous memory lands wherever mmap puts it, so a hint at most
    after: str = ""

    def hints(self, n: int = 5) -> list[str]:
        """The longest printable runs of the area's first dumped bytes."""
        runs = sorted(set(TEXT.findall(bytes(self.sample))), key=len, reverse=True)[:n]
        return [r[:80].decode() for r in runs]

    def row(self, process: str) -> dict:
        return {"first_bytes": bytes(self.sample[:16]).hex(), "file": self.file, "after": self.after,"process": process, "start": hex(self.start), "size_mb": round((self.end - self.start) / 1e6, 1),
                "kind": self.kind, "prot": "".join(c if self.prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4))),
                "dumped_mb": round(self.dumped / 1e6, 1), "zero_mb": round(self.zero / 1e6, 1),
                "same_as_another_process_mb": round(self.shared_with_others / 1e6, 1), "text": self.hints()}


@dataclass
class Process:
    pid: int
    comm: str
    areas: list[Area] = field(default_factory=list)
    page_hashes: list[tuple[Area, bytes]] = field(default_factory=list)
    embedded: Counter = field(default_factory=Counter)  # "cubin", "cubin_bytes", "fatbin", ...
    gpu_libraries: list[str] = field(default_factory=list)


GPU_LIBRARY = re.compile(r"/(lib(cuda|nvidia-[a-z]+|cudart|cublas(Lt)?|cudnn[a-z_]*|nccl|nvrtc|cusparse(Lt)?"
                         r"|cufft|curand|cusolver|nvJitLink|cupti|flashinfer)\b)[^/]*$")


def file_names(images: Path) -> dict[int, str]:
    """files.img's regular files by id (file_entry: id 2, reg 3; reg_file_entry: name 6)."""
    names = {}
    for entry in image_entries(images / "files.img"):
        f = dict(proto_fields(entry))
        reg = f.get(3)
        if isinstance(reg, bytes):
            name = dict(proto_fields(reg)).get(6)
            if isinstance(name, bytes):
                names[f[2]] = name.decode(errors="replace")
    return names


EM_CUDA = 190
FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian
MAX_EMBEDDED = 1 << 30


ELF64_LE = b"\x7fELF\x02\x01"


def _starts(data: bytes, magic: bytes, header: int):
    """Every offset in DATA where MAGIC starts with HEADER bytes of header after it in DATA."""
    pos = data.find(magic)
    while pos >= 0:
        if pos + header <= len(data):
            yield pos
        pos = data.find(magic, pos + 4)


def embedded_images(data: bytes) -> Counter:
    """The ELF images (CUDA cubins apart) and CUDA fatbins that start anywhere in DATA, counted
    with the sizes their headers claim (an image may run past DATA's end; a header that claims
    nothing sensible is not counted)."""
    found: Counter = Counter()
    for pos in _starts(data, ELF64_LE, 64):
        machine, = struct.unpack_from("<H", data, pos + 0x12)
        phoff, shoff = struct.unpack_from("<QQ", data, pos + 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, pos + 0x36)
        size = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
        if 64 <= size < MAX_EMBEDDED:
            kind = "cubin" if machine == EM_CUDA else "other_elf"
            found[kind] += 1
            found[kind + "_bytes"] += size
    for pos in _starts(data, FATBIN_MAGIC, 16):
        version, header, fat = struct.unpack_from("<HHQ", data, pos + 4)
        if version == 1 and header == 16 and 0 < fat < MAX_EMBEDDED:
            found["fatbin"] += 1
            found["fatbin_bytes"] += header + fat
    return found


def read_process(images: Path, pid: int, files: dict[int, str]) -> Process:
    comm = "?"
    core = images / f"core-{pid}.img"
    if core.exists():
        for number, value in proto_fields(image_entries(core)[0]):
            if number == 3:  # task_core_entry
                comm = next((v.decode(errors="replace") for n, v in proto_fields(value) if n == 6), "?")
    proc = Process(pid, comm)
    mm = image_entries(images / f"mm-{pid}.img")[0]
    for number, value in proto_fields(mm):
        if number == 14:  # vma_entry: start 1, end 2, shmid 4 (a file mapping's file), prot 5, status 7
            f = dict(proto_fields(value))
            kind = next((name for bit, name in STATUS.items() if f[7] & bit), "other")
            name = files.get(f.get(4, -1), "") if kind.startswith("file") else ""
            proc.areas.append(Area(f[1], f[2], kind, f[5], file=name))
            lib = GPU_LIBRARY.search(name)
            if lib and lib.group(0)[1:] not in proc.gpu_libraries:
                proc.gpu_libraries.append(lib.group(0)[1:])
    proc.areas.sort(key=lambda a: a.start)
    for before, area in zip(proc.areas, proc.areas[1:]):
        if not area.file and before.end == area.start:
            area.after = before.file or before.after
    pagemap = read_pagemap(images / f"pagemap-{pid}.img")
    with open(images / f"pages-{pagemap.pages_id}.img", "rb") as pages:
        for vaddr, count in pagemap.runs:
            area = next((a for a in proc.areas if a.start <= vaddr < a.end), None)
            data = pages.read(count * PAGE)
            proc.embedded.update(embedded_images(data))
            for k in range(count):
                page = data[k * PAGE:(k + 1) * PAGE]
                target = area if area and vaddr + k * PAGE < area.end else \
                    next((a for a in proc.areas if a.start <= vaddr + k * PAGE < a.end), None)
                if target is None:
                    continue
                target.dumped += PAGE
                if len(target.sample) < SAMPLE:
                    target.sample += page
                if page == ZERO:
                    target.zero += PAGE
                else:
                    proc.page_hashes.append((target, hashlib.blake2b(page, digest_size=12).digest()))
    return proc


def shared_memory(images: Path) -> list[dict]:
    """Shared memory's pages (anonymous shared mappings, memfd, /dev/shm files a process had
    mapped): CRIU stores them once per segment, in a pagemap-shmem-<id>.img of its own, not in
    any process's pagemap; a restore reads them as it reads the processes' pages."""
    out = []
    for path in sorted(images.glob("pagemap-shmem-*.img")):
        pagemap = read_pagemap(path)
        dumped = zero = 0
        with open(images / f"pages-{pagemap.pages_id}.img", "rb") as pages:
            for _, count in pagemap.runs:
                data = pages.read(count * PAGE)
                dumped += len(data)
                zero += sum(data[k:k + PAGE] == ZERO for k in range(0, len(data), PAGE)) * PAGE
        out.append({"segment": path.stem.rsplit("-", 1)[1], "dumped": dumped, "zero": zero})
    return out


def anatomy(images: Path, top: int) -> dict:
    # a zombie has no memory images (CRIU keeps only its exit state)
    files = file_names(images)
    procs = [read_process(images, pid, files) for pid in tree_pids(images) if (images / f"mm-{pid}.img").exists()]
    procs = [p for p in procs if sum(a.dumped for a in p.areas)]
    owners: dict[bytes, set[int]] = {}
    for p in procs:
        for _, h in p.page_hashes:
            owners.setdefault(h, set()).add(p.pid)
    distinct = len(owners)
    for p in procs:
        for area, h in p.page_hashes:
            if len(owners[h]) > 1:
                area.shared_with_others += PAGE
    shm = shared_memory(images)
    total = sum(a.dumped for p in procs for a in p.areas) + sum(s["dumped"] for s in shm)
    zero = sum(a.zero for p in procs for a in p.areas) + sum(s["zero"] for s in shm)
    by_kind: Counter = Counter()
    zero_by_kind: Counter = Counter()
    for p in procs:
        for a in p.areas:
            by_kind[a.kind] += a.dumped
            zero_by_kind[a.kind] += a.zero
    areas = sorted(((p, a) for p in procs for a in p.areas), key=lambda pa: -pa[1].dumped)
    return {
        "images": str(images),
        "dumped_gb": round(total / 1e9, 3),
        "zero_pages_gb": round(zero / 1e9, 3),
        "distinct_nonzero_pages_gb": round(distinct * PAGE / 1e9, 3),
        "by_kind_gb": {k: round(v / 1e9, 3) for k, v in by_kind.most_common()},
        "zero_by_kind_gb": {k: round(zero_by_kind[k] / 1e9, 3) for k, _ in by_kind.most_common()},
        "processes": [{"pid": p.pid, "comm": p.comm, "dumped_gb": round(sum(a.dumped for a in p.areas) / 1e9, 3),
                       "zero_gb": round(sum(a.zero for a in p.areas) / 1e9, 3),
                       "same_as_another_process_gb": round(sum(a.shared_with_others for a in p.areas) / 1e9, 3),
                       "gpu_code": {k: (round(v / 1e6, 1) if k.endswith("_bytes") else v)
                                    for k, v in sorted(p.embedded.items())},
                       "gpu_libraries": sorted(p.gpu_libraries)}
                      for p in procs],
        "shared_memory": [{"segment": s["segment"], "dumped_gb": round(s["dumped"] / 1e9, 3),
                           "zero_gb": round(s["zero"] / 1e9, 3)} for s in shm],
        "largest_areas": [a.row(f"{p.pid} {p.comm}") for p, a in areas[:top]],
    }


def copy_out_of(image: str, into: Path) -> Path:
    """The baked image's CRIU images, copied out through a container that is never started."""
    cid = subprocess.run(["docker", "create", "--entrypoint", "true", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["docker", "cp", f"{cid}:/fv/checkpoint/criu", str(into)], check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    return into


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="?", type=Path, help="a folder of CRIU images")
    ap.add_argument("--image", help="a baked image: read its /fv/checkpoint/criu")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if bool(args.images) == bool(args.image):
        ap.error("give a folder of CRIU images or --image IMAGE")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        folder = copy_out_of(args.image, Path(tmp) / "criu") if args.image else args.images
        result = anatomy(folder, args.top)
    if args.image:
        result["image"] = args.image
    record("checkpoint_anatomy", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
