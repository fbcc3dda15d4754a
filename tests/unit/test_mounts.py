"""The mounts a checkpoint takes with it (found by hand, 2026-12-06: an image baked by Docker on
a cgroup v1 host fell back under containerd's `ctr run`, CRIU saying only "mnt-v2: Can't stat
mountpoint .../cpu"). The image file is the mount namespace of a CPU bake on this project's
machine (Docker 20.10, cgroup v1), from before the bake detached the cgroup mounts; the detach
runs for real in namespaces made here."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fvboot import manifest, mounts
from fvboot.compatibility import check_compatible
from fvboot.errors import CheckpointUnusable

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "criu-mounts"


def test_the_paths_a_restore_binds_from_are_read_from_crius_images():
    got = mounts.needed(GOLDEN)
    assert {"/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/etc/hosts", "/etc/resolv.conf",
            "/etc/hostname", "/sys/fs/cgroup", "/sys/fs/cgroup/cpu", "/proc/keys"} <= set(got)
    assert "/" not in got and "/proc" not in got  # the root and the tree's own proc are not bound from here
    assert got == tuple(sorted(set(got)))
    assert mounts.needed(GOLDEN / "nothing-here") == ()


def test_a_container_without_a_path_the_checkpoint_binds_from_is_refused_by_name(tmp_path, monkeypatch):
    from test_restore_steps import _manifest

    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: None)
    here = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), (), None, None, ("/dev", str(tmp_path))))
    gone = dataclasses.replace(here, criu=dataclasses.replace(here.criu, mounts=("/dev", "/sys/fs/cgroup/nope")))
    with pytest.raises(CheckpointUnusable, match=r"^this container has no /sys/fs/cgroup/nope, which the "
                                                 r"checkpoint's mounts are bound from .*Kubernetes, restores\)$"):
        check_compatible(gone, layout, [], port=False)
    for fine in (here, dataclasses.replace(here, criu=dataclasses.replace(here.criu, mounts=None))):
        try:
            check_compatible(fine, layout, [], port=False)
        except CheckpointUnusable as e:  # a later check may refuse this machine; not this one
            assert "which the checkpoint's mounts are bound from" not in str(e)


def test_the_manifest_keeps_the_mounts_and_reads_an_older_one_without_them():
    c = manifest.Criu("4.2", (), (), (), None, None, ("/dev", "/etc/hosts"))
    assert manifest.Criu.from_json(c.to_json()).mounts == ("/dev", "/etc/hosts")
    old = manifest.Criu.from_json({"version": "4.2"})
    assert old.mounts is None and "mounts" not in old.to_json()


def _needs_namespaces():
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("needs root, unshare(1) and nsenter(1) to make namespaces")


def _our_cgroup_mounts() -> list[str]:
    """This namespace's mounts at and below /sys/fs/cgroup, what a detach in the wrong namespace
    would take (the whole table changes whenever Docker starts a container beside the tests)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == mounts.CGROUPS or line.split()[4].startswith(mounts.CGROUPS + "/")]


def test_the_cgroup_mounts_are_detached_from_a_served_trees_namespace_only():
    """A tree of its own (PID and mount namespaces, a tmpfs on /sys/fs/cgroup with a mount inside
    it, as a cgroup v1 container has, here stacked on this machine's own cgroup mounts): the
    detach takes them all from that namespace and leaves this one's as they were."""
    _needs_namespaces()
    ours = _our_cgroup_mounts()
    tree = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs none {mounts.CGROUPS} && mkdir {mounts.CGROUPS}/cpu && "
         f"mount -t tmpfs none {mounts.CGROUPS}/cpu && exec sleep 60"],
        start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        init = None
        while time.monotonic() < deadline and init is None:
            kids = Path(f"/proc/{tree.pid}/task/{tree.pid}/children").read_text().split()
            if kids and any(l.split()[4] == f"{mounts.CGROUPS}/cpu" for l in Path(f"/proc/{kids[0]}/mountinfo").open()):
                init = int(kids[0])
            time.sleep(0.05)
        assert init, "the stand-in tree did not start"
        assert mounts.detach_cgroups(init) is True
        left = [l.split()[4] for l in Path(f"/proc/{init}/mountinfo").open()]
        assert not [p for p in left if p.startswith(mounts.CGROUPS)], left
        assert mounts.detach_cgroups(init) is False  # nothing mounted there any more
        assert _our_cgroup_mounts() == ours
    finally:
        os.killpg(tree.pid, 9)
        tree.wait(10)


def test_a_process_that_is_not_a_trees_init_is_refused_and_nothing_is_detached():
    ours = _our_cgroup_mounts()
    with pytest.raises(mounts.MountsError, match=r"is not the init of a served tree's own namespaces: nothing detached"):
        mounts.detach_cgroups(os.getpid())
    assert _our_cgroup_mounts() == ours


def test_missing_here_names_only_what_is_not_there(tmp_path):
    (tmp_path / "file").write_text("")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert mounts.missing_here([str(tmp_path / "file"), str(tmp_path / "no"), str(tmp_path / "dangling")]) == [
        str(tmp_path / "no")]
