"""fvboot's own /dev/shm (private_shm): real mount namespaces, in child processes, as root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fvboot.capabilities import held
from fvboot.private_shm import isolate

# A child that isolates, writes a file into its /dev/shm and reports what it sees.
CHILD = """
import json, os, sys
from fvboot.private_shm import isolate
before = os.statvfs("/dev/shm")
done, why = isolate()
name = sys.argv[1]
seen = {"done": done, "why": why, "listing": sorted(os.listdir("/dev/shm"))}
after = os.statvfs("/dev/shm")
seen["same_size"] = before.f_blocks * before.f_frsize == after.f_blocks * after.f_frsize
if done:
    open(f"/dev/shm/{name}", "w").write("x")
    seen["mine"] = os.path.exists(f"/dev/shm/{name}")
print(json.dumps(seen))
"""


def _needs_root_with_sys_admin() -> None:
    if os.geteuid() != 0 or "CAP_SYS_ADMIN" not in held(Path("/proc/self/status").read_text())["CapEff"]:
        pytest.skip("needs root with CAP_SYS_ADMIN (mount namespaces)")
    if not os.path.isdir("/dev/shm"):
        pytest.skip("this machine has no /dev/shm")


def _child(*prefix: str) -> tuple[dict, str]:
    name = f"fv-private-shm-test-{uuid.uuid4().hex}"
    r = subprocess.run([*prefix, sys.executable, "-c", CHILD, name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), name


def test_a_process_gets_an_empty_dev_shm_of_the_same_size_that_nothing_outside_sees():
    _needs_root_with_sys_admin()
    marker = Path("/dev/shm") / f"fv-private-shm-outside-{uuid.uuid4().hex}"
    marker.write_text("outside")  # what another container on an --ipc=host machine would have there
    try:
        seen, name = _child()
    finally:
        marker.unlink()
    assert seen["done"], seen["why"]
    assert seen["listing"] == []  # neither the outside's file nor anything else
    assert seen["same_size"]
    assert seen["mine"]
    assert not (Path("/dev/shm") / name).exists()  # the child's file stayed in its own tmpfs


def test_without_cap_sys_admin_it_says_why_and_leaves_dev_shm_as_it_was():
    _needs_root_with_sys_admin()
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("no setpriv (util-linux) to drop CAP_SYS_ADMIN with")
    seen, _ = _child(setpriv, "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--")
    assert not seen["done"]
    assert "Operation not permitted" in seen["why"]
    assert "mine" not in seen


def test_a_missing_dev_shm_is_said_not_raised(tmp_path):
    done, why = isolate(str(tmp_path / "absent"))
    assert not done
    assert "cannot be read" in why
