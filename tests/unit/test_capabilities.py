"""The served tree's init drops what only CRIU needs: checked on a real process's /proc status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fvboot.capabilities import RESTORE_ONLY, TREE_GIVES_UP, held

ENTRYPOINT_PARENT = str(Path(__file__).resolve().parents[2])


def _own() -> dict[str, set[str]]:
    return held(Path("/proc/self/status").read_text())


def test_held_reads_the_sets_of_a_status_text():
    text = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000200004\nCapBnd:\t000001ffffffffff\n"
    sets = held(text)
    assert sets["CapInh"] == set()
    assert sets["CapEff"] == {"CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"}
    assert sets["CapBnd"] == set(TREE_GIVES_UP) > set(RESTORE_ONLY)
    assert {"CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"} <= set(TREE_GIVES_UP)


def test_a_process_started_through_nsinit_holds_none_of_them_in_any_set():
    if "CAP_SYS_ADMIN" not in _own()["CapEff"]:
        pytest.skip("this test process has no CAP_SYS_ADMIN to give up")
    # nsinit runs `cat /proc/self/status` as the server it would start
    r = subprocess.run([sys.executable, "-m", "fvboot.nsinit", "cat", "/proc/self/status"],
                       capture_output=True, text=True, timeout=60, start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert "keeps CRIU's capabilities" not in r.stderr
    sets = held(r.stdout)
    assert set(sets) == {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}
    assert all(not names for names in sets.values()), sets
    assert "CAP_SYS_ADMIN" in _own()["CapEff"]  # the caller (fvboot, CRIU) keeps its own


def test_permitted_reads_this_processs_set_by_name():
    from fvboot.capabilities import CAP_NAMES, permitted

    mask = int(next(l for l in open("/proc/self/status") if l.startswith("CapPrm:")).split()[1], 16)
    assert permitted() == {CAP_NAMES[n] for n in range(mask.bit_length()) if mask >> n & 1}
    assert CAP_NAMES[21] == "SYS_ADMIN" and CAP_NAMES[40] == "CHECKPOINT_RESTORE"


def test_a_restore_needs_crius_capabilities_and_the_trees():
    from fvboot.capabilities import CONTAINER_CAPS, restore_lacks

    assert restore_lacks(("CHOWN",), frozenset(CONTAINER_CAPS) | {"CHOWN", "KILL"}) == []
    assert restore_lacks(("CHOWN", "KILL"), frozenset(CONTAINER_CAPS)) == ["CHOWN", "KILL"]
    assert restore_lacks(None, frozenset()) == sorted(CONTAINER_CAPS)
