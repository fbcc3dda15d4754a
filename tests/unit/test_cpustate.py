"""fvboot.cpustate: the AMX permission a restored process has lost, asked for again. On a CPU
with AMX (this project's CPU CI machines have it) the request must be granted and show in the
permitted mask, in a fresh process as after a restore; on one without, it must be refused with
a reason that names AMX. The e2e suite restores vLLM's CPU worker, which runs AMX kernels there."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fvboot import cpustate

REPO = Path(__file__).resolve().parents[2]
AMX = platform.machine() == "x86_64" and " amx_tile" in Path("/proc/cpuinfo").read_text()


def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from fvboot import cpustate\n" + code],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not AMX, reason="needs a CPU with AMX (amx_tile in /proc/cpuinfo)")
def test_amx_tile_data_is_granted_again():
    bit = 1 << cpustate.XFEATURE_XTILEDATA
    r = _in_fresh_process(f"before = cpustate.permitted()\n"
                          f"print(before & {bit}, cpustate.request({bit}), cpustate.permitted() & {bit})")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("[")[0].strip() == "0"  # a fresh process has not asked yet
    assert "['AMX tile data']" in r.stdout and r.stdout.strip().endswith(str(bit))


@pytest.mark.skipif(AMX or platform.machine() != "x86_64", reason="this CPU has AMX: the refusal cannot happen here")
def test_a_cpu_without_amx_is_refused_naming_it():
    with pytest.raises(cpustate.PermissionRefused, match="AMX tile data .* baked on a CPU with AMX"):
        cpustate.request(1 << cpustate.XFEATURE_XTILEDATA)


def test_nothing_recorded_asks_for_nothing():
    assert cpustate.request(0) == []
    assert cpustate.request(cpustate.permitted() & ~(1 << cpustate.XFEATURE_XTILEDATA)) == []
