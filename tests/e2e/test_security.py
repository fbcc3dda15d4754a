"""Security and stop behaviour of a restored container, for real (vLLM, CRIU, Docker): every route
the restored server registers beyond the public API is closed to clients, whatever the path's
spelling; the admin token is per container and in no layer; docker stop ends a start at once.
The route list comes from the server itself (its /openapi.json), not from our allowlist."""

from __future__ import annotations

import http.client
import json
import subprocess
import time

import pytest
import requests

import proc_probe

from fvboot.layout import ADMIN_HEADER
from fvboot.middleware import is_public
from test_restore import (PORT, RUN_DIR, URL, Container, _answers, _assert_same_as_bake, _completion_body,  # noqa: F401
                          _fallback_line, _logs, _probe_asks, _wait_log, _wait_ready, docker_compose_command, docker_compose_file, docker_setup, gpu_flags, manifest,
                          port_free)

pytestmark = [pytest.mark.docker, pytest.mark.e2e]
RUNTIME_FILE = f"{RUN_DIR}/runtime.json"


def _request(method: str, path: str, headers: dict | None = None, body: bytes = b"{}") -> int:
    """Sent as written: no client-side normalisation of `//`, `.` or `..`."""
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        return conn.getresponse().status
    finally:
        conn.close()


def _token(container: str) -> str:
    out = subprocess.run(["docker", "exec", container, "cat", RUNTIME_FILE], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)["admin_token"]


def test_only_the_public_api_answers_clients(baked_image, manifest, port_free):
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        token = _token(c.id)
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        conn.request("GET", "/openapi.json", headers={ADMIN_HEADER.decode(): token})
        spec = json.loads(conn.getresponse().read())
        conn.close()
        routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        closed = sorted((m, p.replace("{", "x").replace("}", "")) for m, p in routes if not is_public(p))
        names = {p for _, p in closed}
        # the dev routes every vLLM build of this version registers (some add more, e.g. /weight_checker)
        assert {"/abort_requests", "/collective_rpc", "/sleep"} <= names, names
        refused = {(m, p): _request(m, p) for m, p in closed}
        assert all(code in (403, 404) for code in refused.values()), refused
        for path in ("//sleep", "/sleep/", "/v1/../sleep", "/./collective_rpc", "/v1/%2e%2e/weight_checker",
                     "/%2Fabort_requests", "/v1/completions/../../weight_checker", "//weight_checker/"):
            assert _request("POST", path) in (403, 404), path
        assert _request("GET", "/is_sleeping", {ADMIN_HEADER.decode(): token}) == 200
        assert _request("GET", "/is_sleeping", {ADMIN_HEADER.decode(): "0" * 64}) == 403
        _assert_same_as_bake(manifest)  # none of the above changed the server


def test_admin_token_is_per_container_and_in_no_layer(baked_image, port_free):
    tokens = []
    for _ in range(2):
        with Container(baked_image) as c:
            _wait_ready(container=c.id)
            tokens.append(_token(c.id))
            mode = subprocess.run(["docker", "exec", c.id, "stat", "-c", "%a %U", RUNTIME_FILE],
                                  capture_output=True, text=True, check=True).stdout.split()
            assert mode == ["600", "root"]
            hits = subprocess.run(["docker", "exec", c.id, "grep", "-rlF", tokens[-1], "/fv"],
                                  capture_output=True, text=True)
            assert hits.returncode == 1 and hits.stdout == "", hits.stdout  # 1: nothing found
            inspect = subprocess.run(["docker", "inspect", c.id, baked_image], capture_output=True, text=True).stdout
            assert tokens[-1] not in inspect
    assert tokens[0] != tokens[1] and all(len(t) == 64 for t in tokens)
    shipped = subprocess.run(["docker", "run", "--rm", "--entrypoint", "sh", baked_image, "-c",
                              f"ls -A /fv/checkpoint; ls -A {RUN_DIR} 2>/dev/null; tar -tf /fv/checkpoint/dev-shm.tar; env"],
                             capture_output=True, text=True, check=True).stdout
    assert "admin-token" not in shipped and "runtime.json" not in shipped and "FV_ADMIN_TOKEN" not in shipped


# Every process of the served tree (its own PID namespace, unlike fvboot's): name and /proc status.
_TREE = """
import os, json
own = os.readlink('/proc/1/ns/pid')
out = []
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        if os.readlink(f'/proc/{pid}/ns/pid') != own:
            out.append([open(f'/proc/{pid}/comm').read().strip(), open(f'/proc/{pid}/status').read()])
    except OSError:
        pass
print(json.dumps(out))
"""


def test_the_restored_server_holds_none_of_the_capabilities_only_criu_needs(baked_image, manifest, port_free):
    """The container has SYS_ADMIN, SYS_PTRACE, ... for CRIU; the tree clients talk to does not."""
    from fvboot.capabilities import held

    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        assert "restored from checkpoint" in c.logs()
        r = subprocess.run(["docker", "exec", c.id, "python3", "-c", _TREE], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        tree = json.loads(r.stdout)
        fvboot = held(subprocess.run(["docker", "exec", c.id, "cat", "/proc/1/status"], capture_output=True,
                                     text=True, check=True).stdout)
        _assert_same_as_bake(manifest)
    assert len(tree) >= 2, tree  # the init and vLLM's processes
    for name, status in tree:
        assert not any(held(status).values()), (name, held(status))
    assert "CAP_SYS_ADMIN" in fvboot["CapEff"]  # fvboot and CRIU keep theirs


# Run in the container: the newest process of the served tree, entered as root with every
# capability the container has (more than any process of the tree holds).
_PROC_SEEN = r"""
import os, subprocess, sys
own = os.readlink("/proc/1/ns/pid")
tree = [p for p in filter(str.isdigit, os.listdir("/proc")) if os.readlink(f"/proc/{p}/ns/pid") != own]
r = subprocess.run(["nsenter", "-t", max(tree, key=int), "-m", "-p", sys.executable, "-c", sys.argv[1]],
                   capture_output=True, text=True)
sys.stdout.write(r.stdout)
sys.stderr.write(r.stderr)
sys.exit(r.returncode)
"""


def test_the_restored_trees_proc_keeps_the_containers_guards(baked_image, manifest, port_free):
    """Found by hand, 2026-12-06: the tree's own /proc (it has its own PID namespace, made at the
    bake and restored with it) carried none of the guards Docker puts on the container's, so a
    process of a restored vLLM, root without capabilities, wrote the host's kernel.core_pattern.
    Now /proc/sys is read-only there, as in the container, whoever writes, and /proc/keys is
    hidden. (A normal start runs in the container's PID namespace and /proc, guarded by the
    runtime itself.)"""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        assert "restored from checkpoint" in c.logs()
        r = subprocess.run(["docker", "exec", c.id, "python3", "-c", _PROC_SEEN, proc_probe.SCRIPT],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        _assert_same_as_bake(manifest)
    assert seen["sysctl"] == "EROFS", seen
    assert seen["keys"] == ""
    assert seen["own"] == str(seen["pid"])  # /proc is the tree's own: its PIDs, not the container's
    assert "/proc/sys" in seen["mounts"], seen["mounts"]


def _stop(container: str, grace: int = 10) -> tuple[float, int]:
    """`docker stop -t GRACE`: (seconds it took, the container's exit code)."""
    t = time.monotonic()
    subprocess.run(["docker", "stop", "-t", str(grace), container], capture_output=True, check=True,
                   timeout=grace + 30)
    took = time.monotonic() - t
    code = int(subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", container],
                              capture_output=True, text=True).stdout.strip())
    return took, code


def test_docker_stop_of_a_restored_server_is_quick_and_quiet(baked_image, port_free):
    """A clean stop: exit 0 well within Docker's grace period, and none of the pages of leak
    warnings vLLM's libraries print on their way out (fvboot counts them in one line)."""
    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        before = len(c.logs().splitlines())
        took, code = _stop(c.id)
        after = c.logs().splitlines()[before:]
    assert code == 0 and took < 9, (code, took, after[-20:])
    text = "\n".join(after)
    assert "nanobind" not in text and "resource_tracker" not in text and "EngineDeadError" not in text, text
    assert "Traceback" not in text, text
    assert any("fvboot: vLLM exited with code 0" in line for line in after), after[-20:]


def test_a_request_running_when_docker_stop_comes_is_answered_whole(baked_image, manifest, port_free):
    """Nothing lost on a rolling update: a request streaming when `docker stop` comes is finished
    before the restored server exits, in an image baked with vLLM's `--shutdown-timeout` (the
    suite's is; vLLM's default, 0, aborts such requests: seen by hand on the CPU image,
    2026-12-06, a streamed one cut, a plain one held open until Docker's SIGKILL). fvboot passes
    the stop on and waits on the tree with no bound of its own: Docker's timeout is the bound.
    The container exits 0."""
    import threading

    from fvboot.launcher import arg_value

    grace = int(arg_value(manifest["vllm"]["args"], "--shutdown-timeout") or 0)
    if grace < 30:
        pytest.skip("this image was baked without vLLM's --shutdown-timeout (FV_E2E_VLLM_ARGS)")
    body = {**_completion_body("Hello", 400, manifest["model"]["served_name"]), "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    body.pop("logprobs")
    chunks: list[tuple[float, dict]] = []
    first = threading.Event()

    def read() -> None:
        with requests.post(f"{URL}/v1/completions", json=body, stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    chunks.append((time.monotonic(), json.loads(line[6:])))
                    first.set()

    with Container(baked_image) as c:
        _wait_ready(container=c.id)
        assert "restored from checkpoint" in c.logs()
        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(60), c.logs()[-3000:]
        stop_sent = time.monotonic()
        _, code = _stop(c.id, grace + 30)
        reader.join(30)
        logs = c.logs()
    assert any(t > stop_sent for t, _ in chunks), "the request ended before the stop: nothing was tested"
    reasons = [ch["choices"][0].get("finish_reason") for _, ch in chunks if ch.get("choices")]
    usage = [ch["usage"] for _, ch in chunks if ch.get("usage")]
    assert "length" in reasons and usage and usage[-1]["completion_tokens"] == 400, \
        (reasons[-3:], usage[-1:], logs[-3000:])
    assert code == 0, logs[-3000:]


def test_docker_stop_during_a_restore_ends_it_at_once(baked_image, port_free):
    with Container(baked_image) as c:
        time.sleep(0.4)  # fvboot is up (its handlers are set first), the restore under way
        took, code = _stop(c.id)
        logs = c.logs()
    assert code in (0, 143), logs[-3000:]
    assert took < 8, logs[-3000:]


def test_docker_stop_during_a_normal_start_on_another_port(baked_image, port_free):
    """`docker run IMAGE --port 9000`: arguments differ, so a normal start, which waits on 9000
    (not the baked 8000); docker stop meanwhile ends it at once, not at Docker's SIGKILL."""
    with Container(baked_image, entry=["fvboot", "--port", "9000"]) as c:
        logs = _wait_log(c.id, "waiting up to", 120)
        assert "for it on port 9000" in logs, logs[-3000:]
        time.sleep(2)  # vLLM is starting
        took, code = _stop(c.id)
        logs = c.logs()
    assert "stopped by signal 15 before the server was serving" in logs, logs[-3000:]
    assert code == 143 and took < 9, (code, took, logs[-3000:])


def test_without_capabilities_the_reason_names_the_missing_one(baked_image, port_free):
    """No --cap-add: CRIU refuses, the line says which capability, and docker stop during the
    normal start that follows ends it at once."""
    cid = subprocess.run(["docker", "run", "-d", "--network", "host", "--shm-size", "1g", *gpu_flags(), baked_image],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        line = _fallback_line(_wait_log(cid, "checkpoint not used", 60))
        assert "capability" in line and "CAP_" in line and "no log" not in line, line
        took, code = _stop(cid)
        assert code == 143 and took < 9, (code, took)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def test_under_dockers_default_seccomp_profile_the_reason_says_to_lift_it(baked_image, port_free):
    """The capabilities but not `--security-opt seccomp=unconfined` (Kubernetes' RuntimeDefault):
    CRIU's pivot_root was refused with "Operation not permitted" and nothing said why (tried as
    an operator would, 2026-12-05); the line names the filter and what to run with."""
    from fvboot.capabilities import docker_run_flags

    flags = [f for f in docker_run_flags() if f != "seccomp=unconfined"]
    flags = [f for i, f in enumerate(flags) if not (f == "--security-opt" and flags[i + 1].startswith("--"))]
    assert "seccomp=unconfined" not in flags and "SYS_ADMIN" in flags, flags
    cid = subprocess.run(["docker", "run", "-d", "--network", "host", *flags, *gpu_flags(), baked_image],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        line = _fallback_line(_wait_log(cid, "checkpoint not used", 60))
        assert "Operation not permitted (this container runs under a seccomp filter, which refuses calls CRIU" \
               " makes: run the container with" in line, line
        assert "--security-opt seccomp=unconfined" in line, line
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def test_an_api_key_given_at_docker_run_is_what_the_restored_server_asks_for(baked_image, manifest, port_free):
    """The key is this start's, not the bake's (the restored server's environment is the bake's):
    without it 401, with it the bake's answers. Given as a Kubernetes secret made from a file
    gives it, with the file's last newline, which no client can send: left out, and said."""
    with Container(baked_image, "-e", "FV_API_KEY=k-e2e\n") as c:
        _wait_ready(container=c.id)
        logs = c.logs()
        assert "restored from checkpoint" in logs, logs[-3000:]
        assert "clients must send the API key in FV_API_KEY (white space at its ends left out)" in logs
        body = _completion_body(*_probe_asks(manifest)[0])
        assert requests.post(f"{URL}/v1/completions", json=body, timeout=60).status_code == 401
        wrong = {"Authorization": "Bearer k-e2f"}
        assert requests.post(f"{URL}/v1/completions", json=body, headers=wrong, timeout=60).status_code == 401
        assert requests.get(f"{URL}/health", timeout=10).status_code == 200
        _assert_same_as_bake(manifest, answers=_answers(manifest, headers={"Authorization": "Bearer k-e2e"}))


def _restored_asking_for(c: Container, manifest: dict, key: str, where: str) -> None:
    """C restored, says where its key came from (WHERE), refuses a request without the key,
    answers as at bake with it, and never logs it."""
    _wait_ready(container=c.id)
    logs = c.logs()
    assert "restored from checkpoint" in logs, logs[-3000:]
    assert f"clients must send the API key {where} as `Authorization: Bearer <key>`" in logs, logs[-3000:]
    body = _completion_body(*_probe_asks(manifest)[0])
    assert requests.post(f"{URL}/v1/completions", json=body, timeout=60).status_code == 401
    _assert_same_as_bake(manifest, answers=_answers(manifest, headers={"Authorization": f"Bearer {key}"}))
    assert key not in c.logs()


def test_an_api_key_in_a_mounted_file_is_asked_for_and_a_missing_file_ends_the_start(baked_image, manifest, port_free,
                                                                                        tmp_path):
    """`-e FV_API_KEY_FILE=/run/secrets/fv_key` with the file mounted (Docker's secrets, a
    Kubernetes secret volume; tried as an operator would, 2026-12-06: the name was unknown and the
    server answered anyone). The file's key is asked for; a file that is not there ends the start
    at once with the reason, never an open server."""
    key_file = tmp_path / "fv_key"
    key_file.write_text("k-file-e2e\n")
    key_file.chmod(0o644)
    with Container(baked_image, "-v", f"{key_file}:/run/secrets/fv_key:ro",
                   "-e", "FV_API_KEY_FILE=/run/secrets/fv_key") as c:
        _restored_asking_for(c, manifest, "k-file-e2e", "in the file /run/secrets/fv_key (FV_API_KEY_FILE)")
    with Container(baked_image, "-e", "FV_API_KEY_FILE=/run/secrets/fv_key") as c:
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=120).stdout.strip()
        logs = c.logs()
        assert code == "1", logs
        assert "FV_API_KEY_FILE=/run/secrets/fv_key: cannot read it (No such file or directory); a start without the" \
               " key would serve anyone" in logs, logs
        assert "Traceback" not in logs and "restored from checkpoint" not in logs


def test_two_different_api_keys_are_refused_at_once_with_the_reason(baked_image, port_free):
    with Container(baked_image, "-e", "FV_API_KEY=a", "-e", "VLLM_API_KEY=b") as c:
        code = subprocess.run(["docker", "wait", c.id], capture_output=True, text=True, timeout=120).stdout.strip()
        logs = c.logs()
        assert code != "0", logs
        assert "FV_API_KEY and VLLM_API_KEY are both set, to different keys; set one of them" in logs, logs
        assert "Traceback" not in logs


def test_a_container_that_drops_every_capability_is_told_which_to_add_back(baked_image, manifest, port_free):
    """`docker run --cap-drop ALL` with CRIU's list (Kubernetes' drop: [ALL] and add): the
    checkpoint's processes held Docker's default capabilities, which CRIU can give back only if it
    holds them (found by hand, 2026-12-05: CRIU's restorer failed on them and the restore hung
    until its 600 s timeout). Refused at once, by name; with those added back it restores."""
    from fvboot.capabilities import CONTAINER_CAPS

    held = manifest["criu"]["capabilities"]
    assert held and "SYS_ADMIN" not in held, held  # the tree gives CRIU's up (nsinit)
    with Container(baked_image, "--cap-drop", "ALL") as c:
        logs = _wait_log(c.id, "checkpoint not used", 60)
        line = _fallback_line(logs)
        lacking = sorted(set(held) - set(CONTAINER_CAPS))
        assert "missing capability: " + ", ".join(f"CAP_{n}" for n in lacking) in line, line
        assert "add them: " + " ".join(f"--cap-add {n}" for n in lacking) in line, line
        assert "criu restore" not in logs, logs[-3000:]  # refused before CRIU ran
    back = [f for n in held for f in ("--cap-add", n)]
    with Container(baked_image, "--cap-drop", "ALL", *back) as c:
        _wait_ready(container=c.id)
        assert "restored from checkpoint" in c.logs(), c.logs()[-3000:]
        _assert_same_as_bake(manifest)


def test_an_api_key_given_as_an_argument_is_asked_for_by_the_restored_server_and_never_logged(baked_image, manifest,
                                                                                               port_free):
    """`docker run IMAGE --api-key KEY`, as with vLLM's own image (tried as an operator would,
    2026-12-05: the key counted as an argument the bake did not have, so the checkpoint was not
    used, the log line saying so printed the key, and the normal start dropped the baked
    arguments). The key is the middleware's: the restore goes ahead, and the key is in no line."""
    key = "k-arg-e2e-5d1f"
    with Container(baked_image, entry=["fvboot", "--api-key", key]) as c:
        _restored_asking_for(c, manifest, key, "given as --api-key")


def test_a_container_without_the_defaults_vllm_never_uses_restores(baked_image, manifest, port_free):
    """Cluster policies often drop NET_RAW (and MKNOD, AUDIT_WRITE, SETFCAP): the served tree gives
    those up at bake, so the checkpoint does not need them back (found by hand, 2026-12-05: a
    tree that held them was refused, 'missing capability: CAP_AUDIT_WRITE, ...')."""
    from fvboot.capabilities import UNUSED_DEFAULTS

    assert not set(UNUSED_DEFAULTS) & set(manifest["criu"]["capabilities"]), manifest["criu"]
    dropped = [f for n in UNUSED_DEFAULTS for f in ("--cap-drop", n)]
    with Container(baked_image, *dropped) as c:
        _wait_ready(container=c.id)
        assert "restored from checkpoint" in c.logs(), c.logs()[-3000:]
        _assert_same_as_bake(manifest)
