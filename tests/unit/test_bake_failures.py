"""fvboot bake's failures after the server is up: each one line that names the step, says why
and what to do; the served tree killed, no manifest written, the bake's token file gone.

vLLM (only in the images) and CRIU's dump (needs the served tree) are stood in for: the server
by a control object that fails at the step under test, the tree by one that can be alive or
dead. vLLM dying in the bake's start is the e2e test
`test_builder_docker.py::test_vllm_failing_in_the_bake_is_one_clear_error_and_leaves_nothing`."""

from __future__ import annotations

import socket
import subprocess
import types
import urllib.error

import pytest

from fvboot import bake, criu, manifest
from fvboot.errors import BakeFailed, ServerError
from fvboot.layout import Layout
from fvboot.models import PreparedModel


class _Tree:
    def __init__(self, *_a, **_k):
        self.dead, self.terminated = False, False

    def alive(self):
        return not self.dead

    def terminate(self, timeout=10):
        self.terminated = self.dead = True  # as the real one: not alive once terminated

    def init_pid(self, timeout=10):
        return 1


class _Control:
    """The server as fvboot's calls see it; FAIL_AT: (call name, exception, server dies too)."""

    fail_at: tuple = ("", None, False)
    tree: _Tree

    def __init__(self, *_a, **_k):
        pass

    def _maybe_fail(self, call):
        name, error, dies = self.fail_at
        if call == name:
            if dies:
                _Control.tree.dead = True
            raise error

    def wait_healthy(self, timeout, alive):
        self._maybe_fail("wait_healthy")

    def complete(self, prompt, max_tokens, **_k):
        self._maybe_fail("complete")
        return {"choices": [{"text": "x", "logprobs": {"token_logprobs": [-1.0]}}]}

    def probe(self, **_k):
        return [{"prompt": "p", "text": "x", "logprobs": [-1.0]}]

    def probe_together(self, **_k):
        return [{"prompt": "p", "text": "x", "logprobs": [-1.0]}]

    def gate(self, state, **_k):
        pass

    def rpc(self, method, *args, **_k):
        self._maybe_fail(method)
        return [{"rank": 0}]

    def sleep(self, level):
        pass

    asleep = True

    def is_sleeping(self, **_k):
        return self.asleep

    def trim(self):
        return []


@pytest.fixture
def baking(tmp_path, monkeypatch):
    """bake() with its server and tree stood in for; returns (layout, run bake, the tree)."""
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    layout = Layout(tmp_path / "fv")
    tree = _Tree()
    _Control.tree, _Control.fail_at = tree, ("", None, False)
    monkeypatch.setattr(bake, "prepare_model", lambda model, dest, token, model_dir=None, revision=None: PreparedModel("m"))
    monkeypatch.setattr(bake, "detach_build_inputs", lambda: [])
    monkeypatch.setattr(bake.manifest, "device_info", lambda: manifest.Device("cpu"))
    monkeypatch.setattr(bake, "ServedTree", lambda *a, **k: tree)
    monkeypatch.setattr(bake, "ServerControl", _Control)
    monkeypatch.setattr(bake, "tree_processes", lambda pid: [])
    monkeypatch.setattr(bake.mounts, "detach_cgroups", lambda pid: False)  # the stand-in tree has no namespaces
    monkeypatch.setattr(bake.proc_guard, "tree_guards", lambda pid: [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run():
        return bake.bake(layout, "synthetic:tiny", [], port, 2)
    return layout, run, tree


def _nothing_left(layout, tree):
    assert tree.terminated
    assert not layout.manifest.exists()
    assert not layout.runtime_file.exists()  # the bake's admin token


def test_a_server_that_crashes_in_the_warm_up_is_named(baking):
    layout, run, tree = baking
    _Control.fail_at = ("complete", urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), True)
    with pytest.raises(BakeFailed, match=r"^the vLLM server exited during the bake's warm-up \(see its log above\)$"):
        run()
    _nothing_left(layout, tree)


def test_a_full_disk_in_the_weight_dump_says_to_free_space(baking):
    layout, run, tree = baking
    _Control.fail_at = ("fv_dump_weights", ServerError(
        "POST /collective_rpc answered 500: OSError: [Errno 28] No space left on device"), False)
    with pytest.raises(BakeFailed) as e:
        run()
    assert str(e.value).startswith("the bake's weight dump failed: no space left on device")
    assert "free space where Docker keeps its data and build again" in str(e.value)
    _nothing_left(layout, tree)


def test_a_failing_criu_dump_is_the_checkpoint_step_with_crius_reason(baking, monkeypatch, tmp_path):
    layout, run, tree = baking
    log = tmp_path / "criu-dump.log"
    log.write_text("(00.1) Error (criu/sk-inet.c:188): inet: Connected TCP socket, consider using --tcp-established\n")

    def dump(*_a, **_k):
        raise criu.CriuError("dump", log, "failed (exit 1)")
    monkeypatch.setattr(bake.criu, "dump", dump)
    with pytest.raises(BakeFailed, match=r"^the bake's checkpoint failed: criu dump failed \(exit 1\): "
                                         r".*Connected TCP socket"):
        run()
    _nothing_left(layout, tree)


def test_a_failure_after_the_dump_is_the_bakes_not_vllms(baking, monkeypatch):
    """CRIU's dump ends the tree, so a step after it that fails (here the save of /dev/shm, tar
    on a full disk) was called "the vLLM server exited during the bake's save of /dev/shm"
    with a stale vLLM line (found by review, 2026-12-06). It is the step's own failure, with
    tar's words; and the bake's admin token was gone before anything was saved."""
    layout, run, tree = baking
    seen = {}

    def dump(*_a, **_k):
        tree.dead = True  # as CRIU leaves it
        layout.images_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(bake.criu, "dump", dump)
    monkeypatch.setattr(bake.zeropages, "drop_zero_pages", lambda images: [])
    monkeypatch.setattr(bake.criu, "pages_by_process", lambda images: {})
    monkeypatch.setattr(bake.sockets, "bound_addresses", lambda images: [])

    def tar(*a, **k):
        seen["token_left"] = layout.runtime_file.exists()
        return subprocess.CompletedProcess(a[0], 2, "", "tar: /fv/checkpoint/dev-shm.tar: Wrote only 4096 of 10240 bytes\n"
                                           "tar: Error is not recoverable: exiting now\nNo space left on device\n")
    monkeypatch.setattr(bake.subprocess, "run", tar)
    with pytest.raises(BakeFailed) as e:
        run()
    assert str(e.value).startswith("the bake's save of /dev/shm failed: no space left on device"), str(e.value)
    assert "vLLM" not in str(e.value)
    assert seen == {"token_left": False}
    _nothing_left(layout, tree)


def test_any_other_error_is_one_line_with_its_type(baking):
    layout, run, tree = baking
    _Control.fail_at = ("fv_release_weights", RuntimeError("weights still referenced"), False)
    with pytest.raises(BakeFailed, match=r"^the bake's sleep failed: RuntimeError: weights still referenced$"):
        run()
    _nothing_left(layout, tree)


def test_the_probe_asked_together_is_recorded_only_where_its_answers_are_steady(capsys):
    """A batch forms as the prompts reach the engine, and can round otherwise when it forms
    otherwise: the bake records the one-request answers only if every try gave the same, and
    says when restores will ask one prompt at a time."""
    answers = iter([[{"prompt": "p", "text": "x", "logprobs": [-1.0]}]] * 2
                   + [[{"prompt": "p", "text": "x", "logprobs": [-1.0313]}]])
    ctl = types.SimpleNamespace(probe_together=lambda: next(answers))
    assert bake._steady_probe_together(ctl) is None
    assert "answered differently across 3 tries; restores will ask them one at a time" in capsys.readouterr().out

    steady = types.SimpleNamespace(probe_together=lambda: [{"prompt": "p", "text": "x", "logprobs": [-1.0]}])
    assert bake._steady_probe_together(steady) == (manifest.ProbeAnswer("p", "x", (-1.0,)),)


def test_a_gpu_engine_that_does_not_go_to_sleep_stops_the_bake(baking, monkeypatch):
    """vLLM answers /sleep with 200 whatever it did; an engine still awake would put its whole
    GPU memory (the weights, the KV cache) into the CUDA checkpoint. Its own word decides."""
    layout, run, tree = baking
    monkeypatch.setattr(bake.manifest, "device_info", lambda: manifest.Device("cuda", driver="580"))
    monkeypatch.setattr(_Control, "asleep", False)
    with pytest.raises(BakeFailed, match=r"^the bake's sleep failed: vLLM answered the level-2 sleep but says it is"
                                         r" not asleep \(its log above says why\)"):
        run()
    _nothing_left(layout, tree)


def test_a_bake_by_hand_refuses_a_credential_among_the_servers_arguments(tmp_path, monkeypatch):
    """`fvboot bake -- --api-key K` (host mode: fvbuild refuses it, this is the bake run by hand):
    the key would be in the manifest and in the checkpoint's memory (found by review)."""
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    with pytest.raises(BakeFailed, match=r"^--api-key may hold a secret, which must not be in a checkpoint"):
        bake.bake(Layout(tmp_path / "fv"), "synthetic:tiny", ["--api-key=s3cret"], 1, 0)
