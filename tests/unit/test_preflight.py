"""`fvboot check`'s verdict where there is nothing to restore or the manifest cannot be read: one
line each, never a traceback. `criu check` is stood in for (it needs CRIU's rights, which the e2e
test `test_restore.py::test_check_says_whether_a_start_here_would_restore_and_why_not` has)."""

from __future__ import annotations

import subprocess

import pytest

from fvboot import preflight
from fvboot.layout import Layout


@pytest.fixture(autouse=True)
def criu_looks_good(monkeypatch):
    monkeypatch.setattr(preflight, "criu_check", lambda: subprocess.CompletedProcess(["criu"], 0, "Looks good.\n", ""))
    monkeypatch.setattr(preflight, "running_server", lambda: None)  # a container's server is in the host's /proc


def test_an_image_without_a_checkpoint_says_so(tmp_path):
    usable, lines = preflight.check(Layout(tmp_path), [])
    assert not usable
    assert lines[-2] == "`criu check`: Looks good."
    assert lines[-1].startswith(f"the checkpoint would not be used here: no checkpoint in this image ({tmp_path}")


def test_a_manifest_that_cannot_be_read_is_one_line(tmp_path):
    layout = Layout(tmp_path)
    layout.manifest.mkdir(parents=True)  # a folder where the manifest should be
    usable, lines = preflight.check(layout, [])
    assert not usable and lines[-1].startswith(f"the checkpoint would not be used here: cannot read {layout.manifest}")


def test_a_bad_setting_ends_the_check_as_it_would_end_a_start(tmp_path, monkeypatch):
    monkeypatch.setenv("FV_WEIGHT_CHECK", "bogus")
    usable, lines = preflight.check(Layout(tmp_path), [])
    assert not usable and lines == ["a start would end at once: FV_WEIGHT_CHECK='bogus': expected inline or overlap"]


def test_a_failed_criu_check_is_said_in_an_image_without_a_checkpoint_too(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "criu_check",
                        lambda: subprocess.CompletedProcess(["criu"], 1, "", "Error: no ptrace\nsomething failed\n"))
    usable, lines = preflight.check(Layout(tmp_path), [])
    assert not usable and "`criu check` failed: something failed" in lines


def test_a_model_argument_that_is_not_the_baked_model_ends_the_check_as_it_would_end_a_start(tmp_path):
    usable, lines = preflight.check(Layout(tmp_path), ["bash"])
    assert not usable and lines[-1].startswith("a start would end at once: 'bash' was given as the model to serve")


def test_two_different_api_keys_end_the_check_as_they_would_end_a_start(tmp_path, monkeypatch):
    """`fvboot check` read the run's settings with steps of its own and did not look at the keys."""
    monkeypatch.setenv("FV_API_KEY", "a")
    usable, lines = preflight.check(Layout(tmp_path), ["--api-key", "b"])
    assert not usable and lines == ["a start would end at once: FV_API_KEY and --api-key are both set, to different keys;"
                                    " set one of them"]


def test_a_check_beside_this_containers_own_server_says_so(tmp_path, monkeypatch):
    """`docker exec C fvboot check` in a serving container (tried as an operator would, 2026-12-06)
    said the port was "taken ... by a process of the host": it is the container's own server's."""
    monkeypatch.setattr(preflight, "running_server", lambda: 41)
    usable, lines = preflight.check(Layout(tmp_path), [])
    assert lines[lines.index("`criu check`: Looks good.") - 1] == ("this container serves already (its server's init is pid 41, `docker exec`?): the checks"
                        " below are for a second start here, less the port, which that server holds; a node is"
                        " best tried in a container of its own (docker run --rm ... IMAGE check)")


def test_a_served_trees_init_is_found_by_its_command_line(tmp_path):
    from fvboot.launcher import running_server

    def proc(pid: str, argv: list[str]) -> None:
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    proc("7", ["/usr/bin/python3", "-c", "import fvboot.nsinit"])
    (tmp_path / "self").mkdir()
    (tmp_path / "9").mkdir()  # ended between the listing and the read: no cmdline
    assert running_server(str(tmp_path)) is None
    proc("41", ["/opt/venv/bin/python3", "-m", "fvboot.nsinit", "/opt/venv/bin/python3", "-m", "vllm"])
    assert running_server(str(tmp_path)) == 41


def test_criu_check_missing_or_stuck_is_a_failed_check_not_a_traceback(monkeypatch):
    """Found by review, 2026-12-06: `unshare` missing raised FileNotFoundError out of the check,
    and the call had no bound."""
    from fvboot import bake

    monkeypatch.setenv("PATH", "/nonexistent")
    r = bake.criu_check()
    assert r.returncode == 127 and "cannot run unshare" in r.stderr
    monkeypatch.setattr(bake, "CRIU_CHECK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(bake.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(subprocess.TimeoutExpired(a[0], 0.2)))
    assert "did not finish within 0.2 s" in bake.criu_check().stderr


def test_the_check_runs_in_fvboots_own_mounts_as_a_start_does(monkeypatch):
    """`IMAGE check` said "would be restored" where a start could not make its own /dev/shm
    (Docker's AppArmor profile denies mount) and fell back (found by review, 2026-12-06)."""
    from fvboot import cli, private_mounts

    order = []

    def isolate():  # stands in for a kernel that refuses (AppArmor), as the real one sets the reason
        order.append("isolate")
        private_mounts.not_isolated = "unshare(CLONE_NEWNS): Permission denied"
        return False, private_mounts.not_isolated

    monkeypatch.setattr(private_mounts, "not_isolated", "")
    monkeypatch.setattr(private_mounts, "isolate", isolate)
    monkeypatch.setattr(preflight, "check", lambda layout, argv: (order.append("check"), (False, []))[1])
    monkeypatch.setenv("FV_RUN_DIR", "/tmp")  # no run folder made here
    assert cli._check([]) == 1
    assert order == ["isolate", "check"]
