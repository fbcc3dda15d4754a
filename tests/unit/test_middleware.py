"""GateMiddleware's allowlist against a tiny ASGI app that records what reached it: which paths
a client without the admin token reaches, which fvboot reaches with it, and the path spellings
that must not sneak past (the real server's routes are checked in tests/e2e/test_security.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from fvboot.middleware import GateMiddleware, canonical_path

TOKEN = "ab" * 32

# Routes vLLM 0.32's api_server registers that no client may reach (dev mode, RL, admin).
NOT_PUBLIC = ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/weight_checker",
              "/abort_requests", "/update_weight_version", "/reset_encoder_cache",
              "/shutdown_weight_transfer_engine", "/init_weight_transfer_engine", "/update_weights",
              "/start_weight_update", "/finish_weight_update", "/start_draft_weight_update",
              "/reset_prefix_cache", "/reset_mm_cache", "/server_info", "/pause", "/resume",
              "/is_paused", "/scale_elastic_ep", "/is_scaling_elastic_ep", "/release_kv_cache_memory",
              "/get_world_size", "/weight_info", "/kv_event_sources", "/start_profile", "/stop_profile",
              "/fault_tolerance/apply", "/fault_tolerance/status", "/v1/load_lora_adapter",
              "/v1/unload_lora_adapter", "/inference/v1/abort_requests", "/fv/gate/open",
              "/fv/gate/close", "/fv/trim", "/", "/anything/new"]
PUBLIC = ["/health", "/ping", "/ready", "/metrics", "/version", "/load", "/tokenize", "/detokenize",
          "/docs", "/openapi.json", "/redoc", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/embeddings", "/v1/responses", "/v1/responses/resp_123", "/v1/responses/resp_1/cancel",
          "/pooling", "/classify", "/score", "/rerank", "/v1/rerank", "/invocations", "/v1/realtime"]
FVBOOT_CALLS = ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc"]


class App:
    """Answers 200 and remembers the paths that reached it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, scope, receive, send):
        self.seen.append(scope.get("path"))
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def mw(monkeypatch, tmp_path):
    (tmp_path / "runtime.json").write_text(json.dumps({"admin_token": TOKEN}))
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "runtime.json"))
    monkeypatch.setenv("FV_GATE_WAIT_S", "0.2")
    return GateMiddleware(App())


def call(mw, path, admin=None, kind="http", root_path="", headers=()):
    sent = []
    hdrs = [(b"x-fastvllm-admin", admin.encode())] if admin else []
    scope = {"type": kind, "path": path, "root_path": root_path, "headers": hdrs + list(headers)}

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "websocket.connect"} if kind == "websocket" else {"type": "http.request"}

    asyncio.run(mw(scope, receive, send))
    if kind == "websocket":
        return "accepted" if sent[0]["type"] == "websocket.accept" else sent[0]["code"]
    return sent[0]["status"]


@pytest.mark.parametrize("path", NOT_PUBLIC)
def test_clients_without_the_token_reach_no_other_route(mw, path):
    assert call(mw, path) in (403, 404)
    assert mw.app.seen == []


@pytest.mark.parametrize("path", PUBLIC)
def test_clients_reach_the_public_api(mw, path):
    assert call(mw, path) == 200
    assert mw.app.seen == [path]


def test_the_token_opens_only_what_fvboot_calls(mw):
    for path in FVBOOT_CALLS + PUBLIC:
        assert call(mw, path, admin=TOKEN) == 200, path
    assert mw.app.seen == FVBOOT_CALLS + PUBLIC
    for path in ("/weight_checker", "/abort_requests", "/update_weight_version", "/v1/load_lora_adapter"):
        assert call(mw, path, admin=TOKEN) == 404, path
    assert mw.app.seen == FVBOOT_CALLS + PUBLIC
    assert call(mw, "/fv/gate/state", admin=TOKEN) == 200  # answered by the middleware itself
    assert call(mw, "/sleep", admin=TOKEN[:-1] + "0") == 403
    assert call(mw, "/sleep", admin=TOKEN[:40]) == 403


@pytest.mark.parametrize("path", [
    "//sleep", "/sleep/", "/sleep//", "/./sleep", "/v1/../sleep", "/v1/completions/../../sleep",
    "/health/../collective_rpc", "///collective_rpc", "/v1/./../weight_checker",
    "/%2Fsleep", "/v1%2F..%2Fsleep", "/%2e%2e/sleep", "/sleep%00", "/sle%65p", "\\sleep",
    "/v1\\..\\sleep", "/sleep\x00", "sleep", "/SLEEP", "/Sleep", "/abort_requests/",
    "/v1/responses/../../sleep", "/v1/responses/x/../../../collective_rpc",
])
def test_path_spellings_do_not_sneak_past(mw, path):
    """What uvicorn hands over is decoded once: `%2F` here was `%252F` on the wire."""
    assert call(mw, path) in (403, 404), path
    assert mw.app.seen == []


def test_spellings_of_public_paths_still_reach_the_api(mw):
    for path in ("/v1/completions/", "//v1//completions", "/v1/./completions", "/health/"):
        assert call(mw, path) == 200, path
    # as the path the allowlist judged: vLLM routes the path it is given
    assert mw.app.seen == ["/v1/completions"] * 3 + ["/health"]


def test_the_app_routes_the_path_that_was_judged_not_the_raw_one(mw):
    """Found by review, 2026-12-06: `/metrics/../v1/models` passed as /v1/models, and vLLM's
    `/metrics` mount (a regex on the raw path) served it. Any route under a non-public prefix
    that takes the rest of the path would have been reachable that way."""
    assert call(mw, "/metrics/../v1/models") == 200
    assert call(mw, "/api/x/../v1/models", root_path="/api") == 200
    assert mw.app.seen == ["/v1/models", "/api/v1/models"]


def test_the_admin_token_never_reaches_vllm(mw):
    headers = []

    async def app(scope, receive, send):
        headers.append(dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw.app = app
    assert call(mw, "/collective_rpc", admin=TOKEN) == 200
    assert call(mw, "/v1/models", admin=TOKEN) == 200
    assert call(mw, "/v1/models", admin="not the token") == 200
    assert [b"x-fastvllm-admin" in h for h in headers] == [False, False, False]


def test_canonical_path():
    assert canonical_path("//v1//../sleep/") == "/sleep"
    assert canonical_path("/api/sleep", "/api") == "/sleep"
    assert canonical_path("/api", "/api") == "/"
    assert canonical_path("/apix/sleep", "/api") == "/apix/sleep"
    assert canonical_path("/a%2Fb") is None
    assert canonical_path("/../../..") == "/"


def test_root_path_is_stripped_before_matching(mw):
    assert call(mw, "/api/sleep", root_path="/api") == 403
    assert call(mw, "/api//api/sleep", root_path="/api") == 404
    assert call(mw, "/api/v1/completions", root_path="/api") == 200
    assert call(mw, "/api/v1/../sleep", root_path="/api/") == 403
    assert mw.app.seen == ["/api/v1/completions"]  # the app gets the scope untouched


def test_websockets_are_held_to_the_same_lists(mw):
    assert call(mw, "/v1/realtime", kind="websocket") == "accepted"
    for path in ("/sleep", "/collective_rpc", "//sleep", "/weight_checker"):
        assert call(mw, path, kind="websocket") == 1008, path
    assert call(mw, "/collective_rpc", kind="websocket", admin=TOKEN) == "accepted"
    assert mw.app.seen == ["/v1/realtime", "/collective_rpc"]


def test_closed_gate_holds_websockets_then_refuses_with_try_again(mw):
    call(mw, "/fv/gate/close", admin=TOKEN)
    assert call(mw, "/v1/realtime", kind="websocket") == 1013
    call(mw, "/fv/gate/open", admin=TOKEN)
    assert call(mw, "/v1/realtime", kind="websocket") == "accepted"


def test_lifespan_passes_through(mw):
    async def run():
        await mw({"type": "lifespan"}, None, None)
    asyncio.run(run())
    assert mw.app.seen == [None]


def _start(tmp_path, monkeypatch, **env):
    """A start as fvboot serve makes it: settings from the environment into the runtime file."""
    from fvboot.runtime_file import runtime_settings, write_runtime_settings

    path = tmp_path / "run" / "runtime.json"
    monkeypatch.setenv("FV_RUNTIME_FILE", str(path))
    token = write_runtime_settings(path, runtime_settings(env))
    return GateMiddleware(App()), token


def test_api_key_from_docker_run_is_required_on_the_api(monkeypatch, tmp_path):
    mw, token = _start(tmp_path, monkeypatch, FV_API_KEY="k-123")
    bearer = [(b"authorization", b"Bearer k-123")]
    assert call(mw, "/v1/completions") == 401
    assert call(mw, "/v1/completions", headers=[(b"authorization", b"Bearer k-124")]) == 401
    assert call(mw, "/v1/completions", headers=[(b"authorization", b"k-123")]) == 401
    assert call(mw, "/tokenize") == 401
    assert call(mw, "/v1/realtime", kind="websocket") == 1008
    assert call(mw, "/v1/completions", headers=bearer) == 200
    assert call(mw, "/health") == 200 and call(mw, "/metrics") == 200
    assert call(mw, "/v1/completions", admin=token) == 200  # fvboot's probe
    assert call(mw, "/sleep", headers=bearer) == 403  # the key is no admin token


def test_vllm_api_key_works_too_and_no_key_means_open(monkeypatch, tmp_path):
    mw, _ = _start(tmp_path, monkeypatch, VLLM_API_KEY="v")
    assert call(mw, "/v1/models") == 401
    assert call(mw, "/v1/models", headers=[(b"authorization", b"Bearer v")]) == 200
    mw, _ = _start(tmp_path, monkeypatch)
    assert call(mw, "/v1/models") == 200


def test_gate_wait_is_a_docker_run_setting(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("FV_GATE_WAIT_S", "600")  # the bake's, frozen in the server
    mw, token = _start(tmp_path, monkeypatch, FV_GATE_WAIT_S="0.1")
    call(mw, "/fv/gate/close", admin=token)
    t = time.monotonic()
    assert call(mw, "/v1/completions") == 503
    assert time.monotonic() - t < 5


def test_bad_gate_wait_is_named():
    from fvboot.runtime_file import runtime_settings

    with pytest.raises(ValueError, match="FV_GATE_WAIT_S='soon'"):
        runtime_settings({"FV_GATE_WAIT_S": "soon"})


def test_api_keys_stay_out_of_the_server_environment(monkeypatch, tmp_path):
    from fvboot.launcher import server_env

    monkeypatch.setenv("FV_API_KEY", "k")
    monkeypatch.setenv("VLLM_API_KEY", "k")
    env = server_env(tmp_path / "r.json")
    assert "FV_API_KEY" not in env and "VLLM_API_KEY" not in env


def test_cors_preflight_needs_no_api_key(monkeypatch, tmp_path):
    mw, _ = _start(tmp_path, monkeypatch, FV_API_KEY="k")
    sent = []

    async def send(msg):
        sent.append(msg)

    asyncio.run(mw({"type": "http", "method": "OPTIONS", "path": "/v1/completions", "headers": []}, None, send))
    assert sent[0]["status"] == 200


def test_an_empty_api_key_means_open_and_the_log_says_so():
    from fvboot.api_keys import resolve_api_key
    from fvboot.runtime_file import runtime_settings

    assert "api_key" not in runtime_settings({"FV_API_KEY": ""})  # compose's ${FV_API_KEY:-}
    assert "api_key" not in runtime_settings({"FV_API_KEY": " \n"})
    assert resolve_api_key({"FV_API_KEY": ""}).line == "FV_API_KEY empty: clients need no API key"
    assert resolve_api_key({}).line == "clients need no API key (FV_API_KEY sets one)"


def test_a_key_from_a_secrets_file_loses_its_last_newline_and_the_log_says_so(monkeypatch, tmp_path):
    from fvboot.api_keys import resolve_api_key

    mw, _ = _start(tmp_path, monkeypatch, FV_API_KEY="k-123\n")  # kubectl create secret --from-file
    assert call(mw, "/v1/models", headers=[(b"authorization", b"Bearer k-123")]) == 200
    assert call(mw, "/v1/models") == 401
    assert "white space at its ends left out" in resolve_api_key({"FV_API_KEY": "k-123\n"}).line
    assert "left out" not in resolve_api_key({"FV_API_KEY": "k-123"}).line


def test_two_different_keys_are_refused_and_the_same_one_twice_is_not(monkeypatch, tmp_path):
    from fvboot.runtime_file import runtime_settings

    with pytest.raises(ValueError, match="FV_API_KEY and VLLM_API_KEY are both set, to different keys"):
        runtime_settings({"FV_API_KEY": "a", "VLLM_API_KEY": "b"})
    assert runtime_settings({"FV_API_KEY": "a", "VLLM_API_KEY": "a\n"})["api_key"] == "a"
    assert runtime_settings({"FV_API_KEY": "", "VLLM_API_KEY": "b"})["api_key"] == "b"


def test_a_key_in_quotes_is_kept_and_its_quotes_are_said():
    """`FV_API_KEY="k"` in a `docker run --env-file` file (tried as an operator would, 2026-12-06):
    Docker keeps the quotes, so the key is `"k"` and a client sending `k` gets 401 with nothing
    said. Kept (a key may hold quotes), and said."""
    from fvboot.api_keys import resolve_api_key
    from fvboot.runtime_file import runtime_settings

    env = {"FV_API_KEY": '"k-quoted"'}
    assert runtime_settings(env)["api_key"] == '"k-quoted"'
    assert resolve_api_key(env).line == ("clients must send the API key in FV_API_KEY (its quotes are part of it:"
                                         " `docker run --env-file` keeps a value's quotes) as `Authorization: Bearer"
                                         " <key>`")
    assert "quotes" not in resolve_api_key({"FV_API_KEY": "'k"}).line
    assert "quotes" not in resolve_api_key({"FV_API_KEY": '"'}).line


def test_answers_to_fvboots_calls_are_marked_and_clients_are_not(mw):
    """fvboot's control tells this server's answers from another's on the same port by a mark
    the middleware puts only on answers to a request whose admin token it took."""
    def marked(path, admin):
        sent = []
        scope = {"type": "http", "path": path, "root_path": "",
                 "headers": [(b"x-fastvllm-admin", admin.encode())] if admin else []}

        async def send(msg):
            sent.append(msg)

        async def receive():
            return {"type": "http.request"}

        asyncio.run(mw(scope, receive, send))
        return (b"x-fastvllm-admin-answer", b"1") in sent[0]["headers"]

    asyncio.run(mw({"type": "http", "path": "/fv/gate/open", "root_path": "",
                    "headers": [(b"x-fastvllm-admin", TOKEN.encode())]}, None, _ignore))
    assert marked("/v1/completions", TOKEN) and marked("/fv/gate/state", TOKEN) and marked("/sleep", TOKEN)
    assert not marked("/v1/completions", None) and not marked("/v1/completions", "cd" * 32)


async def _ignore(msg):
    pass
