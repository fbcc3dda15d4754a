"""The served tree's /proc carries the container's guards (found by hand, 2026-12-06: the tree's
fresh proc mount had none, and a process of a restored vLLM, root without capabilities, wrote
the host's kernel.core_pattern). The mountinfo lines are a Docker container's, on this project's
CPU machine; the namespace test runs nsinit for real, in namespaces made here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import proc_probe

from fvboot import manifest, proc_guard
from fvboot.compatibility import check_compatible
from fvboot.errors import CheckpointUnusable
from fvboot.proc_guard import Guard, guards

DOCKER = """\
1096 1003 0:157 / / rw,relatime master:493 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/A
90 89 0:43 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
91 89 0:44 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
95 89 0:46 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
65 90 0:43 /bus /proc/bus ro,nosuid,nodev,noexec,relatime - proc proc rw
66 90 0:43 /fs /proc/fs ro,nosuid,nodev,noexec,relatime - proc proc rw
67 90 0:43 /irq /proc/irq ro,nosuid,nodev,noexec,relatime - proc proc rw
68 90 0:43 /sys /proc/sys ro,nosuid,nodev,noexec,relatime - proc proc rw
99 90 0:43 /sysrq-trigger /proc/sysrq-trigger ro,nosuid,nodev,noexec,relatime - proc proc rw
69 90 0:48 / /proc/acpi ro,relatime - tmpfs tmpfs ro
70 90 0:44 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
71 90 0:44 /null /proc/timer_list rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
72 95 0:49 / /sys/firmware ro,relatime - tmpfs tmpfs ro
""".splitlines()


def test_the_guards_are_read_from_a_docker_containers_proc_mounts():
    assert guards(DOCKER) == [
        Guard("/proc/acpi", False), Guard("/proc/bus", True), Guard("/proc/fs", True), Guard("/proc/irq", True),
        Guard("/proc/keys", False), Guard("/proc/sys", True), Guard("/proc/sysrq-trigger", True),
        Guard("/proc/timer_list", False)]


def test_only_the_visible_procs_mounts_count_and_other_kinds_are_not_carried():
    host = [
        "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
        "40 22 0:35 / /proc/sys/fs/binfmt_misc rw,relatime shared:13 - autofs systemd-1 rw,fd=30",
        "41 22 0:21 /sys /proc/sys rw,nosuid - proc proc rw",  # a bind, but not read-only
        "50 1 0:60 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw",  # a fresh proc on top
        "51 50 0:44 /null /proc/kcore rw,nosuid - devtmpfs udev rw",
        "52 22 0:44 /null /proc/keys rw,nosuid - tmpfs tmpfs rw",  # on the proc underneath
        r"53 50 0:61 / /proc/a\040b ro - tmpfs tmpfs ro",
        "54 50 0:62 / /proc/driver/nvidia ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=555",  # NVIDIA's toolkit
        "55 54 0:60 /driver/nvidia/gpus/0000:00:1e.0 /proc/driver/nvidia/gpus/0000:00:1e.0 ro - proc proc rw",
    ]
    assert guards(host) == [Guard("/proc/a b", False), Guard("/proc/kcore", False),
                            Guard("/proc/driver/nvidia", False)]
    assert guards(["1 0 0:1 / / rw - ext4 /dev/vda rw"]) == []


def test_a_mask_under_a_read_only_part_of_proc_is_a_guard_too():
    """runc binds the read-only paths before it masks: a runtime that masks a path under
    /proc/sys puts that mask on the read-only bind, not on proc itself (found by review,
    2026-12-06: it was left out). Proc's own parts under a carried tmpfs go with the tmpfs."""
    nested = DOCKER + [
        "80 68 0:44 /null /proc/sys/kernel/core_pattern rw,nosuid - tmpfs tmpfs rw",
        "81 68 0:43 /sys/vm /proc/sys/vm ro,nosuid,nodev,noexec,relatime - proc proc rw",
        "82 81 0:50 / /proc/sys/vm/x ro - tmpfs tmpfs ro",
    ]
    found = guards(nested)
    assert Guard("/proc/sys/kernel/core_pattern", False) in found
    assert Guard("/proc/sys/vm", True) in found and Guard("/proc/sys/vm/x", False) in found
    assert found.index(Guard("/proc/sys", True)) < found.index(Guard("/proc/sys/vm", True)) \
        < found.index(Guard("/proc/sys/vm/x", False))  # shallowest first: each lands on its parent


@pytest.mark.parametrize("pid_namespace", [False, True], ids=["ordinary-process", "pid-namespace-only"])
def test_nsinit_refuses_to_replace_proc_outside_namespaces_of_its_own(pid_namespace):
    """Run as an ordinary process, or as PID 1 of a PID namespace that shares its starter's
    mounts (`unshare --pid --fork` without `--mount`), it must change nothing: detaching /proc
    there would take it from the container or the host. The second case runs inside a mount
    namespace made for the test, so that a fault here could not take this machine's /proc."""
    cmd = [sys.executable, "-m", "fvboot.nsinit", "--own-proc", "true"]
    if pid_namespace:
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("needs root and unshare(1) to make namespaces")
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'unshare --pid --fork "$@"; code=$?; test -e /proc/1/status || exit 99; exit $code', "sh", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "outside a PID and mount namespace of its own; nothing was changed" in r.stderr
    assert os.path.exists("/proc/self/status")


def test_the_tree_gets_a_fresh_proc_with_the_containers_guards_and_mounts():
    """A container's guards made here (a read-only /proc/sys, /proc/keys hidden behind
    /dev/null) and a folder filled as NVIDIA's toolkit fills /proc/driver/nvidia (a tmpfs with
    files), then nsinit started as ServedTree starts it: the server it runs sees its own PID
    namespace's proc with the same guards (the sysctl write is refused, EROFS; /proc/keys reads
    empty) and the same folder, with its files."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to make namespaces")
    if not os.path.exists("/proc/keys") or not os.path.isdir("/proc/driver"):
        pytest.skip("this kernel has no /proc/keys or /proc/driver")
    container = ("mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && "
                 "mount --bind /dev/null /proc/keys && mount -t tmpfs -o mode=755 none /proc/driver && "
                 "echo 'NVRM version: 580.1' > /proc/driver/version && mount -o remount,ro /proc/driver && "
                 'exec unshare --pid --fork --mount --propagation private "$0" -m fvboot.nsinit --own-proc '
                 '"$0" -c "$1"')
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", container, sys.executable,
                        proc_probe.SCRIPT], capture_output=True, text=True, timeout=60, start_new_session=True)
    assert r.returncode == 0, r.stderr
    import json
    seen = json.loads(r.stdout)
    assert seen["pid"] == 2 and seen["own"] == "2"  # nsinit is 1: this is its namespace's proc
    assert seen["sysctl"] == "EROFS"
    assert seen["keys"] == ""
    assert seen["driver"] == ["version"] and seen["version"] == "NVRM version: 580.1\n"


def test_a_checkpoint_whose_tree_had_an_unguarded_proc_gets_the_normal_start(tmp_path, monkeypatch):
    """An image baked before the guards: its restored server would have the unguarded /proc
    back, so it is not restored; the normal start runs under the container's own /proc. A
    container with no guards at all (recorded as none) restores."""
    import dataclasses

    from test_restore_steps import _manifest

    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: None)
    old = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), ()))
    with pytest.raises(CheckpointUnusable, match=r"^the checkpoint's server has a /proc without the container's "
                                                 r"guards .*could change the host's kernel settings; bake the image"
                                                 r" again$"):
        check_compatible(old, layout, [], port=False)
    monkeypatch.setattr(proc_guard, "container_guards", lambda: [])  # a host, or a container without guards
    for recorded in ((), ("/proc/sys", "/proc/keys")):
        guarded = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), (), proc_guards=recorded))
        assert manifest.Criu.from_json(guarded.criu.to_json()).proc_guards == recorded
        try:
            check_compatible(guarded, layout, [], port=False)
        except CheckpointUnusable as e:  # a later check may refuse this machine; not this one
            assert "guard" not in str(e)


def test_a_container_guarding_more_of_proc_than_the_bakes_gets_the_normal_start(tmp_path, monkeypatch):
    """The restored tree's /proc is the bake's, guards and all (found by review, 2026-12-06): a
    checkpoint baked where /proc had fewer guards (--privileged, systempaths=unconfined) would
    give the server parts of /proc this container's runtime guards. Refused by name; the
    same guards, or fewer here, restore; a mask only this container has (a path the bake's
    kernel lacked, /proc/scsi or /proc/asound by kernel option) is said and restores."""
    import dataclasses

    from test_restore_steps import _manifest

    layout, m = _manifest(tmp_path, {"kind": "cpu"})
    monkeypatch.setattr(manifest, "device_info", lambda lookup=None: manifest.Device("cpu"))
    monkeypatch.setattr(manifest, "verify_files", lambda home, files: None)
    here = [Guard("/proc/sys", True), Guard("/proc/irq", True), Guard("/proc/keys", False),
            Guard("/proc/kcore", False)]
    monkeypatch.setattr(proc_guard, "container_guards", lambda: here)
    refused = {(): "/proc/irq, /proc/sys",  # --privileged: nothing guarded
               ("/proc/sys",): "/proc/irq",  # a read-only part left writable
               ("/proc/sys", "/proc/irq"): "/proc/kcore, /proc/keys"}  # no mask at all
    for recorded, named in refused.items():
        baked = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), (), proc_guards=recorded))
        with pytest.raises(CheckpointUnusable, match=rf"^this container's runtime guards {named}, which the"
                                                     r" checkpoint's server has unguarded .*--privileged.*bake the"
                                                     r" image under the runtime's default guards$"):
            check_compatible(baked, layout, [], port=False)
    said = []
    monkeypatch.setattr("fvboot.compatibility.log", said.append)
    for recorded in (("/proc/keys", "/proc/kcore", "/proc/sys", "/proc/irq"),
                     ("/proc/keys", "/proc/kcore", "/proc/sys", "/proc/irq", "/proc/acpi"),
                     ("/proc/keys", "/proc/sys", "/proc/irq")):  # /proc/kcore: a kernel option the bake's lacked
        same = dataclasses.replace(m, criu=manifest.Criu("4.2", (), (), (), proc_guards=recorded))
        try:
            check_compatible(same, layout, [], port=False)
        except CheckpointUnusable as e:  # a later check may refuse this machine; not this one
            assert "guard" not in str(e)
    assert [l for l in said if "/proc/kcore" in l] == [
        "note: this container's runtime hides /proc/kcore in /proc, which the bake's kernel did not show: not"
        " hidden from the restored server"]


def test_container_guards_reads_fvboots_own_proc():
    """What the check compares: this process's /proc mounts (none on a host; a container's
    runtime's list inside one)."""
    with open("/proc/self/mountinfo") as f:
        assert proc_guard.container_guards() == guards(f)
