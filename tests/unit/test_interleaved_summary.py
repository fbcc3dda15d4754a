"""bench/interleaved_summary.py: the tables a results README carries, from an interleaved run's
files as gpu_variants_interleaved.sh leaves them (a JSON per restored sample; a log only, ending
in fvbuild's reason, where the image fell back)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import interleaved_summary  # noqa: E402


def _sample(folder: Path, v: int, r: int, seconds: float, env=(), settle=0.0, kv=0.29, cold=None) -> None:
    marks = {"fvboot running": 0.1, "restore issued": 0.2, "criu: memory restored": 0.5,
             "criu: CUDA resumed": 1.1, "restore done": 1.11, "weight memory mapped": 1.2,
             "staged copy taken": 1.28, "weights loaded": 1.29, "engine awake": 1.29 + kv}
    run = {"restore_s": [seconds], "restore_env": list(env), "settle_s": settle, "cold_s": [cold] if cold else [],
           "last_restore_timeline": [{"event": k, "t": t} for k, t in marks.items()]}
    (folder / f"v{v}-r{r}.json").write_text(json.dumps(run))
    (folder / f"v{v}-r{r}.log").write_text(f"restore 1/1: {seconds} s\n")


def test_each_setting_gets_its_rounds_median_steps_and_the_reason_of_a_fallback(tmp_path):
    for r, t in ((1, 1.7), (2, 1.9), (3, 1.8)):
        _sample(tmp_path, 1, r, t)
        _sample(tmp_path, 2, r, t - 0.2, ["FV_WAKE_MEMORY=helper"], settle=5, kv=0.01)
    (tmp_path / "v2-r2.json").unlink()
    (tmp_path / "v2-r2.log").write_text(
        "fvbuild: the image did not restore: fvboot: checkpoint not used: POST /wake_up?tags=kv_cache answered 500:"
        " out of memory; starting vLLM normally (compile caches reused)\n")
    out = interleaved_summary.tables(interleaved_summary.load(tmp_path))
    assert "| defaults | 1.70 | 1.90 | 1.80 | 1.80 |" in out
    assert "| `FV_WAKE_MEMORY=helper` `--settle=5` | 1.50 | fell back | 1.60 | 1.55 (2 of 3 restored) |" in out
    assert "| KV cache wake | 0.29 | 0.01 |" in out and "| CUDA resume | 0.60 | 0.60 |" in out
    assert "round 2: fell back (POST /wake_up?tags=kv_cache answered 500: out of memory)" in out
    assert "Page cache dropped" not in out


def test_a_setting_restored_cold_too_gets_its_own_table(tmp_path):
    for r, t in ((1, 1.7), (2, 1.9)):
        _sample(tmp_path, 1, r, t)
        _sample(tmp_path, 2, r, t, cold=5.0 + r)
    out = interleaved_summary.tables(interleaved_summary.load(tmp_path))
    assert "| `--cold` | 1.70 | 1.90 | 1.80 |" in out
    assert "| `--cold` | 6.00 | 7.00 | 6.50 |" in out.split("Page cache dropped")[1]
