"""The gate middleware's admin side: dev endpoints only with this start's token (read from the
runtime file each start rewrites), requests held while the gate is shut, a 503 with Retry-After
when it stays shut too long. (Which paths clients reach: test_middleware.py.)"""

from __future__ import annotations

import asyncio

import pytest

from fvboot.layout import Layout
from fvboot.middleware import GateMiddleware


async def _app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _call(mw, path, admin=None):
    sent = []
    headers = [(b"x-fastvllm-admin", admin.encode())] if admin else []

    async def send(msg):
        sent.append(msg)

    await mw({"type": "http", "path": path, "headers": headers}, None, send)
    return sent[0]["status"], dict(sent[0].get("headers", []))


S3CRET = "5e" * 32  # the admin token of these tests' runtime file


@pytest.fixture
def gate(monkeypatch, tmp_path):
    import json

    (tmp_path / "runtime.json").write_text(json.dumps({"admin_token": S3CRET}))
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "runtime.json"))
    monkeypatch.setenv("FV_GATE_WAIT_S", "0.3")
    return GateMiddleware(_app)


def test_dev_endpoints_need_the_admin_token(gate):
    async def run():
        assert (await _call(gate, "/collective_rpc"))[0] == 403
        assert (await _call(gate, "/sleep"))[0] == 403
        assert (await _call(gate, "/fv/gate/open"))[0] == 403
        assert (await _call(gate, "/collective_rpc", admin="wrong"))[0] == 403
        assert (await _call(gate, "/collective_rpc", admin=S3CRET))[0] == 200
    asyncio.run(run())


def test_closed_gate_holds_requests_until_opened(gate):
    async def run():
        await _call(gate, "/fv/gate/close", admin=S3CRET)
        assert (await _call(gate, "/health"))[0] == 503
        waiting = asyncio.ensure_future(_call(gate, "/v1/completions"))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # held, not refused
        await _call(gate, "/fv/gate/open", admin=S3CRET)
        assert (await waiting)[0] == 200
    asyncio.run(run())


def test_gate_shut_too_long_answers_503_with_retry_after(gate):
    async def run():
        await _call(gate, "/fv/gate/close", admin=S3CRET)
        status, headers = await _call(gate, "/v1/completions")
        assert status == 503 and headers[b"retry-after"] == b"5"
    asyncio.run(run())


def test_without_a_runtime_file_no_request_is_admin(monkeypatch, tmp_path):
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "missing.json"))
    mw = GateMiddleware(_app)
    assert asyncio.run(_call(mw, "/collective_rpc", admin=""))[0] == 403
    assert asyncio.run(_call(mw, "/collective_rpc", admin=S3CRET))[0] == 403


def test_each_start_writes_a_new_root_only_token_the_middleware_follows(monkeypatch, tmp_path):
    """A restore rewrites the file at the bake's path: the restored middleware takes the new
    token at once and refuses the old one."""
    import os
    import stat

    from fvboot.runtime_file import write_runtime_settings

    path = tmp_path / "run" / "runtime.json"
    monkeypatch.setenv("FV_RUNTIME_FILE", str(path))
    first = write_runtime_settings(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    mw = GateMiddleware(_app)
    assert asyncio.run(_call(mw, "/collective_rpc", admin=first))[0] == 200
    second = write_runtime_settings(path)
    assert second != first and len(second) == 64
    assert asyncio.run(_call(mw, "/collective_rpc", admin=first))[0] == 403
    assert asyncio.run(_call(mw, "/collective_rpc", admin=second))[0] == 200
    assert [p.name for p in path.parent.iterdir()] == ["runtime.json"]  # no temp file left


def test_admin_token_is_nowhere_under_fv_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))
    layout = Layout(tmp_path / "fv")
    assert not str(layout.runtime_file).startswith(str(layout.home))
    assert not hasattr(layout, "admin_token_file")


def test_trim_endpoint_is_admin_only(gate):
    async def run():
        assert (await _call(gate, "/fv/trim"))[0] == 403
        assert (await _call(gate, "/fv/trim", admin=S3CRET))[0] == 200
    asyncio.run(run())

