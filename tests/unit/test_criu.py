"""criu.py without CRIU: the restore log's phases and GPU resume failures, the huge-page decision (free page reporting,
FV_RESTORE_THP), the map-pages decision (FV_RESTORE_MAP_PAGES), the kernel-facts warm-up
(criu-patches/0004). CRIU itself runs in tests/e2e."""

from __future__ import annotations

import time

import pytest


def test_restore_phases_split_criu_memory_from_cuda_resume(tmp_path):
    from fvboot.criu import read_restore_log

    log = tmp_path / "criu-restore.log"
    log.write_text("(00.010000) Version: 4.2.1\n(02.500000) cuda_plugin: resuming devices on pid 7\n"
                   "(03.100000) cuda_plugin: resuming devices on pid 8\n"
                   "(04.250000) Restore finished successfully. Tasks resumed.\n")
    assert read_restore_log(log).phases == {"cuda_resume_start": 2.5, "restore_finished": 4.25}
    assert read_restore_log(tmp_path / "missing.log").phases == {}


def test_a_gpu_state_the_plugin_could_not_resume_is_found_in_the_log(tmp_path):
    """CRIU ends such a restore successfully (the process then blocks on every CUDA call): the
    plugin's error line is what tells; a process without CUDA state is not an error."""
    from fvboot.criu import read_restore_log

    log = tmp_path / "criu-restore.log"
    log.write_text(
        "(00.200000) Error (plugins/cuda/cuda_plugin.c:221): cuda_plugin: Failed to launch cuda-checkpoint"
        " to retrieve restore tid: Could not get restore thread ID of process ID 1: \"process has not loaded the"
        " CUDA driver\"\n"
        "(01.500000) cuda_plugin: resuming devices on pid 108\n"
        "(01.600000) Error (plugins/cuda/cuda_plugin.c:510): cuda_plugin: RESUME_DEVICES RESTORE failed with"
        " Could not restore on process ID 108: \"invalid argument\"\n"
        "(01.700000) Restore finished successfully. Tasks resumed.\n")
    assert read_restore_log(log).gpu_failure == ('RESUME_DEVICES RESTORE failed with Could not restore on process ID 108:'
                                       ' "invalid argument"')
    log.write_text(log.read_text().splitlines(keepends=True)[0] + "(01.7) Restore finished successfully.\n")
    assert read_restore_log(log).gpu_failure is None
    assert read_restore_log(tmp_path / "missing.log").gpu_failure is None
    # the lookup failing otherwise (the service's driver did not start, a client's bound): the
    # plugin skips that process's resume and CRIU says it restored (found by review, 2026-12-06)
    log.write_text(
        "(00.200000) Error (plugins/cuda/cuda_plugin.c:221): cuda_plugin: Failed to launch cuda-checkpoint"
        " to retrieve restore tid: fv-cuda-checkpoint: the cuda-checkpoint service at /run/s failed: no answer"
        " within 300 s\n(00.200001) cuda_plugin: No need to resume devices on pid 108\n"
        "(01.700000) Restore finished successfully. Tasks resumed.\n")
    assert read_restore_log(log).gpu_failure == (
        "Failed to launch cuda-checkpoint to retrieve restore tid: fv-cuda-checkpoint: the cuda-checkpoint service"
        " at /run/s failed: no answer within 300 s")


def test_the_restore_log_is_read_whole_lines_at_its_ends(tmp_path):
    """The first line and a last line without a newline are read whole."""
    from fvboot.criu import read_restore_log

    log = tmp_path / "criu-restore.log"
    log.write_text("(00.100000) cuda_plugin: resuming devices on pid 3\n(00.2) x\n"
                   "(00.300000) Error (c.c:1): cuda_plugin: RESUME_DEVICES UNLOCK failed with boom")
    got = read_restore_log(log)
    assert got.phases == {"cuda_resume_start": 0.1}
    assert got.gpu_failure == "RESUME_DEVICES UNLOCK failed with boom"


def _virtio(root, name, device, features):
    d = root / name
    d.mkdir(parents=True)
    (d / "device").write_text(device + "\n")
    (d / "features").write_text(features + "\n")


def test_free_page_reporting_is_read_from_the_balloon_features(tmp_path):
    from fvboot import criu

    _virtio(tmp_path / "a", "virtio0", "0x0002", "0010011" + "0" * 57)  # a block device
    assert not criu.free_page_reporting(tmp_path / "a")
    _virtio(tmp_path / "b", "virtio0", "0x0005", "0110000" + "0" * 57)  # balloon, no reporting
    assert not criu.free_page_reporting(tmp_path / "b")
    _virtio(tmp_path / "c", "virtio3", "0x0005", "0110010" + "0" * 57)  # bit 5: reporting
    assert criu.free_page_reporting(tmp_path / "c")
    assert not criu.free_page_reporting(tmp_path / "missing")


def _switches() -> dict:
    """restore_env() less the kernel-facts cache folder it always names (test below)."""
    from fvboot import criu

    env = criu.restore_env()
    assert env.pop("CRIU_KDAT_CACHE_DIR") == criu.KDAT_CACHE_DIR
    return env


def test_thp_restore_setting(monkeypatch):
    from fvboot import criu

    monkeypatch.setenv("FV_RESTORE_MAP_PAGES", "0")
    monkeypatch.setattr(criu, "free_page_reporting", lambda: True)
    monkeypatch.delenv("FV_RESTORE_THP", raising=False)
    assert _switches() == {} and "free page reporting" in criu.restore_thp()[1]
    monkeypatch.setenv("FV_RESTORE_THP", "1")
    assert _switches() == {"CRIU_RESTORE_THP": "1"}
    monkeypatch.setattr(criu, "free_page_reporting", lambda: False)
    monkeypatch.setenv("FV_RESTORE_THP", "auto")
    assert _switches() == {"CRIU_RESTORE_THP": "1"}
    monkeypatch.setenv("FV_RESTORE_THP", "0")
    assert _switches() == {}


@pytest.mark.parametrize("setting, mapped", [(None, True), ("auto", True), ("1", True), ("0", False)])
def test_map_pages_setting(monkeypatch, setting, mapped):
    """Images map their memory from the checkpoint (CPU and GPU alike) unless told not to, and
    the reason names the setting that decided."""
    from fvboot import criu

    monkeypatch.setenv("FV_RESTORE_THP", "0")
    if setting is None:
        monkeypatch.delenv("FV_RESTORE_MAP_PAGES", raising=False)
    else:
        monkeypatch.setenv("FV_RESTORE_MAP_PAGES", setting)
    assert _switches() == ({"CRIU_RESTORE_MAP_PAGES": "1"} if mapped else {})
    why = criu.restore_map_pages()[1]
    assert why == (f"FV_RESTORE_MAP_PAGES={setting}" if setting in ("0", "1") else "auto")

def test_the_kernel_facts_are_learned_beside_the_checks_into_the_folder_the_restore_reads(tmp_path, monkeypatch):
    """criu-patches/0004: `criu check --feature mnt_id` fills CRIU's kernel-facts cache in
    KDAT_CACHE_DIR while fvboot checks the image, and the restore is pointed at the same folder;
    a warm-up that does not end in time is killed (the restore then probes for itself)."""
    from fvboot import criu

    monkeypatch.setattr(criu, "KDAT_CACHE_DIR", str(tmp_path / "kdat"))
    tool = tmp_path / "criu"
    tool.write_text('#!/bin/sh\necho "$@" > "$CRIU_KDAT_CACHE_DIR/criu.kdat"\n')
    tool.chmod(0o755)
    monkeypatch.setattr(criu, "_criu", lambda: [str(tool)])
    proc = criu.warm_kernel_facts()
    criu.wait_kernel_facts(proc)
    assert proc.returncode == 0
    assert (tmp_path / "kdat" / "criu.kdat").read_text() == "check --feature mnt_id\n"
    assert criu.restore_env()["CRIU_KDAT_CACHE_DIR"] == str(tmp_path / "kdat")
    tool.write_text("#!/bin/sh\nexec sleep 60\n")
    proc = criu.warm_kernel_facts()
    t = time.monotonic()
    criu.wait_kernel_facts(proc, timeout=0.3)
    assert proc.returncode is not None and time.monotonic() - t < 5
    criu.wait_kernel_facts(None)  # it could not start: nothing to wait for


@pytest.mark.parametrize("setting, level", [(None, 3), ("4", 4), ("0", 1), ("1", 1), (" 2 ", 2)])
def test_the_restore_logs_at_the_info_level_unless_told_otherwise(monkeypatch, setting, level):
    """-v3 keeps the timestamps and the lines the restore reads (the cuda plugin's resume, the
    end); only CRIU's own levels 0-4 are taken (others are refused before anything runs:
    test_runenv.py), and 0 as 1: its errors, the cuda plugin's failed resume among them, are
    what fvboot's reasons come from."""
    from fvboot import criu

    if setting is None:
        monkeypatch.delenv("FV_CRIU_RESTORE_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("FV_CRIU_RESTORE_LOG_LEVEL", setting)
    assert criu.restore_log_level() == level


def test_memory_is_read_back_whole_where_the_served_processes_run_jemalloc(tmp_path, monkeypatch):
    """jemalloc marks memory it purged with MADV_DONTNEED as zeroed and its calloc skips the
    clearing; mapped from the page images, such memory reads as the checkpoint's: 4,193,536 of
    4 MiB not zero after a restore (found by review, 2026-12-06). The bake records the allocator
    it finds mapped; a restore then reads memory back whole, whatever FV_RESTORE_MAP_PAGES says."""
    from fvboot import criu, manifest
    from fvboot.launcher import zeroing_allocators

    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "maps").write_text(
        "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
        "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f40-7f50 rw-p 00000000 00:00 0 \n")
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "maps").write_text("7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4\n")
    assert zeroing_allocators(7, str(tmp_path)) == ["jemalloc"]
    assert zeroing_allocators(8, str(tmp_path)) == []  # gperftools' calloc always clears
    assert zeroing_allocators(9, str(tmp_path)) == []
    monkeypatch.setenv("FV_RESTORE_MAP_PAGES", "1")
    mapped, why = criu.restore_map_pages(["jemalloc"])
    assert not mapped and "jemalloc, which takes memory it gave back for zeros" in why
    assert criu.restore_map_pages([]) == (True, "FV_RESTORE_MAP_PAGES=1")
    proc = {"host_pid": 7, "pid": 1, "name": "python3", "command": "vllm", "rss_anon_bytes": 1}
    m_procs = (manifest.Process.from_json({**proc, "allocators": ["jemalloc"]}), manifest.Process.from_json(proc))
    import types

    assert manifest.Manifest.zeroing_allocators(types.SimpleNamespace(processes=m_procs)) == ["jemalloc"]
    assert manifest.Manifest.zeroing_allocators(types.SimpleNamespace(processes=None)) == []
