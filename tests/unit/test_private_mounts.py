"""fvboot's own mounts (private_mounts): real mount namespaces, in child processes, as root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fvboot.capabilities import held
from fvboot.private_mounts import isolate

# A child that isolates, writes a file into its /dev/shm and reports what it sees.
CHILD = """
import json, os, sys
from fvboot.private_mounts import isolate
before = os.statvfs("/dev/shm")
done, why = isolate()
name = sys.argv[1]
seen = {"done": done, "why": why, "listing": sorted(os.listdir("/dev/shm"))}
after = os.statvfs("/dev/shm")
seen["same_size"] = before.f_blocks * before.f_frsize == after.f_blocks * after.f_frsize
if done:
    open(f"/dev/shm/{name}", "w").write("x")
    seen["mine"] = os.path.exists(f"/dev/shm/{name}")
seen["tmp_kept"] = os.path.exists(sys.argv[2])  # a writable /tmp is left as it was
print(json.dumps(seen))
"""


def _needs_root_with_sys_admin() -> None:
    if os.geteuid() != 0 or "CAP_SYS_ADMIN" not in held(Path("/proc/self/status").read_text())["CapEff"]:
        pytest.skip("needs root with CAP_SYS_ADMIN (mount namespaces)")
    if not os.path.isdir("/dev/shm"):
        pytest.skip("this machine has no /dev/shm")


def _child(*prefix: str) -> tuple[dict, str]:
    name = f"fv-private-shm-test-{uuid.uuid4().hex}"
    marker = Path("/tmp") / f"{name}.tmp-marker"
    marker.write_text("x")
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", CHILD, name, str(marker)], capture_output=True, text=True,
                           timeout=60)
    finally:
        marker.unlink()
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


def test_a_missing_dev_shm_is_said_not_raised(tmp_path, monkeypatch):
    from fvboot import private_mounts

    monkeypatch.setattr(private_mounts, "not_isolated", "")  # this process's, put back after
    done, why = isolate(str(tmp_path / "absent"))
    assert not done
    assert "cannot be read" in why
    assert private_mounts.not_isolated == why  # what a restore is then refused with


def test_the_bakes_dev_shm_archive_leaves_fvboots_run_folder_out(tmp_path):
    """The bake saves /dev/shm for the restore; its run folder there holds the bake's admin
    token, which must be in no checkpoint."""
    import subprocess as sp

    from fvboot.bake import save_dev_shm

    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    tag = uuid.uuid4().hex
    queue, run = Path(f"/dev/shm/fv-test-queue-{tag}"), Path(f"/dev/shm/fv-test-run-{tag}")
    queue.write_bytes(b"q")
    run.mkdir()
    (run / "runtime.json").write_text('{"admin_token": "secret"}')
    try:
        save_dev_shm(tmp_path / "dev-shm.tar", run)
    finally:
        shutil.rmtree(run)
        queue.unlink()
    names = sp.run(["tar", "-tf", str(tmp_path / "dev-shm.tar")], capture_output=True, text=True, check=True).stdout.split()
    assert queue.name in names
    assert not [n for n in names if n.startswith(run.name)]


# A child that isolates with /tmp standing in for a read-only one (a read-only bind of a folder)
# and reports whether it can write there afterwards.
READ_ONLY_TMP = """
import json, os, subprocess, sys
tmp = sys.argv[1]
subprocess.run(["mount", "--bind", "-o", "ro", tmp, tmp], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", tmp, tmp], check=True)
before = os.access(tmp, os.W_OK)
from fvboot.private_mounts import isolate
done, why = isolate(tmp=tmp)
print(json.dumps({"before": before, "done": done, "why": why, "after": os.access(tmp, os.W_OK),
                  "listing": os.listdir(tmp)}))
"""


def test_a_read_only_tmp_gets_a_writable_tmpfs_and_a_writable_one_is_kept(tmp_path):
    _needs_root_with_sys_admin()
    if not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs unshare and mount (util-linux)")
    ro = tmp_path / "ro-tmp"
    ro.mkdir()
    (ro / "baked").write_text("the image's own /tmp")
    # in a mount namespace of its own, so the read-only bind never reaches this machine's
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", READ_ONLY_TMP,
                        str(ro)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["done"], seen["why"]
    assert not seen["before"] and seen["after"]
    assert seen["listing"] == []  # a fresh tmpfs over the read-only folder
    seen, _ = _child()  # this machine's /tmp is writable: left as it is
    assert seen["done"] and seen["tmp_kept"]
    assert (ro / "baked").read_text() == "the image's own /tmp"


# A child in a mount namespace of its own: FV_HOME's cache folder made read-only (as under
# docker run --read-only), then the normal start's writable_caches(); it reports what it can do:
# whether the start's cache folder (the copy, where the settings were moved to one) takes a write.
READ_ONLY_CACHES = """
import json, os, subprocess, sys
from pathlib import Path
home, run, tmp = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
cache = home / "cache"
subprocess.run(["mount", "--bind", str(cache), str(cache)], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", str(cache), str(cache)], check=True)
os.environ.update(FV_RUN_DIR=run, TMPDIR=tmp, VLLM_CACHE_ROOT=str(cache / "vllm"),
                  TRITON_CACHE_DIR=str(cache / "triton"), HF_HOME=str(cache / "hf"))
volume = home.parent / "hf-volume"  # a writable volume mounted below the caches (examples/kubernetes)
volume.mkdir()
subprocess.run(["mount", "--bind", str(volume), str(cache / "hf")], check=True)
if len(sys.argv) > 4:  # CAP_SYS_ADMIN given up now that the read-only bind is made (docker run --user)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(24, 21, 0, 0, 0) == 0  # PR_CAPBSET_DROP CAP_SYS_ADMIN
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    libc.capget(hdr, data)
    data[0] &= ~(1 << 21); data[1] &= ~(1 << 21)  # effective, permitted (CAP_SYS_ADMIN = 21)
    assert libc.capset(hdr, data) == 0
from fvboot.layout import Layout
from fvboot.caches import writable_caches
moved = writable_caches(Layout(home))
start = Path(moved.get("VLLM_CACHE_ROOT", cache / "vllm"))
try:
    (start / "lock").write_text("x")
    wrote = True
except OSError:
    wrote = False
print(json.dumps({"wrote": wrote, "baked": (start / "baked").read_text(), "moved": moved}))
"""


def _read_only_caches(tmp_path, *drop: str) -> tuple[dict, str]:
    home = tmp_path / "fv"
    (home / "cache" / "vllm").mkdir(parents=True)
    (home / "cache" / "hf").mkdir()
    (home / "cache" / "vllm" / "baked").write_text("compiled at bake")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", READ_ONLY_CACHES,
                        str(home), str(tmp_path / "run"), str(tmp_path / "tmp"), *drop],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (home / "cache" / "vllm" / "lock").exists()  # nothing reached the image's folder
    return json.loads(r.stdout.splitlines()[-1]), r.stderr


def _needs_unshare_and_mount():
    _needs_root_with_sys_admin()
    if not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs unshare and mount (util-linux)")


def test_read_only_caches_get_an_overlay_in_memory_for_a_normal_start(tmp_path):
    _needs_unshare_and_mount()
    seen, err = _read_only_caches(tmp_path)
    assert seen == {"wrote": True, "baked": "compiled at bake", "moved": {}}
    assert "are read-only here (docker run --read-only?): what this start writes there goes to memory" in err


def test_caches_a_user_without_the_capability_for_an_overlay_cannot_write_are_copied(tmp_path):
    """docker run --user: no overlay; the start gets a copy of each cache a setting names in the
    temporary folder, that setting moved there (one the bake never made, an empty folder), the
    image's folder untouched; a writable volume mounted below the caches is left where it is."""
    _needs_unshare_and_mount()
    (tmp_path / "tmp").mkdir()
    earlier = tmp_path / "tmp" / f"fvboot-cache-{socket.gethostname()}-earlier"  # a start before docker restart
    (earlier / "vllm").mkdir(parents=True)
    others = tmp_path / "tmp" / "fvboot-cache-another-container-x"  # a /tmp shared with another container
    others.mkdir()
    seen, err = _read_only_caches(tmp_path, "drop")
    assert not earlier.exists() and others.exists()
    others.rmdir()
    [copy] = list((tmp_path / "tmp").iterdir())
    assert seen == {"wrote": True, "baked": "compiled at bake",
                    "moved": {"VLLM_CACHE_ROOT": f"{copy}/vllm", "TRITON_CACHE_DIR": f"{copy}/triton"}}
    assert sorted(p.name for p in copy.iterdir()) == ["triton", "vllm"]
    assert (f"cannot be written here (docker run --read-only?): this start uses a copy of them in {copy}"
            " (TRITON_CACHE_DIR, VLLM_CACHE_ROOT)") in err


def test_caches_that_can_be_neither_overlaid_nor_copied_are_said_and_no_half_copy_is_left(tmp_path):
    _needs_unshare_and_mount()
    (tmp_path / "fv" / "cache" / "triton").mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:  # a file no copy can take
        s.bind(str(tmp_path / "fv" / "cache" / "triton" / "sock"))
        seen, err = _read_only_caches(tmp_path, "drop")
    assert seen == {"wrote": False, "baked": "compiled at bake", "moved": {}}
    assert "cannot be written here (docker run --read-only?) and neither an overlay (mounting an overlay on" in err
    assert ": Operation not permitted) nor a copy (copying " in err and "/triton/sock to " in err
    assert "No such device or address" in err and "could make them so: vLLM's start needs to write there" in err
    assert list((tmp_path / "tmp").iterdir()) == []


def test_without_its_own_dev_shm_fvboot_takes_a_run_folder_of_its_own():
    """Found by review, 2026-12-06: without CAP_SYS_ADMIN fvboot kept the /dev/shm it was given
    (under --ipc=host the host's), and its run folder there, /dev/shm/.fvboot, with this start's
    admin token and API key, was the same for every such container and anyone on the host who
    made it first. Now the start makes one of its own (0700, a random name) and says why; and
    removes it when it ends (found by review, 2026-12-06: in a shared /dev/shm it outlived the
    container, key and all, one more at each start)."""
    _needs_root_with_sys_admin()
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("no setpriv (util-linux) to drop CAP_SYS_ADMIN with")
    code = ("import json, os, stat; from fvboot import cli, private_mounts\n"
            "with cli._own_mounts():\n"
            "    d = os.environ['FV_RUN_DIR']; st = os.stat(d); open(d + '/runtime.json', 'w').write('{}')\n"
            "    seen = {'dir': d, 'mode': stat.S_IMODE(st.st_mode), 'why': private_mounts.not_isolated}\n"
            "print(json.dumps({**seen, 'left': os.path.exists(d)}))")
    env = {k: v for k, v in os.environ.items() if k != "FV_RUN_DIR"}
    r = subprocess.run([setpriv, "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert seen["dir"].startswith("/dev/shm/.fvboot-") and seen["mode"] == 0o700, seen
    assert not seen["left"], seen
    assert "Operation not permitted" in seen["why"]
    assert "fvboot: /dev/shm and /tmp are the ones this container was given" in r.stderr


def test_a_run_folder_another_user_made_or_may_write_is_refused(tmp_path):
    """What a host user could plant where fvboot's run folder goes: a folder of theirs, one open
    to all, a link to elsewhere. Each is refused by name, before the token is written there; a
    temporary file planted under the name of the one fvboot writes is not written through."""
    from fvboot.runtime_file import RunFolderNotOurs, private_folder, write_runtime_settings

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 1000, 1000)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    for folder, words in ((theirs, "owner uid 1000, "), (open_to_all, "owner uid 0, mode drwxrwxrwx"),
                          (link, "owner uid 0, mode l")):
        with pytest.raises(RunFolderNotOurs, match=rf"run folder {folder} is not its own \({words}"):
            write_runtime_settings(folder / "runtime.json")
        assert not (folder / "runtime.json").exists()
    ours = private_folder(tmp_path / "ours")
    planted = ours / f".runtime.json.{os.getpid()}.tmp"  # the name the temp file had before
    planted.symlink_to(tmp_path / "stolen")
    token = write_runtime_settings(ours / "runtime.json")
    assert not (tmp_path / "stolen").exists() and token in (ours / "runtime.json").read_text()
