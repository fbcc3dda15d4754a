"""`fvbuild bench`'s table and picture from a result as a run gives it (the runs themselves are
timed against a real image in tests/e2e/test_restore.py)."""

from __future__ import annotations

import pytest

from conftest import need
from fvbuild.bench import BenchResult, plot

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
