"""Never a hang, every failure to the normal start: bounded CRIU calls with reasons that say
why, the fallback after any exception (cleaning up what the restore left), docker stop during a
start, and the port and name a normal start waits on. Real processes, fake CRIU and server
commands (the real ones run in tests/e2e)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvboot import criu, manifest, restore, serve
from fvboot.errors import CheckpointUnusable, ManifestInvalid
from fvboot.launcher import Pipes, ServedTree, arg_value, server_port
from fvboot.layout import Layout


def _fake_criu(tmp_path, monkeypatch, script: str) -> None:
    tool = tmp_path / "criu"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    monkeypatch.setattr(criu, "_criu", lambda: [str(tool)])


def test_a_stuck_criu_restore_is_killed_and_said(tmp_path, monkeypatch):
    _fake_criu(tmp_path, monkeypatch, "exec sleep 60\n")
    monkeypatch.setenv("FV_CRIU_RESTORE_TIMEOUT_S", "0.5")
    t = time.monotonic()
    with pytest.raises(criu.CriuError, match="criu restore did not finish within 0.5 s and was killed"):
        criu.restore(tmp_path / "images", tmp_path / "work", [])
    assert time.monotonic() - t < 5


def test_a_stuck_criu_whose_tasks_hold_its_pipes_is_still_bounded(tmp_path, monkeypatch):
    """Found by review, 2026-12-06: after the kill, CRIU's output was read until its pipes
    closed, and a task it had started (a half-restored process) still held them: fvboot waited
    for ever. The read after the kill is bounded too."""
    # the stand-in's child keeps its stdout and stderr
    _fake_criu(tmp_path, monkeypatch, f"sleep 60 &\necho $! > {tmp_path}/child.pid\nexec sleep 60\n")
    monkeypatch.setenv("FV_CRIU_RESTORE_TIMEOUT_S", "0.5")
    monkeypatch.setattr(criu, "KILLED_WAIT_S", 1.0)
    t = time.monotonic()
    with pytest.raises(criu.CriuError, match="criu restore did not finish within 0.5 s and was killed"):
        criu.restore(tmp_path / "images", tmp_path / "work", [])
    assert time.monotonic() - t < 5
    os.kill(int((tmp_path / "child.pid").read_text()), 9)


def test_criu_without_capabilities_says_so_not_no_log(tmp_path, monkeypatch):
    """What CRIU 4.2 says in a container without the capabilities (seen at -v3): its earliest
    log line on stderr, and why it stops on stdout, before it opens its log."""
    _fake_criu(tmp_path, monkeypatch,
               'echo "(00.000000) CRIU run id = 3962868e-4072-4dfc-a33a-f16be105e3d0" >&2\n'
               'echo "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: "\n'
               'echo "setcap cap_checkpoint_restore+eip criu"\nexit 1\n')
    with pytest.raises(criu.CriuError) as e:
        criu.restore(tmp_path / "images", tmp_path / "work", [])
    assert "failed (exit 1): CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability:" \
           " (run the container with --cap-add SYS_ADMIN --cap-add SYS_PTRACE --cap-add NET_ADMIN --cap-add" \
           " DAC_READ_SEARCH --cap-add SYS_TIME --cap-add SYS_CHROOT --security-opt seccomp=unconfined" \
           " --security-opt apparmor=unconfined" \
           " --shm-size 1g (`fvbuild run-flags IMAGE` prints them, and a GPU image's GPUs))" in str(e.value)


def test_a_killed_criu_is_reported_as_killed_with_its_last_error(tmp_path, monkeypatch):
    _fake_criu(tmp_path, monkeypatch,
               'echo "(00.1) Error (criu/cr-restore.c:1): Can\'t fork for 7: File exists" > "$(dirname "$0")/work/criu-restore.log"\n'
               'echo "(00.2) Warn (criu/tty.c:1): tty: Unable to restore termios" >> "$(dirname "$0")/work/criu-restore.log"\n'
               'kill -9 $$\n')
    with pytest.raises(criu.CriuError) as e:
        criu.restore(tmp_path / "images", tmp_path / "work", [])
    assert "criu restore was killed by signal 9: Error (criu/cr-restore.c:1): Can't fork for 7" in str(e.value)


def test_last_error_ignores_the_harmless_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("(00.01) Error (criu/pie.c:1): Oops: real cause\n"
                   "(00.02) rlimit: Can't setup RLIMIT_NOFILE for self\n(00.03) tun: Unable to create tun: fail\n")
    assert criu.last_error(log) == "Error (criu/pie.c:1): Oops: real cause"
    assert criu.last_error(tmp_path / "none.log") == "no log and no output"


def test_last_error_names_the_failure_not_that_the_restore_failed(tmp_path):
    """CRIU's last Error lines only say a task exited and the restore failed; the line before
    them says what failed, and a socket that cannot be bound again is explained (CRIU 4.2.1's
    words, from a GPU image restored in a container of another network, 2026-12-05)."""
    log = tmp_path / "restore.log"
    log.write_text("(00.000910) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
                   "(00.023716)    108: Error (soccr/soccr.c:499): Can't bind inet socket back: Cannot assign requested address\n"
                   "(00.023736)    108: Error (criu/files.c:1221): Unable to open fd=40 id=0x1c2\n"
                   "(00.024852)      2: Error (criu/cr-restore.c:1315): 108 exited, status=1\n"
                   "(00.026498) Error (criu/cr-restore.c:2381): Restoring FAILED.\n"
                   "(00.039026) Error (criu/cr-restore.c:1319): 6 killed by signal 9: Killed\n")  # at times, after
    said = criu.last_error(log)
    assert said.startswith("108: Error (soccr/soccr.c:499): Can't bind inet socket back"), said
    assert "bound to an address this container's network does not have" in said
    log.write_text("(00.02) 2: Error (criu/cr-restore.c:1315): 108 exited, status=1\n"
                   "(00.03) Error (criu/cr-restore.c:2381): Restoring FAILED.\n")
    assert criu.last_error(log) == "Error (criu/cr-restore.c:2381): Restoring FAILED."


@pytest.mark.parametrize("args, port", [
    ([], 8000), (["--port", "9000"], 9000), (["--port=9001"], 9001),
    (["--port", "8000", "--max-model-len", "5", "--port=9002"], 9002), (["--port"], 8000),
])
def test_the_port_to_wait_on_is_the_one_vllm_gets(args, port):
    cmd = ["python", "-m", "vllm", "--port", "8000", *args]
    assert server_port(cmd) == (port if args else 8000)
    assert arg_value(["--served-model-name", "a", "--served-model-name=b"], "--served-model-name") == "b"


def _layout(tmp_path, monkeypatch, manifest_text=None) -> Layout:
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    layout = Layout(tmp_path / "fv")
    layout.home.mkdir()
    if manifest_text is not None:
        layout.manifest.write_text(manifest_text)
    return layout


def _baked(command: list[str], args: list[str], name: str, port: int) -> dict:
    """A manifest as the bake writes it (its required fields; a CPU bake)."""
    return {"format": manifest.FORMAT, "model": {"served_name": name},
            "vllm": {"command": command, "args": args, "port": port}, "device": {"kind": "cpu"},
            "pipes": {"stdout": "pipe:[1]", "stderr": "pipe:[2]"}, "files": [], "probe": []}


BAKED = _baked(["py", "-m", "vllm", "--served-model-name", "synthetic:tiny", "--port", "8000",
                "--enable-sleep-mode", "--max-model-len", "512"], ["--max-model-len", "512"], "synthetic:tiny", 8000)


def test_normal_start_after_other_args_waits_on_their_port(tmp_path, monkeypatch):
    layout = _layout(tmp_path, monkeypatch)
    cmd, name, how = serve.launch_command(layout, manifest.Manifest.from_json(BAKED), ["--port", "9000"])
    assert cmd[-4:] == ["--max-model-len", "512", "--port", "9000"] and "--enable-sleep-mode" not in cmd
    assert server_port(cmd) == 9000 and name == "synthetic:tiny"
    assert how == "the baked command and ['--port', '9000']"


def test_a_port_or_name_the_environment_asks_for_is_what_the_normal_start_serves(tmp_path, monkeypatch):
    """FV_PORT / FV_SERVED_MODEL at docker run (the image's environment has FV_PORT at the baked
    port, which adds nothing); an argument after the image name still has the last word."""
    layout = _layout(tmp_path, monkeypatch)
    m = manifest.Manifest.from_json(BAKED)
    for same in ("8000", " 08000 "):  # the port as the settings table reads it
        monkeypatch.setenv("FV_PORT", same)
        assert serve.launch_command(layout, m, [])[2] == "the baked command"
    monkeypatch.setenv("FV_PORT", "9000")
    monkeypatch.setenv("FV_SERVED_MODEL", "other")
    cmd, name, how = serve.launch_command(layout, m, [])
    assert cmd[-4:] == ["--port", "9000", "--served-model-name", "other"] and server_port(cmd) == 9000
    assert name == "other" and how == "the baked command and ['--port', '9000', '--served-model-name', 'other']"
    cmd, name, _ = serve.launch_command(layout, m, ["--port", "9100"])
    assert server_port(cmd) == 9100


def test_a_secret_given_to_a_normal_start_is_not_in_the_line_saying_how(tmp_path, monkeypatch):
    layout = _layout(tmp_path, monkeypatch)
    cmd, _, how = serve.launch_command(layout, manifest.Manifest.from_json(BAKED), ["--hf-token", "hf_s3cret"])
    assert cmd[-2:] == ["--hf-token", "hf_s3cret"] and "s3cret" not in how


def test_a_damaged_manifest_still_gives_the_baked_name_and_args(tmp_path, monkeypatch):
    text = json.dumps(BAKED)
    layout = _layout(tmp_path, monkeypatch, text[: text.index('"port"')])  # truncated
    cmd, name, how = serve.launch_command(layout, None, [])
    assert name == "synthetic:tiny" and cmd[-2:] == ["--max-model-len", "512"]
    assert "--enable-sleep-mode" not in cmd
    assert "baked name, arguments read from the damaged manifest" in how
    layout.manifest.write_text('{"format": 1, "model": {}}')  # valid JSON, keys missing
    with pytest.raises(ManifestInvalid, match="^manifest: model.served_name is missing$"):
        manifest.read(layout.manifest)
    cmd, name, how = serve.launch_command(layout, None, [])
    assert name == str(layout.model_dir) and "image's defaults" in how


@pytest.mark.parametrize("text, reason", [
    ("{", "is not valid JSON"), ("[1]", "is not a JSON object"), ('{"format": 2}', "manifest format 2 is not 1"),
    (json.dumps({**BAKED, "vllm": {**BAKED["vllm"], "args": "--max-model-len 512"}}),
     "manifest: vllm.args must be a list of strings"),
])
def test_a_manifest_that_does_not_validate_leads_to_the_normal_start_with_its_reason(tmp_path, monkeypatch, capfd,
                                                                                     text, reason):
    layout = _layout(tmp_path, monkeypatch, text)
    started = []
    monkeypatch.setattr(serve, "_cold_start", lambda *a: started.append(a) or "tree")
    assert serve._start(layout, [], None, serve.Timeline("t"), {}) == "tree"
    assert started[0][1] is None  # the normal start salvages what it can from the file
    err = capfd.readouterr().err
    assert "checkpoint not used: " in err and reason in err and "starting vLLM normally" in err


def test_any_exception_on_the_restore_path_ends_in_the_normal_start(tmp_path, monkeypatch, capfd):
    """Not only the listed types: a RuntimeError, after which what the restore left is killed."""
    layout = _layout(tmp_path, monkeypatch, json.dumps(BAKED))
    left = subprocess.Popen(["sleep", "60"])  # stands for a half-restored tree
    monkeypatch.setenv("FV_RESTORE", "1")

    def broken(*_a, **_k):
        raise RuntimeError("the namespace init did not start")

    started = []
    monkeypatch.setattr(serve.compatibility, "check_compatible", broken)
    monkeypatch.setattr(serve, "_cold_start", lambda *a: started.append(a) or "tree")
    assert serve._start(layout, [], None, serve.Timeline("t"), {}) == "tree"
    assert not Path(f"/proc/{left.pid}").exists()  # killed and reaped
    err = capfd.readouterr().err
    assert "checkpoint not used: RuntimeError: the namespace init did not start; starting vLLM normally" in err
    assert started and started[0][1] == manifest.Manifest.from_json(BAKED)


def test_a_refusal_before_criu_stops_its_own_kernel_probe_and_reports_no_leftovers(tmp_path, monkeypatch, capfd):
    """The `criu check` started beside the checks is fvboot's own: after a refusal by the checks
    it is let end (bounded: this one never would, and is killed), not reported as what "the
    failed restore left" (there was no restore)."""
    layout = _layout(tmp_path, monkeypatch, json.dumps(BAKED))
    monkeypatch.setenv("FV_RESTORE", "1")
    probes = []
    monkeypatch.setattr(serve.criu, "KDAT_WARM_WAIT_S", 0.3)
    monkeypatch.setattr(serve.criu, "warm_kernel_facts",
                        lambda: probes.append(subprocess.Popen(["sleep", "60"])) or probes[-1])

    def refused(*_a, **_k):
        raise CheckpointUnusable("baked on cuda, running on cpu")

    monkeypatch.setattr(serve.compatibility, "check_compatible", refused)
    monkeypatch.setattr(serve, "_cold_start", lambda *a: "tree")
    assert serve._start(layout, [], None, serve.Timeline("t"), {}) == "tree"
    assert probes and probes[0].returncode is not None  # stopped and reaped
    err = capfd.readouterr().err
    assert "checkpoint not used: baked on cuda, running on cpu; starting vLLM normally" in err
    assert "the failed restore left" not in err, err


def _serve_proc(tmp_path, command: list[str], **env) -> subprocess.Popen:
    home = tmp_path / "fv"
    home.mkdir(exist_ok=True)
    (home / "manifest.json").write_text(json.dumps(_baked(command, [], "m", 1)))
    return subprocess.Popen([sys.executable, "-m", "fvboot", "serve", "--home", str(home)],
                            env={**os.environ, "FV_RUN_DIR": str(tmp_path / "run"), "FV_RESTORE": "0", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_docker_stop_during_a_start_stops_it_at_once(tmp_path):
    marker = tmp_path / "server.pid"
    proc = _serve_proc(tmp_path, ["sh", "-c", f"echo $$ > {marker}; trap '' TERM; exec sleep 300", "--port", "1"])
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    server = int(marker.read_text())
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert time.monotonic() - t < 30
    assert "stopped by signal 15 before the server was serving" in err
    assert not Path(f"/proc/{server}").exists() or "zombie" in Path(f"/proc/{server}/status").read_text().lower()


def test_a_server_that_dies_before_healthy_ends_with_one_clear_line(tmp_path):
    proc = _serve_proc(tmp_path, ["false", "--port", "1"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "waiting up to 3600 s for it on port 1" in err
    assert err.strip().splitlines()[-1] == ("fvboot: the vLLM server exited before it became healthy "
                                            "(see its log above)")


def test_a_server_that_never_answers_ends_with_the_port_it_waited_on(tmp_path):
    proc = _serve_proc(tmp_path, ["sh", "-c", "exec sleep 60", "--port", "1"], FV_START_TIMEOUT_S="1")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "did not become healthy within 1 s" in err.strip().splitlines()[-1]


def test_terminate_kills_the_whole_tree_even_when_it_ignores_sigterm(tmp_path):
    marker = tmp_path / "grandchild.pid"
    script = (f"import os,signal,subprocess,time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
              f"p=subprocess.Popen(['sh','-c','trap \"\" TERM; echo $$ > {marker}; exec sleep 300']); time.sleep(300)")
    r, w = os.pipe()
    pipes = Pipes(r, w, r, w)
    tree = ServedTree([sys.executable, "-c", script], dict(os.environ), pipes, namespaced=False)
    deadline = time.monotonic() + 20
    while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    t = time.monotonic()
    tree.terminate(timeout=0.5)
    assert time.monotonic() - t < 12
    assert not tree.alive()
    time.sleep(0.2)
    status = Path(f"/proc/{grandchild}/status")
    assert not status.exists() or "zombie" in status.read_text().lower()
    os.close(r)
    os.close(w)


def test_nsinit_exits_127_when_the_server_cannot_start():
    r = subprocess.run([sys.executable, "-m", "fvboot.nsinit", "/nonexistent/vllm"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 127
    assert "cannot run /nonexistent/vllm" in r.stderr


def test_restored_tree_terminate_is_bounded(monkeypatch):
    tree = restore.RestoredTree(os.getpid())  # cannot be killed by us in this test: stands for a stuck one
    monkeypatch.setattr(os, "kill", lambda *a: None)
    monkeypatch.setattr(restore.RestoredTree, "alive", lambda self: True)
    t = time.monotonic()
    tree.terminate(timeout=0.3)
    assert time.monotonic() - t < 3


def test_a_missing_capability_is_named(tmp_path):
    """What CRIU 4.2 says in a container started without the documented capabilities: a note per
    capability it lacks, then that it needs them (on its stdout)."""
    log = tmp_path / "criu-restore.log"
    log.write_text("(00.000012) Version: 4.2.1\n(00.000300) Effective capability 40 missing\n"
                   "(00.000301) Effective capability 21 missing\n")
    said = "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: \n"
    assert criu.last_error(log, stdout=said).startswith(
        "CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE capability: (run the container with"
        " --cap-add SYS_ADMIN ")
    # without its stdout (a log alone), the notes name what it lacked
    log.write_text(log.read_text() + "(00.000302) CRIU needs to have the CAP_SYS_ADMIN or the CAP_CHECKPOINT_RESTORE"
                   " capability:\n")
    assert criu.last_error(log).startswith("Effective capability 40 missing (CAP_CHECKPOINT_RESTORE (SYS_ADMIN covers it)")


def test_a_capability_note_is_not_the_cause_where_criu_had_what_it_needs(tmp_path):
    """CRIU notes at debug level each capability it looks for and lacks, CHECKPOINT_RESTORE in
    every container (SYS_ADMIN covers it), and goes on: every failed bake dump was reported as
    that missing capability, the real error left out (found by review, 2026-12-06)."""
    log = tmp_path / "criu-dump.log"
    log.write_text("(00.000012) Version: 4.2.1\n(00.000300) Effective capability 40 missing\n"
                   "(00.120000) Error (criu/files.c:1180): send_fds failed (-22)\n"
                   "(00.120100) Error (criu/cr-dump.c:2100): Dumping FAILED.\n")
    assert criu.last_error(log) == "Error (criu/files.c:1180): send_fds failed (-22)"


def test_a_full_disk_that_stops_the_normal_start_too_is_one_line(tmp_path):
    """The run folder cannot be made (here: a file stands where it goes), as on a full or
    read-only disk: fvboot exits 1 with one line naming it, no traceback."""
    (tmp_path / "run").write_text("in the way")
    p = _serve_proc(tmp_path, [sys.executable, "-c", "pass"], FV_RUN_DIR=str(tmp_path / "run" / "sub"))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert "Traceback" not in err
    assert [l for l in err.splitlines() if l.startswith("fvboot: cannot make fvboot's run folder")], err


def test_an_os_error_of_the_normal_start_is_one_line(tmp_path):
    """The normal start fails on an OSError after the run folder exists (here: a directory
    stands where this start's runtime file goes): exit 1 and one line naming it, no traceback,
    no server left."""
    (tmp_path / "run" / "runtime.json").mkdir(parents=True)
    p = _serve_proc(tmp_path, ["sleep", "300", "--port", "1"])
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "fvboot: vLLM could not be started normally either: [Errno 21] Is a directory"), err


def _oom_cgroup(tmp_path, kills: int) -> Path:
    """A container's cgroup v2 memory files, as the kernel keeps them, with KILLS OOM kills."""
    d = tmp_path / "cgroup"
    d.mkdir(exist_ok=True)
    (d / "memory.events").write_text(f"oom 1\noom_kill {kills}\n")
    (d / "memory.max").write_text(str(128 << 20))
    return d


def test_a_restore_the_oom_killer_ended_says_so_before_what_fvboot_saw(tmp_path, monkeypatch, capfd):
    """What fvboot sees of a restored server the kernel killed for memory is a closed connection;
    the reason names the kill and the limit first."""
    from fvboot.oom import OomWatch

    layout = _layout(tmp_path, monkeypatch, json.dumps(BAKED))
    cgroup = _oom_cgroup(tmp_path, 0)
    watch = OomWatch(cgroup, tmp_path / "no-v1")

    def killed(*_a, **_k):
        _oom_cgroup(tmp_path, 1)
        raise ConnectionError("Remote end closed connection without response")

    monkeypatch.setenv("FV_RESTORE", "1")
    monkeypatch.setattr(serve.compatibility, "check_compatible", killed)
    monkeypatch.setattr(serve, "_cold_start", lambda *a: "tree")
    outcome: dict = {}
    assert serve._start(layout, [], None, serve.Timeline("t"), {}, outcome, None, watch) == "tree"
    assert outcome["reason"] == ("the kernel's OOM killer ended 1 of this container's processes: its memory limit,"
                                 " 128 MiB, is too small for the server; raise it (docker run --memory, or the pod's"
                                 " resources.limits.memory) (ConnectionError: Remote end closed connection without"
                                 " response)")
    assert f"checkpoint not used: {outcome['reason']}; starting vLLM normally" in capfd.readouterr().err


def test_a_normal_start_the_oom_killer_ended_names_it_in_its_last_line(tmp_path, monkeypatch):
    """vLLM prints nothing when the kernel kills one of its processes: fvboot's line says it."""
    from fvboot.errors import ServerDied
    from fvboot.oom import OomWatch

    layout = _layout(tmp_path, monkeypatch)
    watch = OomWatch(_oom_cgroup(tmp_path, 4), tmp_path / "no-v1")
    bump = f"printf 'oom 1\\noom_kill 5\\n' > {tmp_path / 'cgroup' / 'memory.events'}; exit 1"
    m = manifest.Manifest.from_json(_baked(["sh", "-c", bump, "--port", "1"], [], "m", 1))
    with pytest.raises(ServerDied) as e:
        serve._cold_start(layout, m, [], Pipes.create(), serve.Timeline("t"), {}, watch)
    assert str(e.value) == ("the vLLM server exited before it became healthy (see its log above): the kernel's OOM"
                            " killer ended 1 of this container's processes: its memory limit, 128 MiB, is too small"
                            " for the server; raise it (docker run --memory, or the pod's resources.limits.memory)")


PIVOT_ROOT_REFUSED = ("(00.2) 1: Error (criu/mount.c:2972): mnt: pivot_root(., crtools-put-root.A5Y2Ix) failed:"
                      " Operation not permitted\n")


@pytest.mark.parametrize("filtered", [True, False])
def test_a_call_the_seccomp_filter_refused_is_said_as_such(tmp_path, monkeypatch, filtered):
    """CRIU 4.2.1's words under Docker's default seccomp profile (2026-12-05): refused by the
    filter, not by a capability; said so only where a filter is on."""
    log = tmp_path / "restore.log"
    log.write_text(PIVOT_ROOT_REFUSED)
    monkeypatch.setattr(criu, "seccomp_filtered", lambda: filtered)
    said = criu.last_error(log)
    assert said.startswith("1: Error (criu/mount.c:2972): mnt: pivot_root(., crtools-put-root.A5Y2Ix) failed:")
    assert ("this container runs under a seccomp filter, which refuses calls CRIU makes: run the container with"
            in said) == filtered
    assert ("--security-opt seccomp=unconfined" in said) == filtered


def test_what_a_failed_restore_leaves_running_after_the_kill_is_named(monkeypatch, capfd):
    """A restored worker stuck in a driver call outlives SIGKILL for a while, holding its port and
    GPU memory: the normal start that follows would fail on them, so the survivors are named
    (found by review, 2026-12-06: they were left silently)."""
    from fvboot import serve

    child = subprocess.Popen(["sleep", "60"])
    monkeypatch.setattr(serve, "_running", lambda pid: pid == child.pid)  # as one in D state would be
    try:
        assert child.pid in serve.kill_children(timeout=0.2)
    finally:
        child.kill()
        child.wait(10)
    assert f"1 process(es) still ran 0.2 s after SIGKILL (pid {child.pid};" in capfd.readouterr().err


def test_a_thread_criu_could_not_create_names_the_process_limit(tmp_path):
    """A Kubernetes pod's pids limit is on the pod's cgroup, which the container's own does not
    show, so fvboot's check before CRIU passes and CRIU fails with EAGAIN: its line alone did not
    say what to change (found by review, 2026-12-06)."""
    log = tmp_path / "criu-restore.log"
    log.write_text("(00.300000) Error (criu/cr-restore.c:1500): Unable to create a thread: -11\n"
                   "(00.300100) Error (criu/cr-restore.c:2400): Restoring FAILED.\n")
    said = criu.last_error(log)
    assert said.startswith("Error (criu/cr-restore.c:1500): Unable to create a thread: -11 (the process limit")
    assert "a Kubernetes pod's pids limit" in said
