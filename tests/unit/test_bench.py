"""`fvbuild bench`'s table and picture from a result as a run gives it (the runs themselves are
timed against a real image in tests/e2e/test_restore.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import need
from fvbuild.bench import BenchResult, bake_seconds, plot

TIMELINE = [{"kind": "serve", "event": e, "t": t} for e, t in (
    ("fvboot running", 0.14), ("checks passed", 0.16), ("restore done", 1.28), ("weights loaded", 1.30),
    ("answers checked", 1.42), ("ready", 1.42))]


def _result() -> BenchResult:
    return BenchResult("fv-test/x:cpu", "2026-12-02 17:24", "vm", {"kind": "cpu"}, "vllm 0.32.0+cpu", [],
                       "synthetic:tiny", [], restore_s=[1.71, 1.53, 1.53], normal_s=[44.86, 45.25],
                       last_restore_timeline=TIMELINE, restore_equals_normal_start=True,
                       checkpoint_bytes=1_420_000_000, weights_bytes=1_000_000)


def test_the_table_gives_each_path_its_median():
    lines = _result().table().splitlines()
    assert lines[1].startswith("restore from checkpoint (warm)") and "1.53  [1.71, 1.53, 1.53]" in lines[1]
    assert lines[2].startswith("normal vLLM start (baked compile caches)") and "45.05" in lines[2]
    assert lines[3] == "checkpoint 1.42 GB, weight dump 0.00 GB"
    assert lines[4].endswith("True")


def test_the_plot_is_a_png_with_both_panels(tmp_path):
    need("matplotlib", "fvbuild bench --plot draws with it")
    out = tmp_path / "bench.png"
    fig = plot(_result(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths, phases = fig.axes
    assert [t.get_text() for t in paths.get_yticklabels()] == ["restore from checkpoint (warm)",
                                                               "normal vLLM start (baked compile caches)"]
    assert len(phases.patches) == len(TIMELINE)  # one bar segment per phase
    assert phases.get_legend().get_texts()[2].get_text() == "restore done (1.12 s)"


def test_no_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from fvbuild.errors import BenchError

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "matplotlib"
                        else real(name, *a, **k))
    with pytest.raises(BenchError, match=r"pip install 'fast-vllm\[plot\]'"):
        plot(_result(), tmp_path / "x.png")


def test_the_targets_that_apply_are_judged_against_this_run():
    """The CPU image's warm target, and a cold target from this run's own disk: 1.2 x the bytes a
    cold restore reads / the disk's measured read speed."""
    res = _result()
    res.cold_s, res.disk_read_gbps = [3.1, 2.9, 3.4], 2.0
    res.targets = res.targets_met()
    assert res.targets == [
        {"what": "warm restore", "unit": "s", "target": 0.5, "now": 1.53, "met": False},
        {"what": "cold restore: 1.2 x 1.42 GB (checkpoint, weights) / 2.00 GB/s", "unit": "s", "target": 0.85,
         "now": 3.1, "met": False}]
    res.cold_read_bytes = [1_700_000_000, 1_650_000_000, 1_800_000_000]  # the disk's own count, where read
    assert res.targets_met()[1] == {"what": "cold restore: 1.2 x 1.70 GB read / 2.00 GB/s", "unit": "s",
                                    "target": 1.02, "now": 3.1, "met": False}
    lines = res.table().splitlines()
    assert lines[-3].startswith("targets") and lines[-2].startswith("warm restore") and lines[-2].endswith("no")
    assert "published elsewhere" not in res.table()  # a CPU run: the GPU references do not apply


def test_a_gpu_image_gets_its_checkpoint_target_and_the_published_figures():
    res = _result()
    res.device, res.model, res.restore_s, res.checkpoint_bytes = {"kind": "cuda"}, "synthetic:llama-3.2-3b", [1.4], 4_080_000_000
    res.targets = res.targets_met()
    assert [(t["what"], t["met"]) for t in res.targets] == [("warm restore", True), ("checkpoint", False)]
    table = res.table()
    assert "published elsewhere, not measured here" in table and "vllm-project/vllm#51360" in table
    assert "the seed's recipe: plain vllm serve" in table and "81.0 s" in table


def test_the_disk_is_measured_with_a_file_it_removes(tmp_path):
    """A real write, page cache drop and read (root, as --cold needs); nothing left behind."""
    from fvbuild.bench import disk_read_gbps

    assert disk_read_gbps(tmp_path, size=32 << 20) > 0
    assert list(tmp_path.iterdir()) == []


def test_a_cold_runs_bytes_read_come_from_the_disks_own_counter(tmp_path):
    """The kernel's count of bytes read from the block device under a folder grows by what is
    read from there with the page cache dropped (root, as --cold needs); a folder with no such
    device (here /proc) has no count rather than a wrong one."""
    from fvbuild.bench import disk_reads, drop_page_cache

    before = disk_reads(tmp_path)
    if before is None:
        pytest.skip(f"{tmp_path}'s filesystem has no block device in /sys/dev/block on this machine")
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * (16 << 12))  # 16 MiB
    drop_page_cache()
    before = disk_reads(tmp_path)
    assert len(path.read_bytes()) == 16 << 20
    assert disk_reads(tmp_path) - before >= 16 << 20
    assert disk_reads(Path("/proc")) is None and disk_reads(None) is None


def test_the_bake_is_judged_against_this_runs_plain_start():
    """From the model on disk to the bake's last mark (the GPU run's manifest: 28.2 s making the
    synthetic model, then 124.9 s), against 1.2 x the plain start of the same run."""
    timeline = {"process start": 0.0, "model ready": 28.174, "server healthy": 140.674,
                "checkpoint written": 151.069, "zero pages left out": 153.087}
    assert bake_seconds(timeline) == 124.91
    assert bake_seconds({"process start": 0.0}) is None and bake_seconds({}) is None
    res = _result()
    res.bake_s, res.nocache_s = 124.91, [111.45]
    res.targets = res.targets_met()
    assert res.targets[-1] == {"what": "bake: 1.2 x a plain start (111.45 s)", "unit": "s", "target": 133.74,
                               "now": 124.91, "met": True}
    res.nocache_s = []
    assert all(not t["what"].startswith("bake") for t in res.targets_met())  # no plain start this run


def test_the_weights_line_of_a_restore_is_its_last_one():
    from fvbuild.bench import weights_line

    logs = "fvboot: weights: [{'notes': ['first']}]\nINFO vllm\nfvboot: weights: [{'notes': ['page cache registered']}]\n"
    assert weights_line(logs) == "fvboot: weights: [{'notes': ['page cache registered']}]"
    assert weights_line("fvboot: restored from checkpoint\n") is None
