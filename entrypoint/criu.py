"""Thin wrappers around the `criu` binary: the flags fvboot dumps and restores with, in one place.

The same flags are recorded in the manifest, so what restores is exactly what was dumped.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import runenv
from .capabilities import CAP_NAMES, RUN_WITH, seccomp_filtered
from .errors import FvBootError
from .rlimits import too_few_open_files

# --tcp-established: the engine's loopback connections; --network-lock skip: no iptables in
# containers, and nothing outside the tree talks to it during the dump (the gate is shut);
# --ext-unix-sk: sockets to outside peers (e.g. the log pipe's owner); --link-remap: open files
# that were deleted; --external mnt[]: every mount belongs to the container, not the tree.
# --skip-file-rwx-check (restore): the container engine, not the image, makes the container's
# root directory, and they differ in its mode: Podman's (and CRI-O's, the same storage library)
# is 0555, Docker's 0755, and CRIU refused a Docker bake's tree there ("File . has bad mode
# 040555 (expect 040755)", 2026-12-05). The files themselves are the image's (their layers are
# checked before the restore); CRIU still checks each one's type, size and identity.
COMMON_FLAGS = ("--shell-job", "--tcp-established", "--ext-unix-sk", "--external", "mnt[]")
DUMP_FLAGS = COMMON_FLAGS + ("--link-remap", "--network-lock", "skip")
RESTORE_FLAGS = COMMON_FLAGS + ("--root", "/", "--restore-detached", "--skip-file-rwx-check")


def _criu() -> list[str]:
    """The criu command; FV_CRIU_PLUGIN_DIR points CRIU at its plugins (cuda_plugin.so) when they
    are not in the compiled-in /usr/lib/criu (host mode, e.g. the GPU benchmark)."""
    plugins = os.environ.get("FV_CRIU_PLUGIN_DIR")
    return ["criu", "-L", plugins] if plugins else ["criu"]


RESTORE_TIMEOUT_ENV, DUMP_TIMEOUT_ENV = "FV_CRIU_RESTORE_TIMEOUT_S", "FV_CRIU_DUMP_TIMEOUT_S"


# CRIU's log level for a restore: 3 (errors, warnings, what it did and when, the cuda plugin's
# resume included) unless FV_CRIU_RESTORE_LOG_LEVEL says otherwise (4 adds every area and mmap:
# ~14,500 lines for the CPU image, each one write(2) of its own, ~20 ms of the restore on two
# cores, bench/fvboot_ab.py). A dump always logs everything: a bake is not timed to the ms.
RESTORE_LOG_LEVEL_ENV = "FV_CRIU_RESTORE_LOG_LEVEL"  # default 3: runenv


def restore_log_level() -> int:
    """FV_CRIU_RESTORE_LOG_LEVEL, one of CRIU's 1-4 (default 3). 0 is taken as 1: at 0 CRIU logs
    not even its errors, and the reasons fvboot gives come from them, the cuda plugin's failed
    GPU resume among them, which otherwise only the wake's bound (300 s) would find (found by
    review, 2026-12-06)."""
    return max(1, int(runenv.value(RESTORE_LOG_LEVEL_ENV)))


class CriuError(FvBootError):
    def __init__(self, action: str, log: Path, how: str, stderr: str = "", stdout: str = "") -> None:
        self.log = log
        super().__init__(f"criu {action} {how}: {last_error(log, stderr, stdout)} (full log: {log})")


# Printed by every CRIU run in containers, never the cause (vllm-cpu-and-criu.md).
_HARMLESS = ("RLIMIT_NOFILE", "Unable to create tun", "Warn")
_CAUSE_FIRST = re.compile(r"CAP_|capabilit|Permission denied|Operation not permitted", re.IGNORECASE)
_CAPABILITY_NOTE = re.compile(r"Effective capability \d+ missing")
# lines that only say a failure went on (a task exited, the restore failed), not what failed
_CONSEQUENCE = re.compile(r"Restoring FAILED|exited, status=|\d+ killed by signal|Unable to open fd=|Dumping FAILED")
# a socket put back on an address this network namespace does not have
_ADDRESS_GONE = re.compile(r"Can't bind inet socket back|Cannot assign requested address")


def _say_why_denied(line: str) -> str:
    """A line where CRIU was refused something: CRIU names a missing capability by number, or
    only says it lacks some, or was refused by the container's seccomp filter; say which, and
    what to do."""
    m = re.search(r"capability (\d+) missing", line)
    if m:
        number = int(m.group(1))
        name = CAP_NAMES[number] if number < len(CAP_NAMES) else "unknown"
        if name == "CHECKPOINT_RESTORE":
            name += " (SYS_ADMIN covers it)"
        return f"{line} (CAP_{name}: {RUN_WITH})"
    if re.search(r"capabilit", line, re.IGNORECASE):
        return f"{line} ({RUN_WITH})"
    if seccomp_filtered():  # a call refused by the filter, not by a capability
        return (f"{line} (this container runs under a seccomp filter, which refuses calls CRIU makes: {RUN_WITH};"
                " in Kubernetes, seccompProfile: Unconfined)")
    return line


def last_error(log: Path, stderr: str = "", stdout: str = "") -> str:
    """The most telling error line of a CRIU run: a missing capability or permission first,
    then CRIU's last `Error` line that says what failed (not only that a task exited or the
    restore failed), then any other failure line, from what it said to the user
    (its stdout: e.g. that it lacks the capabilities it needs, said before its log opens), its
    log and its stderr (where its earliest lines go)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    lines = stdout.splitlines() + lines + stderr.splitlines()
    lines = [re.sub(r"^\(\s*[\d.]+\)\s*", "", l).strip() for l in lines]
    lines = [l for l in lines if l and not any(h in l for h in _HARMLESS)]
    if not any("CRIU needs to have" in l for l in lines):
        # CRIU notes each capability it looks for and lacks (CHECKPOINT_RESTORE, which a
        # container never gets and SYS_ADMIN covers) at debug level, and goes on: not the cause
        # of a failure where it did not also say it lacks what it needs (found by review,
        # 2026-12-06: every failed bake dump was reported as a missing capability)
        lines = [l for l in lines if not _CAPABILITY_NOTE.search(l)]
    causes = [l for l in lines if _CAUSE_FIRST.search(l)]
    if causes:
        return _say_why_denied(causes[0])
    for pick in (lambda l: "Error" in l and not _CONSEQUENCE.search(l), lambda l: "Error" in l,
                 lambda l: "error" in l or "Can't" in l or "fail" in l):
        hits = [l for l in lines if pick(l)]
        if hits:
            if "service_fd_base" in hits[-1]:  # no room for CRIU's own descriptors under the limit
                low = too_few_open_files()
                return f"{hits[-1]} ({low})" if low else hits[-1]
            if "Unable to create a thread: -11" in hits[-1]:  # EAGAIN: a process limit fvboot could not see
                return (f"{hits[-1]} (the process limit this container runs under left no room for the checkpoint's"
                        " threads: docker run --pids-limit, or a Kubernetes pod's pids limit, which a container's"
                        " own cgroup does not show: raise or lift it)")
            if _ADDRESS_GONE.search(hits[-1]):
                return (f"{hits[-1]} (a socket of the checkpoint is bound to an address this container's"
                        " network does not have: the bake container's own)")
            return hits[-1]
    return lines[-1] if lines else "no log and no output"


KILLED_WAIT_S = 10.0  # how long a killed CRIU may take to go, and its pipes to close


def _killed(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    """Kill PROC and take what it wrote, bounded: a process CRIU started may still hold its
    pipes (a half-restored task), and one in uninterruptible sleep may not go at once."""
    proc.kill()
    try:
        return proc.communicate(timeout=KILLED_WAIT_S)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return b"", f"(its output unread: its pipes still open {KILLED_WAIT_S:g} s after the kill)".encode()


def _run(action: str, cmd: list[str], log: Path, timeout: float, **kw) -> None:
    """Run one CRIU command, bounded: past TIMEOUT it is killed (the caller cleans up what it
    left, e.g. a half-restored tree) and the error says so."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _killed(proc)
        raise CriuError(action, log, f"did not finish within {timeout:g} s and was killed",
                        err.decode(errors="replace"), out.decode(errors="replace")) from None
    except BaseException:  # docker stop meanwhile: no CRIU left behind
        _killed(proc)
        raise
    said = err.decode(errors="replace"), out.decode(errors="replace")
    if proc.returncode < 0:
        raise CriuError(action, log, f"was killed by signal {-proc.returncode}", *said)
    if proc.returncode != 0:
        raise CriuError(action, log, f"failed (exit {proc.returncode})", *said)


def version() -> str:
    try:
        out = subprocess.run(["criu", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return " ".join(l.strip() for l in out.splitlines() if l.strip())


def dump(pid: int, images: Path, log: Path, env: dict[str, str] | None = None) -> None:
    images.mkdir(parents=True, exist_ok=True)
    cmd = [*_criu(), "dump", "-t", str(pid), "-D", str(images), "-o", str(log), "-v4", *DUMP_FLAGS]
    _run("dump", cmd, log, runenv.seconds(DUMP_TIMEOUT_ENV),
         env={**os.environ, **env} if env else None)


VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
_VIRTIO_ID_BALLOON = "0x0005"
_VIRTIO_BALLOON_F_REPORTING = 5  # feature bit: free page reporting


@functools.lru_cache(maxsize=None)
def free_page_reporting(devices: Path = VIRTIO_DEVICES) -> bool:
    """(Read once: a machine's devices do not change under a running fvboot.) Is this a VM whose virtio balloon hands free memory back to the host? Such a guest
    reports its free blocks of 2 MiB and more, the very blocks huge pages are made of, and the
    first touch of one costs the host's page faults."""
    try:
        for dev in devices.iterdir():
            try:
                if (dev / "device").read_text().strip() != _VIRTIO_ID_BALLOON:
                    continue
                features = (dev / "features").read_text().strip()
            except OSError:
                continue
            if len(features) > _VIRTIO_BALLOON_F_REPORTING and features[_VIRTIO_BALLOON_F_REPORTING] == "1":
                return True
    except OSError:
        return False
    return False


def restore_thp() -> tuple[bool, str]:
    """Whether CRIU should read memory back into huge pages (criu-patches/0002), and why.
    FV_RESTORE_THP=1 / 0 decide; auto (default): yes, unless free page reporting makes the
    first restore after other work slower (measured on such VMs: 2.1-2.4 s against 0.9 s)."""
    setting = runenv.value("FV_RESTORE_THP")
    if setting == "0":
        return False, "FV_RESTORE_THP=0"
    if setting != "1" and free_page_reporting():
        return False, "virtio-balloon free page reporting (FV_RESTORE_THP=1 forces huge pages)"
    return True, "FV_RESTORE_THP=1" if setting == "1" else "auto"


def restore_map_pages(allocators: Sequence[str] = ()) -> tuple[bool, str]:
    """Whether CRIU maps private memory from the page images instead of reading it all back
    (criu-patches/0003: serving touches a few percent of it), and why. Never where the served
    processes run an allocator that reads memory it gave back as zeros (ALLOCATORS, which the
    bake found mapped: launcher.ZEROS_AFTER_PURGE): a mapped page reads as the checkpoint's.
    FV_RESTORE_MAP_PAGES=1 / 0 decide otherwise; auto (default): yes, CPU and GPU images alike
    (3B CUDA image on an H200, restores interleaved with read-back ones: median 2.84 s against
    3.42 s, faster in every round; bench/results/gpu_3b_cuda_image_h200_2026-12-03d/)."""
    if allocators:
        return False, (f"the served processes run {', '.join(sorted(set(allocators)))}, which takes memory it gave"
                       " back for zeros, where a page mapped from the checkpoint would read as the checkpoint's")
    setting = runenv.value("FV_RESTORE_MAP_PAGES")
    if setting in ("0", "1"):
        return setting == "1", f"FV_RESTORE_MAP_PAGES={setting}"
    return True, "auto"


def restore_env() -> dict[str, str]:
    """The switches our CRIU build reads (other builds ignore them): CRIU_RESTORE_THP=1 where
    restore_thp() says so (memory read back into huge pages under the "madvise" THP mode),
    CRIU_RESTORE_MAP_PAGES=1 where restore_map_pages() does, and CRIU_KDAT_CACHE_DIR, where the
    kernel facts are kept (criu-patches/0004)."""
    env = {"CRIU_RESTORE_THP": "1"} if restore_thp()[0] else {}
    if restore_map_pages()[0]:
        env["CRIU_RESTORE_MAP_PAGES"] = "1"
    env["CRIU_KDAT_CACHE_DIR"] = KDAT_CACHE_DIR  # warm_kernel_facts() filled it
    return env


KDAT_CACHE_DIR = "/dev/shm/.fvboot-criu"  # a tmpfs in every container (Docker, Kubernetes)
KDAT_WARM_WAIT_S = 2.0


def warm_kernel_facts() -> Optional[subprocess.Popen]:
    """Start `criu check --feature mnt_id`, which learns what the kernel can do (kerndat:
    netlink, vDSO, pagemap...) and keeps it in KDAT_CACHE_DIR (criu-patches/0004): the restore
    that follows loads it instead of probing again (~60 ms -> ~4 ms of every restore on the CI
    machines). Started beside fvboot's own checks; None where it cannot start (the restore then
    probes, as stock CRIU does)."""
    try:
        os.makedirs(KDAT_CACHE_DIR, mode=0o700, exist_ok=True)
        return subprocess.Popen([*_criu(), "check", "--feature", "mnt_id"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "CRIU_KDAT_CACHE_DIR": KDAT_CACHE_DIR})
    except OSError:
        return None


def wait_kernel_facts(proc: Optional[subprocess.Popen], timeout: float = KDAT_WARM_WAIT_S) -> None:
    """Let warm_kernel_facts() finish (at most TIMEOUT s, then it is killed: the restore probes
    for itself), so the restore finds its cache."""
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(KILLED_WAIT_S)
        except subprocess.TimeoutExpired:  # the restore probes for itself; the subreaper reaps it
            pass


def restore(images: Path, workdir: Path, inherit: Sequence[tuple[int, str]],
            env: dict[str, str] | None = None) -> int:
    """Restore detached; returns the host PID of the restored root. Bounded by
    FV_CRIU_RESTORE_TIMEOUT_S (default 600 s): a stuck restore (cuda-checkpoint can leave a
    process CHECKPOINTED) must end in the fallback, not a hang.

    INHERIT: (our fd, 'pipe:[inode]' recorded at dump) pairs. Logs and pidfile go to WORKDIR so
    the image directory (a read-only image layer in containers) is never written.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log, pidfile = workdir / "criu-restore.log", workdir / "restored.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [*_criu(), "restore", "-D", str(images), "-W", str(workdir), "-o", str(log),
           f"-v{restore_log_level()}", "--pidfile", str(pidfile), *RESTORE_FLAGS]
    for fd, key in inherit:
        cmd += ["--inherit-fd", f"fd[{fd}]:{key}"]
    _run("restore", cmd, log, runenv.seconds(RESTORE_TIMEOUT_ENV),
         pass_fds=[fd for fd, _ in inherit], env={**os.environ, **restore_env(), **(env or {})})
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError) as e:
        raise CriuError("restore", log, f"left no usable pidfile ({e})") from None


_TS = re.compile(r"^\((\d+\.\d+)\)")

# What CRIU's cuda plugin logs when it could not give a process its GPU state back. CRIU itself
# does not fail the restore then (a late resume hook's error is only a debug line in
# cr-restore.c): the process runs on with its CUDA state still checkpointed, and every CUDA call
# it makes blocks. Other plugin errors (a process without CUDA has no restore thread) are normal.
_GPU_RESUME_FAILURES = ("RESUME_DEVICES RESTORE failed", "RESUME_DEVICES UNLOCK failed")


@dataclass(frozen=True)
class RestoreLog:
    """What a restore's log tells, read in one pass: PHASES, the seconds into the restore (CRIU's
    own log clock) at which the CUDA plugin began resuming the GPU and at which CRIU finished (the
    timeline's CRIU / CUDA split); GPU_FAILURE, the cuda plugin's own words if it failed to
    resume a process's GPU state."""

    phases: dict[str, float] = field(default_factory=dict)
    gpu_failure: Optional[str] = None


def read_restore_log(log: Path) -> RestoreLog:
    # str.find over the whole text, not a loop over its lines: a CPU restore's log has ~14,500
    # lines at -v4 (FV_CRIU_RESTORE_LOG_LEVEL=4), and parsing each took ~15 ms of every restore
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return RestoreLog()
    phases: dict[str, float] = {}
    for key, said in (("cuda_resume_start", "cuda_plugin: resuming devices"),
                      ("restore_finished", "Restore finished successfully")):
        m = _TS.match(_line_at(text, text.find(said)))
        if m:
            phases[key] = float(m.group(1))
    hits = [i for i in (text.find(f) for f in _GPU_RESUME_FAILURES) if i >= 0]
    hits += _tid_lookups_failed(text)
    failure = _line_at(text, min(hits)).split("cuda_plugin: ", 1)[-1].strip() if hits else None
    return RestoreLog(phases, failure)


_TID_LOOKUP = "Failed to launch cuda-checkpoint to retrieve restore tid"
# the lookup's answer where the tool itself could not ask the driver (its service gone or silent,
# the driver not starting), rather than the driver saying the process has no CUDA state to resume
_TOOL_FAILED = ("fv-cuda-checkpoint:", "Error initializing CUDA", "cuda-checkpoint service")


def _tid_lookups_failed(text: str) -> list[int]:
    """Where the cuda plugin's lookup of a process's restore thread failed because the tool could
    not ask: the plugin then skips the process's resume ("No need to resume devices") and CRIU
    reports success with its GPU state still checkpointed, found only by the wake's bound
    (found by review, 2026-12-06). Every process without CUDA fails the lookup too, with the
    driver's answer: not a failure."""
    out, i = [], text.find(_TID_LOOKUP)
    while i >= 0:
        if any(t in _line_at(text, i) for t in _TOOL_FAILED):
            out.append(i)
        i = text.find(_TID_LOOKUP, i + 1)
    return out


def _line_at(text: str, i: int) -> str:
    """The whole line of TEXT holding index I; "" for I < 0 (not found)."""
    if i < 0:
        return ""
    end = text.find("\n", i)
    return text[text.rfind("\n", 0, i) + 1:end if end >= 0 else len(text)]


# --------------------------------------------------------------------------------------------
# What a checkpoint holds, per process: where its size (and a restore's page reads) come from.

# PagemapEntry.flags (criu/include/pagemap.h): the pages are in the parent image; may be restored
# lazily (CRIU sets it on private anonymous pages); are in this image
PE_PARENT, PE_LAZY, PE_PRESENT = 1 << 0, 1 << 1, 1 << 2


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def proto_fields(msg: bytes) -> list[tuple[int, int | bytes]]:
    """One protobuf message as (field number, value) pairs, repeated fields repeated: varints
    and fixed-width numbers as ints, length-delimited fields (strings, nested messages) as bytes."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(msg):
        key, i = _varint(msg, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(msg, i)
        elif wire == 2:
            n, i = _varint(msg, i)
            value, i = msg[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = int.from_bytes(msg[i:i + n], "little"), i + n
        else:  # groups: CRIU's images have none
            break
        out.append((key >> 3, value))
    return out


def encode_fields(fields: Sequence[tuple[int, int]]) -> bytes:
    """One protobuf message of varint fields, (field number, value) pairs in order: what
    zeropages.py writes (pagemap entries have no other kind of field)."""
    out = bytearray()
    for number, value in fields:
        for v in (number << 3, value):  # wire type 0
            while v >= 0x80:
                out.append((v & 0x7F) | 0x80)
                v >>= 7
            out.append(v)
    return bytes(out)


def image_magic(path: Path) -> bytes:
    """The two magics an image file starts with, to write a new version of it."""
    with open(path, "rb") as f:
        return f.read(8)


def tree_pids(images: Path) -> list[int]:
    """The pids of the checkpointed tree, parents first (pstree.img: PstreeEntry.pid)."""
    return [dict(proto_fields(e))[1] for e in image_entries(images / "pstree.img")]


def image_entries(path: Path) -> list[bytes]:
    """The protobuf messages of one CRIU image file: two magics, then length-prefixed messages."""
    data = path.read_bytes()
    i, out = 8, []
    while i + 4 <= len(data):
        size = int.from_bytes(data[i:i + 4], "little")
        out.append(data[i + 4:i + 4 + size])
        i += 4 + size
    return out


@dataclass(frozen=True)
class Pagemap:
    """One pagemap-<pid>.img: the pages-<PAGES_ID>.img its pages are in, and RUNS, the
    (vaddr, nr_pages) of each entry whose pages that file holds, in file order."""

    pages_id: int
    runs: tuple[tuple[int, int], ...]


def read_pagemap(path: Path) -> Pagemap:
    """A PagemapHead{pages_id=1}, then PagemapEntry{vaddr=1, compat_nr_pages=2, flags=4,
    nr_pages=5} (images/pagemap.proto; nr_pages supersedes the 32-bit count, and an entry
    without flags has its pages here)."""
    head, *entries = image_entries(path) or [b""]
    runs = []
    for msg in entries:
        f = dict(proto_fields(msg))
        if f.get(4, PE_PRESENT) & PE_PRESENT:
            runs.append((f.get(1, 0), f.get(5, f.get(2, 0))))
    return Pagemap(dict(proto_fields(head)).get(1, 0), tuple(runs))


def pagemap_bytes(path: Path, page_size: int = 4096) -> int:
    """Bytes of memory one pagemap-<pid>.img stores."""
    return sum(n for _, n in read_pagemap(path).runs) * page_size


def pages_by_process(images: Path) -> dict[int, int]:
    """{pid in the checkpoint: bytes of memory it stores}."""
    out = {}
    for p in images.glob("pagemap-*.img"):
        try:
            out[int(p.stem.split("-", 1)[1])] = pagemap_bytes(p)
        except (ValueError, IndexError, OSError):
            continue
    return out
