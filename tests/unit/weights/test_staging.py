"""The weight stager (fvboot.weight_stager: the dump onto the GPU while CRIU restores) and the
worker's side of it (fvboot.weights.staged). Here: its setting, when a restore starts one, its
check of the cached dump, the real stager process on a machine without a CUDA driver (it says
so, and the restore goes on without it), and the restore's side of its protocol against
stand-in processes, which play only the part that needs a GPU. The whole path, real stager and
real CUDA IPC, runs where a CUDA GPU is (GPU CI runs this file; bench/gpu_weight_staging.py
measured it on an H200)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fvboot import stager_copy, weight_stager
from fvboot.errors import CheckpointUnusable
from fvboot.residency import FileMapping
from weights_testdata import MIB, flip_bit, fvw, torch  # noqa: F401 - fvw is a fixture

from fvboot import weights as wf  # noqa: E402


def test_staging_is_on_where_it_can_be_and_a_bad_value_is_refused(monkeypatch, tmp_path, capsys):
    """auto (the default) stages an image of one GPU and one weight file; off never stages; a bad
    value is refused with the values it takes."""
    monkeypatch.setattr(weight_stager, "Stager", lambda path, gpu, reserve, resume_mark, pool_file: (
        "stager", path, gpu, reserve, resume_mark))
    (tmp_path / "rank0.fvw").write_bytes(b"x" * 1000)
    monkeypatch.delenv(weight_stager.STAGING_ENV, raising=False)
    monkeypatch.delenv(weight_stager.YIELD_ENV, raising=False)
    assert weight_stager.staging_mode() == "auto"
    # it leaves free what the CUDA resume takes back, the worker's own weights and the headroom
    run = tmp_path / "run"
    mark = run / "cuda-resume.running"
    assert weight_stager.start(tmp_path, ["GPU-1"], resume_bytes=5000, run_dir=run) == (
        "stager", str(tmp_path / "rank0.fvw"), "GPU-1", 1000 + 5000 + weight_stager.HEADROOM, None)
    # FV_WEIGHT_STAGING_YIELD=resume: the stager is told the service's mark
    monkeypatch.setenv(weight_stager.YIELD_ENV, "resume")
    assert weight_stager.start(tmp_path, ["GPU-1"], run_dir=run)[-1] == str(mark)
    monkeypatch.setenv(weight_stager.YIELD_ENV, "always")
    with pytest.raises(CheckpointUnusable, match="FV_WEIGHT_STAGING_YIELD='always': expected off or resume"):
        weight_stager.start(tmp_path, ["GPU-1"], run_dir=run)
    monkeypatch.delenv(weight_stager.YIELD_ENV)
    monkeypatch.setenv(weight_stager.STAGING_ENV, " Off ")
    assert weight_stager.start(tmp_path, ["GPU-1"]) is None
    monkeypatch.setenv(weight_stager.STAGING_ENV, "later")
    with pytest.raises(CheckpointUnusable, match="FV_WEIGHT_STAGING='later': expected auto, on or off"):
        weight_stager.start(tmp_path, ["GPU-1"])
    monkeypatch.setenv(weight_stager.STAGING_ENV, "on")
    monkeypatch.setenv(weight_stager.COPY_ENV, "dma")
    with pytest.raises(CheckpointUnusable, match="FV_WEIGHT_STAGING_COPY='dma': expected register or ring"):
        weight_stager.start(tmp_path, ["GPU-1"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_staging_takes_one_gpu_and_one_weight_file(monkeypatch, tmp_path, capsys, mode):
    """Tensor- or pipeline-parallel images (a file per worker) are not staged; the log says so
    when staging was asked for (on), and keeps quiet by default (auto)."""
    monkeypatch.setenv(weight_stager.STAGING_ENV, mode)
    (tmp_path / "rank0.fvw").write_bytes(b"x")
    (tmp_path / "rank1.fvw").write_bytes(b"x")
    assert weight_stager.start(tmp_path, ["GPU-1", "GPU-2"]) is None
    said = "weights not staged: 2 GPUs and 2 weight files (staging takes one of each)" in capsys.readouterr().err
    assert said == (mode == "on")


def test_the_stagers_check_leaves_most_cpus_and_priority_to_the_restore(monkeypatch):
    """Its check ran on every CPU of a 16-core host beside CRIU and the CUDA resume: now a
    quarter of them (2 to 8), each thread at a lower priority (a per-thread nice value)."""
    assert [weight_stager.check_threads(n) for n in (1, 4, 16, 64, 128)] == [2, 2, 4, 8, 8]
    seen = []
    import threading

    def check():
        weight_stager._yield_cpu()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=check)
    t.start()
    t.join()
    assert seen == [os.getpriority(os.PRIO_PROCESS, 0) + weight_stager.CHECK_NICE] or seen == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != seen[0]  # this thread's is unchanged


def test_a_stager_leaves_the_restore_the_gpu_memory_it_needs():
    """On a GPU whose free memory cannot hold the copy beside what the restore takes (a model
    over ~45% of its GPU), staging would make the CUDA resume or the worker's allocation fail
    and the whole restore fall back: the stager declines instead, saying the sizes."""
    gb = 10**9
    assert weight_stager.room_to_stage(free=40 * gb, size=16 * gb, reserve=20 * gb) is None
    assert weight_stager.room_to_stage(free=30 * gb, size=16 * gb, reserve=20 * gb) == (
        "30.0 GB of GPU memory free; a copy of the dump takes 16.0 GB and the restore needs 20.0 GB beside it")
    assert weight_stager.room_to_stage(30 * gb, 16 * gb, 20 * gb, "the engine's sleeping memory") == (
        "30.0 GB of GPU memory free; the engine's sleeping memory takes 16.0 GB and the restore needs 20.0 GB"
        " beside it")


def test_the_manifest_says_what_a_helper_must_make_for_the_restore_to_adopt():
    from fvboot import manifest

    pool = [["weights", 0x7F0000000000, 2 << 20], ["kv_cache", 0x7F1000000000, 4 << 30]]
    base = {"format": 1, "model": {"served_name": "m"}, "vllm": {"args": [], "command": ["vllm"], "port": 8000},
            "device": {"kind": "cuda"}, "pipes": {"stdout": "pipe:[1]", "stderr": "pipe:[2]"}, "files": [], "probe": []}
    m = manifest.Manifest.from_json({**base, "trim": [{"sleep_pool": pool}]})
    assert m.sleep_pool() == [tuple(a) for a in pool]
    for trim in ([{"sleep_pool": pool}, {"sleep_pool": pool}], [{}], None, [{"sleep_pool": [["weights", -1, 5]]}],
                 [{"sleep_pool": [["weights", 1, 0]]}], [{"sleep_pool": "all"}]):
        assert manifest.Manifest.from_json({**base, "trim": trim}).sleep_pool() == [], trim
    # and where the dump's entries go in it (the stager may put them there)
    at = {"model.embed_tokens.weight": 0x7F0000000000, "pool@0x7f0000100000": 0x7F0000100000}
    assert manifest.Manifest.from_json({**base, "trim": [{"sleep_pool": pool, "weights_at": at}]}).weights_at() == at
    for trim in ([{"weights_at": at}, {"weights_at": at}], [{}], None, [{"weights_at": {}}],
                 [{"weights_at": {"w": -1}}], [{"weights_at": [["w", 1]]}], [{"weights_at": {"w": "0x10"}}]):
        assert manifest.Manifest.from_json({**base, "trim": trim}).weights_at() is None, trim


def test_the_manifest_says_what_gpu_memory_the_resume_takes_back():
    from fvboot.manifest import Manifest

    m = Manifest.__new__(Manifest)
    for trim, want in (([{"gpu_used_bytes": 1758265344, "rss_after": 1}], 1758265344),
                       ([{"gpu_used_bytes": 5}, {"gpu_used_bytes": 9}], 9),  # the most of any worker
                       ({"gpu_used_bytes": 7}, 7), (None, 0), ([{"rss_after": 1}], 0),
                       ([{"gpu_used_bytes": "lots"}], 0), ([{"gpu_used_bytes": True}], 0)):
        object.__setattr__(m, "trim", trim)
        assert m.gpu_bytes_at_checkpoint() == want, trim


def test_the_stager_in_an_image_starts_without_site_but_finds_what_fvboot_finds(tmp_path):
    """In the image fvboot sits in a folder of its own and `fvboot serve` runs with -S, its
    site folders put on sys.path by hand: the stager starts with -S too (no .pth hooks) and gets
    that path, where blake3 lives. Run for real: the checksums it would use are importable."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fvboot").symlink_to(os.path.dirname(os.path.abspath(weight_stager.__file__)))
    argv, env = weight_stager.stager_command("w.fvw", "GPU-1", str(lib / "fvboot"))
    assert argv[1:] == ["-S", "-m", "fvboot.weight_stager", "w.fvw", "GPU-1", "0"]
    folders = env["PYTHONPATH"].split(os.pathsep)
    assert folders[0] == str(lib) and all(p in folders for p in sys.path if p)
    import subprocess

    r = subprocess.run([argv[0], "-S", "-c", "import fvboot.weight_stager; from fvboot import checksums; "
                        "print(checksums.DEFAULT_CHECKSUM)"], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == wf.fileformat.DEFAULT_CHECKSUM, r.stderr
    argv, env = weight_stager.stager_command("w.fvw", "GPU-1", "/src/entrypoint")  # an editable install
    assert "-S" not in argv and env is None


def _check_mapped(path):
    idx = wf.read_index(path)
    fd = os.open(path, os.O_RDONLY)
    m = FileMapping(fd, os.fstat(fd).st_size)
    try:
        return weight_stager.check_entries(m.addr, list(idx.entries.values()), idx.checksum, str(path), 3)
    finally:
        m.close()
        os.close(fd)


def test_the_stagers_check_passes_the_dump_and_names_a_flipped_bit(fvw):
    """Its verdict is the weights' check when the worker takes its copy: one flipped bit in any
    entry is named, as the worker's own check names it."""
    path, _ = fvw
    assert _check_mapped(path) is None
    idx = wf.read_index(path)
    for key, off in (("small3", idx.entries["small3"].offset),
                     ("huge", idx.entries["huge"].offset + idx.entries["huge"].nbytes - 1)):
        flip_bit(path, off)
        problem = _check_mapped(path)
        assert problem and f"{key} ({idx.entries[key].nbytes} bytes" in problem and "checksum mismatch" in problem
        flip_bit(path, off)


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"),
                    reason="needs a machine without a CUDA driver: this one has /dev/nvidiactl")
def test_the_real_stager_without_a_cuda_driver_says_why_and_the_restore_goes_on(fvw):
    """The stager process itself (python -m fvboot.weight_stager) on this machine: it reads and
    maps the dump, finds no driver, says so and ends; the restore's side reports the reason at
    once (the worker then loads the weights itself)."""
    path, _ = fvw
    path.read_bytes()  # cached now: a machine whose page cache is full may have dropped some (seen in CI)
    t0 = time.monotonic()
    s = weight_stager.Stager(str(path), "GPU-00000000-0000-0000-0000-000000000000")
    try:
        assert s.ready(timeout=30) is None
        assert s.why.startswith("the weight stager could not stage the dump: no CUDA driver here"), s.why
        assert s.residency(timeout=5) is True  # what its mincore found, said before anything else
    finally:
        s.stop()
    assert s.proc.poll() is not None and time.monotonic() - t0 < 30  # gone, and quickly


def _stand_in(*events, then="") -> list[str]:
    """A process that plays the stager's GPU part: says EVENTS, waits for "release", then THEN."""
    script = ("import json, sys\n"
              f"for e in {list(events)!r}: print(json.dumps(e), flush=True)\n"
              "line = sys.stdin.readline()\n"
              f"for e in {then!r} and [{{'event': 'freed'}}, {{'event': 'verified', **{then}}}] or []:\n"
              "    print(json.dumps(e), flush=True)\n")
    return [sys.executable, "-c", script]


READY = {"event": "ready", "handle": "00" * 64, "size": 4096, "gpu": "GPU-1", "t": 0.5}


def test_a_stager_that_staged_is_released_and_its_verdict_waited_for():
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_stand_in(READY, then={"ok": True, "seconds": 0.2}))
    try:
        assert s.ready(timeout=10) == READY
        s.release(timeout=10)
        assert s.verdict(timeout=10)["seconds"] == 0.2
    finally:
        s.stop()


def test_a_release_not_waited_for_returns_at_once_and_the_stager_still_frees_its_buffer():
    """With the KV cache awake already, the restore tells the stager to free its buffer and
    goes on; the stager, slow to free, still gets the word and frees it."""
    slow = _stand_in(READY, then={"ok": True})
    slow[-1] = slow[-1].replace("line = sys.stdin.readline()\n", "line = sys.stdin.readline()\nimport time; time.sleep(2)\n")
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=slow)
    try:
        s.ready(timeout=10)
        t0 = time.monotonic()
        s.release(wait=False)
        assert time.monotonic() - t0 < 1
        assert s._wait(("freed",), 20) == {"event": "freed"}
    finally:
        s.stop()


def test_a_mismatch_in_the_stagers_check_keeps_the_gate_shut():
    why = "w.fvw: lm_head (8 bytes at offset 4096): checksum mismatch, blake3 aa != recorded bb"
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_stand_in(READY, then={"ok": False, "why": why}))
    try:
        s.ready(timeout=10)
        s.release(timeout=10)
        with pytest.raises(CheckpointUnusable, match=r"^weights: w.fvw: lm_head .* checksum mismatch"):
            s.verdict(timeout=10)
    finally:
        s.stop()


def test_its_events_reach_every_thread_that_waits_for_them():
    """The restore waits for "ready" while the prefetch's readers wait for "residency": each
    gets its event, in whatever order they wait."""
    import threading

    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_stand_in({"event": "residency", "missing": 0, "pages": 1},
                                                              READY, then={"ok": True}))
    got = {}
    waiters = [threading.Thread(target=lambda: got.update(residency=s.residency(timeout=20))) for _ in range(3)]
    for w in waiters:
        w.start()
    got["ready"] = s.ready(timeout=20)
    for w in waiters:
        w.join()
    s.release(timeout=20)
    assert got == {"residency": True, "ready": READY}
    assert weight_stager.StagerResidency(s).resident() is True
    s.stop()


def test_a_silent_stager_is_waited_for_only_so_long_and_then_killed():
    """Not ready in time: the restore goes on without it; a release it does not answer ends in
    SIGKILL and a reaped process, within the bounds (its GPU memory is free once it is gone)."""
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    assert s.ready(timeout=0.3) is None and "not ready within 0.3 s" in s.why
    s.release(timeout=0.3)
    assert s.proc.poll() is not None and time.monotonic() - t0 < 10
    with pytest.raises(CheckpointUnusable, match="gave no verdict on the weights within 0.1 s"):
        s.verdict(timeout=0.1)


def test_a_stager_that_ends_without_a_word_is_not_waited_for():
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=[sys.executable, "-c", "raise SystemExit(3)"])
    t0 = time.monotonic()
    assert s.ready(timeout=30) is None and "ended without a word" in s.why
    assert time.monotonic() - t0 < 20
    s.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("copy", ["register", "ring"])
def test_gpu_the_worker_takes_the_real_stagers_copy(fvw, monkeypatch, copy):
    """The whole path on a GPU: the real stager stages the cached dump (page-locking the page
    cache, or through its own buffers: FV_WEIGHT_STAGING_COPY), the worker's side opens its IPC
    handle and copies every tensor; the bytes are the dump's, and the stager's check passes. A
    second run with one flipped bit: the copy still happens, the verdict refuses it."""
    monkeypatch.setenv(weight_stager.COPY_ENV, copy)
    from fvboot.cuda_driver import Driver
    from fvboot.weights.staged import load_staged

    path, src = fvw
    drv = Driver()
    drv.init()
    gpu = drv.device_uuid(0)
    for flipped in (False, True):
        if flipped:
            e = wf.read_index(path).entries["huge"]
            flip_bit(path, e.offset + MIB)
        targets = {k: torch.zeros_like(t, device="cuda") for k, t in src.items()}
        s = weight_stager.Stager(str(path), gpu)
        try:
            ready = s.ready(timeout=60)
            assert ready is not None, s.why
            out = load_staged(str(path), targets, ready["handle"], ready["size"], ready["gpu"])
            s.release(timeout=30)
            assert out["staged"] and out["tensors"] == len(src)
            if flipped:
                with pytest.raises(CheckpointUnusable, match="huge .* checksum mismatch"):
                    s.verdict(timeout=60)
            else:
                assert s.verdict(timeout=60)["ok"]
                assert all(torch.equal(targets[k].cpu(), t) for k, t in src.items())
        finally:
            s.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_a_stager_asked_to_leave_more_than_the_gpu_has_declines(fvw):
    """The real stager on a GPU, told the restore needs more memory than the GPU has: it says
    so, with the sizes, and allocates nothing (the worker loads the weights itself)."""
    from fvboot.cuda_driver import Driver

    path, _ = fvw
    drv = Driver()
    drv.init()
    s = weight_stager.Stager(str(path), drv.device_uuid(0), reserve=1 << 50)
    try:
        assert s.ready(timeout=60) is None
        assert "of GPU memory free; a copy of the dump takes" in s.why, s.why
    finally:
        s.stop()


def test_a_yielding_stager_waits_while_the_cuda_resume_runs_and_no_longer(tmp_path):
    """FV_WEIGHT_STAGING_YIELD=resume: a copy window or check entry waits while the service's
    mark exists, goes on as soon as it is gone, and a mark left behind holds it up at most the
    budget, once (later calls do not wait again)."""
    import threading

    mark = tmp_path / "cuda-resume.running"
    pause = weight_stager.Yield(str(mark), budget=0.5)
    t0 = time.monotonic()
    pause()  # no mark: no wait
    assert time.monotonic() - t0 < 0.05 and pause.waited == 0
    mark.touch()
    threading.Timer(0.2, mark.unlink).start()
    pause()
    assert 0.15 < pause.waited < 0.45 and not mark.exists()
    mark.touch()  # left behind: the rest of the budget, then never again
    t0 = time.monotonic()
    pause()
    pause()
    assert time.monotonic() - t0 < 0.45
    assert weight_stager.Yield(None)() is None  # not asked to yield: never looks


def test_the_stager_is_given_the_services_mark_only_when_asked_to_yield(tmp_path):
    argv, env = weight_stager.stager_command("w.fvw", "GPU-1", "/opt/fast-vllm/lib/fvboot", 0,
                                             resume_mark=str(tmp_path / "m"))
    assert env[weight_stager.MARK_ENV] == str(tmp_path / "m")
    _, env = weight_stager.stager_command("w.fvw", "GPU-1", "/opt/fast-vllm/lib/fvboot", 0)
    assert weight_stager.MARK_ENV not in env and weight_stager.POOL_ENV not in env


def test_the_pool_the_stager_made_is_handed_on_or_why_not():
    """FV_WAKE_MEMORY=helper: the stager says the allocations it made (its socket, [address,
    size] each), or why it made none; one that says nothing is waited for only so long."""
    pool = {"event": "pool", "socket": "/tmp/fvboot/stager-pool.sock", "pool": [[4096, 8192]], "seconds": 0.3}
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_stand_in(pool, READY, then={"ok": True}))
    try:
        assert s.pool(timeout=10) == pool
    finally:
        s.stop()
    why = "120.0 GB of GPU memory free; a copy of the dump takes 130.0 GB and the restore needs 4.0 GB beside it"
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_stand_in({"event": "no-pool", "why": why}, READY,
                                                                then={"ok": True}))
    try:
        assert s.pool(timeout=10) is None and s.why_no_pool == why
        s.drop_pool(timeout=0.5)  # it made none: nothing asked, nothing stopped
        assert s.ready(timeout=10) == READY  # staging goes on without it
    finally:
        s.stop()
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert s.pool(timeout=0.2) is None and "made no memory within 0.2 s" in s.why_no_pool
    finally:
        s.stop()


def _dropping(answer: bool) -> list[str]:
    """A stand-in that made a pool and staged; on "drop-pool" says so (ANSWER) or keeps silent."""
    pool = {"event": "pool", "socket": "/nonexistent.sock", "pool": [[4096, 8192]]}
    script = ("import json, sys\n"
              f"for e in {[pool, READY]!r}: print(json.dumps(e), flush=True)\n"
              "for line in sys.stdin:\n"
              f"    if line.strip() == 'drop-pool' and {answer}: print(json.dumps({{'event': 'pool-dropped'}}), flush=True)\n"
              "    if line.strip() == 'release': break\n"
              "for e in [{'event': 'freed'}, {'event': 'verified', 'ok': True}]: print(json.dumps(e), flush=True)\n")
    return [sys.executable, "-c", script]


def test_a_pool_the_worker_did_not_adopt_is_given_back_before_the_wakes():
    """The KV cache wakes into the memory the stager made for it: a pool not adopted is given
    back first (the staged copy stays, to be taken); a stager that does not give it back within
    the bound is stopped, and its copy is then not offered to the worker."""
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_dropping(True))
    try:
        assert s.pool(timeout=10) is not None
        s.drop_pool(timeout=10)
        assert s.proc.poll() is None and s.ready(timeout=10) == READY
        s.release()
        assert s.verdict(timeout=10)["ok"]
    finally:
        s.stop()
    s = weight_stager.Stager("w.fvw", "GPU-1", argv=_dropping(False))
    try:
        assert s.pool(timeout=10) is not None
        t0 = time.monotonic()
        s.drop_pool(timeout=0.3)
        assert time.monotonic() - t0 < 10 and s.proc.poll() is not None  # stopped: its memory is free
        assert s.ready(timeout=10) is None and "did not give back within 0.3 s" in s.why
    finally:
        s.stop()


class _PoolDriver:
    """The driver calls make_pool uses; each export a real descriptor (a pipe's write end), as
    cuMemExportToShareableHandle's is."""

    def __init__(self, free):
        self.free, self.created, self.released, self.reads = free, [], [], []

    def mem_get_info(self):
        return self.free, 141 << 30

    def create(self, n, device):
        self.created.append(n)
        return len(self.created)

    def export_fd(self, h):
        r, w = os.pipe()
        self.reads.append(r)
        return w

    def release(self, h):
        self.released.append(h)


def test_the_stager_makes_the_pool_hands_it_over_and_gives_back_what_is_dropped(monkeypatch):
    """make_pool as the stager runs it (the driver a stand-in): the recorded allocations made,
    their descriptors received by the worker's side at the socket it names, in order; then a
    "drop-pool" gives the memory back and says so; too little GPU memory: no pool, and why."""
    from fvboot.adopt import receive_fds

    d = tempfile.mkdtemp(prefix="fv-", dir="/tmp")
    try:
        spec = os.path.join(d, "stager-pool.json")
        Path(spec).write_text(json.dumps({"pool": [["weights", 0x7F00_0000_0000, 2 << 20],
                                                    ["kv_cache", 0x7F10_0000_0000, 4 << 20]]}))
        monkeypatch.setenv(weight_stager.POOL_ENV, spec)
        events, drv = [], _PoolDriver(free=40 << 30)
        pool = weight_stager.make_pool(drv, 0, 1 << 30, lambda **e: events.append(e))
        [said] = events
        assert said["event"] == "pool" and said["socket"] == os.path.join(d, "stager-pool.sock")
        assert said["pool"] == [[0x7F00_0000_0000, 2 << 20], [0x7F10_0000_0000, 4 << 20]] and drv.created == [2 << 20, 4 << 20]
        fds = receive_fds(said["socket"], 2, timeout=10)
        for fd, r in zip(fds, drv.reads):
            os.write(fd, b"k")
            assert os.read(r, 1) == b"k"  # each the export it stands for, in the pool's order
            os.close(fd)
        weight_stager._await_release(pool, iter(["drop-pool\n", "release\n"]), lambda **e: events.append(e))
        assert events[-1] == {"event": "pool-dropped"} and drv.released == [1, 2]
        events.clear()
        assert weight_stager.make_pool(_PoolDriver(free=512 << 20), 0, 1 << 30, lambda **e: events.append(e)) is None
        assert events[0]["event"] == "no-pool" and "the engine's sleeping memory" in events[0]["why"]
        events.clear()
        Path(spec).write_text(json.dumps([[0x7F00_0000_0000, 2 << 20]]))  # another fvboot's format
        assert weight_stager.make_pool(_PoolDriver(free=40 << 30), 0, 1 << 30, lambda **e: events.append(e)) is None
        assert events[0]["event"] == "no-pool"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_stager_is_given_the_pool_to_make_unless_wake_memory_engine(monkeypatch, tmp_path):
    monkeypatch.setattr(weight_stager, "Stager", lambda path, gpu, reserve, resume_mark, pool_file: pool_file)
    (tmp_path / "rank0.fvw").write_bytes(b"x" * 1000)
    run = tmp_path / "run"
    assert weight_stager.start(tmp_path, ["GPU-1"], pool=(), run_dir=run) is None
    made = weight_stager.start(tmp_path, ["GPU-1"], pool=[("weights", 4096, 2 << 20), ("kv_cache", 8 << 20, 4 << 20)],
                               run_dir=run, weights_at={"w": 4096})
    assert json.loads(Path(made).read_text()) == {"pool": [["weights", 4096, 2 << 20], ["kv_cache", 8 << 20, 4 << 20]],
                                                  "weights_at": {"w": 4096}}
    monkeypatch.delenv(weight_stager.WAKE_MEMORY_ENV, raising=False)
    assert weight_stager.wake_memory() == "helper"  # the default: faster on the H200 (README)
    monkeypatch.setenv(weight_stager.WAKE_MEMORY_ENV, "Engine")
    assert weight_stager.wake_memory() == "engine"
    monkeypatch.setenv(weight_stager.WAKE_MEMORY_ENV, "gpu")
    with pytest.raises(CheckpointUnusable, match="FV_WAKE_MEMORY='gpu': expected engine or helper"):
        weight_stager.wake_memory()


class _Entry:
    def __init__(self, key, offset, nbytes):
        self.key, self.offset, self.nbytes = key, offset, nbytes


def test_each_entry_of_the_dump_is_placed_in_the_weights_allocation_that_holds_it():
    allocations = [(0x20000, 0x1000), (0x10000, 0x2000)]  # (address, size), not in address order
    entries = [_Entry("b", 100, 50), _Entry("a", 0, 100), _Entry("empty", 150, 0), _Entry("c", 150, 16)]
    at = {"a": 0x10000, "b": 0x11000, "c": 0x20FF0}
    assert stager_copy.placement(entries, at, allocations) == [
        (0, 1, 0, 100), (100, 1, 0x1000, 50), (150, 0, 0xFF0, 16)]  # file order; empty entries skipped
    with pytest.raises(ValueError, match="c .16 bytes at 0x20ff8. is not within one allocation"):
        stager_copy.placement(entries, {**at, "c": 0x20FF8}, allocations)
    with pytest.raises(ValueError, match="the bake recorded no address for b"):
        stager_copy.placement(entries, {"a": 0x10000, "c": 0x20FF0}, allocations)
    # outside the pool (below, between, above its allocations): a sleep kept it, nothing to put back
    for elsewhere in (0x100, 0x12000, 0x30000):
        assert stager_copy.placement(entries, {**at, "a": elsewhere}, allocations) == [
            (100, 1, 0x1000, 50), (150, 0, 0xFF0, 16)]


class _HostDriver:
    """The driver calls fill_in_place makes, with host memory standing in for the GPU's: a
    reserved range is a host buffer, a map binds a handle's buffer there, a copy is a memmove."""

    def __init__(self, sizes):
        import ctypes

        self.ctypes = ctypes
        self.memory = {h: ctypes.create_string_buffer(n) for h, n in enumerate(sizes, 1)}  # handle -> bytes
        self.at, self.registered, self.calls = {}, [], []

    def reserve(self, n):
        buf = self.ctypes.create_string_buffer(n)
        self.at[self.ctypes.addressof(buf)] = buf
        return self.ctypes.addressof(buf)

    def map(self, va, n, handle, device):
        self.calls.append(("map", handle))
        self.at[va] = self.memory[handle]  # copies to VA land in the handle's memory

    def unmap(self, va, n):
        self.calls.append("unmap")

    def address_free(self, va, n):
        self.calls.append("free")

    def stream(self):
        return 0

    def synchronize(self, st):
        pass

    def host_register(self, addr, n):
        self.registered.append((addr, n))

    def host_unregister(self, addr):
        self.registered = [r for r in self.registered if r[0] != addr]

    def copy_to_device(self, dst, src, n, stream):
        for va, buf in self.at.items():
            if va <= dst < va + len(buf):
                self.ctypes.memmove(self.ctypes.addressof(buf) + dst - va, src, n)
                return
        raise AssertionError(f"a copy to {dst:#x}, which nothing maps")


def test_the_stager_puts_the_dump_into_the_weights_it_made_entry_by_entry(monkeypatch):
    """fill_in_place, the driver standing in with host memory: every entry's bytes land at its
    offset in the allocation that holds it, across the page-locking windows; the stager's own
    mappings are undone after; the KV cache's allocation is not touched."""
    import ctypes

    monkeypatch.setattr(stager_copy, "REGISTER_WINDOW", 64)  # entries straddle windows
    data = bytes(range(256)) * 2
    src = ctypes.create_string_buffer(data, len(data))
    entries = [_Entry("a", 0, 200), _Entry("b", 200, 100), _Entry("c", 300, 212)]
    wanted = [("weights", 0x10000, 512), ("kv_cache", 0x30000, 64), ("weights", 0x20000, 256)]
    at = {"a": 0x10000 + 300, "b": 0x20000 + 10, "c": 0x10000 + 0}
    drv = _HostDriver([n for *_, n in wanted])
    pool = weight_stager.Pool(drv, [1, 2, 3], None, wanted, at)
    out = stager_copy.fill_in_place(drv, 0, pool, entries, ctypes.addressof(src), len(data))
    assert out["bytes"] == 512 and out["entries"] == 3 and out["copy"] == "in-place"
    w1, kv, w2 = (drv.memory[h].raw for h in (1, 2, 3))
    assert w1[300:500] == data[0:200] and w1[0:212] == data[300:512]
    assert w2[10:110] == data[200:300] and kv == bytes(64)
    assert [c for c in drv.calls if c != "unmap" and c != "free"] == [("map", 1), ("map", 3)]
    assert drv.calls.count("unmap") == 2 and drv.calls.count("free") == 2 and drv.registered == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_the_stager_puts_the_dump_into_the_weights_the_worker_adopts(fvw):
    """FV_WAKE_MEMORY=helper with the real driver: this process plays the sleeping engine (two
    weights allocations reserved, holding the dump's entries in another order than the file's,
    and a KV cache one); the real stager makes them, puts every entry where the engine keeps it
    and hands them over; adopted and mapped at the engine's addresses, each entry reads back
    as the dump's bytes, and the stager's check passes."""
    import ctypes
    import types

    from fvboot.adopt import adopt
    from fvboot.cuda_driver import Driver

    path, src = fvw
    drv = Driver()
    drv.init()
    drv.use_primary_context(0)
    gran = drv.granularity(0)
    up = lambda n, k: -(-n // k) * k  # noqa: E731
    entries = sorted((e for e in wf.read_index(path).entries.values() if e.nbytes), key=lambda e: -e.offset)
    allocs, at = [], {}
    for group in (entries[:len(entries) // 2], entries[len(entries) // 2:]):
        size = up(sum(up(e.nbytes, 256) for e in group), gran)
        va, off = drv.reserve(size), 0
        for e in group:
            at[e.key], off = va + off, off + up(e.nbytes, 256)
        allocs.append(("weights", va, size))
    allocs.append(("kv_cache", drv.reserve(gran), gran))
    d = tempfile.mkdtemp(prefix="fv-", dir="/tmp")
    spec = os.path.join(d, "stager-pool.json")
    Path(spec).write_text(json.dumps({"pool": [list(a) for a in allocs], "weights_at": at}))
    keep = [ctypes.c_uint64(0) for _ in allocs]
    s = weight_stager.Stager(str(path), drv.device_uuid(0), pool_file=spec)
    try:
        pool = s.pool(timeout=60)
        assert pool is not None, s.why_no_pool
        module = types.SimpleNamespace(create_and_map=lambda h: pytest.fail(f"vLLM asked to create {h}"))
        adopt(drv, pool["socket"], [(p, n) for p, n in pool["pool"]], {p: n for _, p, n in allocs}, module)
        for (_, p, n), k in zip(allocs, keep):
            module.create_and_map((0, n, p, ctypes.addressof(k)))
        ready = s.ready(timeout=60)
        assert ready is not None and ready["in_place"] and ready["entries"] == len(entries), s.why
        s.release(timeout=30)
        assert s.verdict(timeout=60)["ok"]
        for e in entries:
            got = ctypes.create_string_buffer(e.nbytes)
            drv.copy_to_host(ctypes.addressof(got), at[e.key], e.nbytes)
            assert got.raw == src[e.key].contiguous().view(-1).view(torch.uint8).numpy().tobytes(), e.key
    finally:
        s.stop()
        for (_, p, n), k in zip(allocs, keep):
            if k.value:
                drv.unmap(p, n)
                drv.release(k.value)
            drv.address_free(p, n)
        shutil.rmtree(d, ignore_errors=True)


def test_a_stagers_check_that_fails_otherwise_is_a_verdict_with_its_reason():
    """A check that raised (an unknown checksum, no memory) ended its thread with no verdict,
    and the fallback's reason read "weights: None" (found by review, 2026-12-06)."""

    def unknown():
        raise ValueError("checksum algorithm 'sha999' is not available here")

    v = weight_stager.checked(unknown)
    assert v["ok"] is False and v["why"] == ("the check of the staged weights failed: ValueError: checksum"
                                             " algorithm 'sha999' is not available here")
    assert weight_stager.checked(lambda: None)["ok"] is True
    assert weight_stager.checked(lambda: "entry x differs")["why"] == "entry x differs"
