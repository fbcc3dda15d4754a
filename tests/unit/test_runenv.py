"""The FV_* settings `docker run -e` gives fvboot: one table, every value checked before
anything runs, names fvboot does not know said with the closest one it does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fvboot import runenv
from fvboot.errors import CheckpointUnusable

REPO = Path(__file__).resolve().parents[2]


def test_whole_numbers_and_switches_are_read_as_the_loader_reads_them():
    assert runenv.value("FV_LOAD_BUFFERS", {"FV_LOAD_BUFFERS": " 008 "}) == "8"
    assert runenv.value("FV_LOAD_THREADS", {}) == "0"
    assert [runenv.value("FV_LOAD_REGISTER", {"FV_LOAD_REGISTER": v}) for v in ("off", "No", "1", "")] == \
        ["0", "0", "1", "1"]
    assert runenv.problems({"FV_LOAD_STREAMS": "-2"}) == ["FV_LOAD_STREAMS='-2': expected a whole number in [1, 64]"]


def test_unset_and_blank_settings_are_their_defaults():
    assert runenv.value("FV_WEIGHT_CHECK", {}) == "overlap"
    assert runenv.value("FV_WEIGHT_CHECK", {"FV_WEIGHT_CHECK": "  "}) == "overlap"
    assert runenv.value("FV_WEIGHT_CHECK", {"FV_WEIGHT_CHECK": " Inline\n"}) == "inline"
    assert runenv.seconds("FV_START_TIMEOUT_S", {}) == 3600.0
    assert runenv.seconds("FV_START_TIMEOUT_S", {"FV_START_TIMEOUT_S": "90.5"}) == 90.5


@pytest.mark.parametrize("env, said", [
    ({"FV_WEIGHT_CHECK": "bogus"}, "FV_WEIGHT_CHECK='bogus': expected inline or overlap"),
    ({"FV_START_TIMEOUT_S": "soon"}, "FV_START_TIMEOUT_S='soon' is not a number of seconds above 0 (and at most 604800, a week)"),
    ({"FV_CRIU_RESTORE_TIMEOUT_S": "0"}, "FV_CRIU_RESTORE_TIMEOUT_S='0' is not a number of seconds above 0 (and at most 604800, a week)"),
    # an endless wait is no bound (found by review, 2026-12-06: "inf" held requests at the gate forever)
    ({"FV_GATE_WAIT_S": "inf"}, "FV_GATE_WAIT_S='inf' is not a number of seconds above 0 (and at most 604800, a week)"),
    ({"FV_START_TIMEOUT_S": "1e999"}, "FV_START_TIMEOUT_S='1e999' is not a number of seconds above 0 (and at most 604800, a week)"),
    ({"FV_RESTORE_STEP_TIMEOUT_S": "nan"}, "FV_RESTORE_STEP_TIMEOUT_S='nan' is not a number of seconds above 0 (and at most 604800, a week)"),
    ({"FV_RESTORE_THP": "maybe"}, "FV_RESTORE_THP='maybe': expected auto, 0 or 1"),
    ({"FV_PREFETCH": "bogus"}, "FV_PREFETCH='bogus': expected read, vmtouch or off"),
    ({"FV_CRIU_RESTORE_LOG_LEVEL": "debug"}, "FV_CRIU_RESTORE_LOG_LEVEL='debug': expected 0, 1, 2, 3 or 4"),
    # the weight loader's: with the weights put in place by the stager (the default) nothing
    # loads, and FV_LOAD_BUFFERS=0 was never refused (H100, 2026-12-05)
    ({"FV_LOAD_BUFFERS": "0"}, "FV_LOAD_BUFFERS='0': expected a whole number in [1, 256]"),
    ({"FV_LOAD_BUFFER_MB": "lots"}, "FV_LOAD_BUFFER_MB='lots': expected a whole number in [1, 4096]"),
    ({"FV_LOAD_ODIRECT": "maybe"}, "FV_LOAD_ODIRECT='maybe': expected 1/0, true/false, yes/no or on/off"),
])
def test_each_bad_value_is_said_with_what_the_setting_takes(env, said):
    assert runenv.problems(env) == [said]
    name = next(iter(env))
    with pytest.raises(CheckpointUnusable, match=re.escape(said)):
        runenv.value(name, env)


def test_every_bad_value_is_said_at_once():
    assert len(runenv.problems({"FV_WEIGHT_CHECK": "x", "FV_RESTORE": "no", "FV_GATE_WAIT_S": "-1"})) == 3
    assert runenv.problems({"FV_RESTORE": "0", "FV_API_KEY": "anything"}) == []


def test_a_name_fvboot_does_not_know_is_said_with_the_closest_it_does():
    assert runenv.unknown({"FV_RESTOR": "0", "FV_RESTORE": "1", "FV_API_KEY": "k", "PATH": "/bin"}) == [
        "FV_RESTOR is not a setting of fvboot (did you mean FV_RESTORE?): it changes nothing"]
    assert runenv.unknown({"FV_COLOUR": "blue"}) == ["FV_COLOUR is not a setting of fvboot: it changes nothing"]


# FV_* names fvboot passes between its own processes: no operator sets them
_INTERNAL = {"FV_ADMIN_TOKEN", "FV_CUDA_CHECKPOINT_SOCKET", "FV_CUDA_RESUME_MARK", "FV_STAGER_POOL", "FV_CRIU_WRAPPED",
             "FV_CRIU_SAVED_LD_LIBRARY_PATH", "FV_RUNTIME_FILE", "FV_CRIU_PLUGIN_DIR", "FV_CUDA_DEVICE_MAP"}


def test_every_fv_name_fvboot_reads_is_in_the_table():
    """A setting read without the table would be called unknown when given, and go unchecked."""
    read = set()
    # every module (the weights' too) and the C client (found by review, 2026-12-06: a name read
    # only in entrypoint/weights/ or the .c file was missed, and called unknown when given)
    for path in [*(REPO / "entrypoint").rglob("*.py"), *(REPO / "entrypoint").glob("*.c")]:
        read |= set(__import__("re").findall(r'"(FV_[A-Z0-9_]+)"', path.read_text()))
    read = {n for n in read if not n.endswith("_")}  # a prefix (FV_LOAD_)
    assert read <= set(runenv.SETTINGS) | runenv.FREE_NAMES, read - set(runenv.SETTINGS) - runenv.FREE_NAMES


def test_every_setting_in_the_table_is_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [n for n in [*runenv.SETTINGS, *runenv.FREE_NAMES]
               if f"`{n}`" not in readme and f"`{n}=" not in readme and n not in _INTERNAL]
    assert not missing, missing


def _serve(tmp_path, **env) -> subprocess.CompletedProcess:
    home = tmp_path / "fv"
    home.mkdir(exist_ok=True)
    (home / "manifest.json").write_text(json.dumps({"format": 1}))
    return subprocess.run([sys.executable, "-m", "fvboot", "serve", "--home", str(home)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "FV_RUN_DIR": str(tmp_path / "run"), **env})


def test_fvboot_serve_refuses_a_bad_value_before_anything_runs(tmp_path):
    r = _serve(tmp_path, FV_WEIGHT_CHECK="bogus", FV_START_TIMEOUT_S="soon")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "fvboot: FV_START_TIMEOUT_S='soon' is not a number of seconds above 0 (and at most 604800, a week);"
        " FV_WEIGHT_CHECK='bogus': expected inline or overlap")
    assert "Traceback" not in r.stderr and "starting vLLM" not in r.stderr


def test_the_weight_dumps_writeback_switch_reads_every_spelling_the_table_takes():
    """FV_DUMP_WRITEBACK=off passed the table's check and changed nothing: the dump compared the
    raw value with "0" (found by review, 2026-12-06)."""
    for given, read in (("off", "0"), ("no", "0"), ("false", "0"), ("0", "0"), ("1", "1"), (None, "1")):
        env = {} if given is None else {"FV_DUMP_WRITEBACK": given}
        assert runenv.value("FV_DUMP_WRITEBACK", env) == read, given
