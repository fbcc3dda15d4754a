"""GateMiddleware: the ASGI middleware fvboot passes to vLLM (`--middleware`).

Two jobs, both inside the server process so they survive checkpoint and restore:
- a gate: while closed (from just before the dump until the restored weights are back and
  checked), client requests wait instead of reaching an engine without weights; they get 503
  with Retry-After only if the gate stays shut past FV_GATE_WAIT_S. `/health` says 503 while shut.
- an allowlist: clients reach only the public API (PUBLIC_PATHS); fvboot's own calls (sleep,
  wake_up, collective_rpc, the gate) also need the admin token. Everything else vLLM registers
  (its dev mode adds routes with every release: /weight_checker, /abort_requests, ...) is
  refused, so a new route is closed until someone opens it here. fvboot makes a new token at
  every start and writes it to a root-only runtime file outside FV_HOME
  (runtime_file.write_runtime_settings): it is in no image layer, and each container has its own.
  The file's path comes from FV_RUNTIME_FILE, set at bake, so the restored middleware (whose
  environment is the bake's) finds this start's file at the same path; it is opened, read and
  closed per check, so no descriptor is held across the checkpoint.
- an API key, when the container was started with FV_API_KEY (or VLLM_API_KEY): clients must
  send `Authorization: Bearer <key>` to every public route but the health checks, /metrics and
  /version. It reaches the middleware through the same runtime file, so it is set per
  `docker run`, never baked (a `--api-key` vLLM argument would be saved in the manifest and the
  checkpoint). The same file carries FV_GATE_WAIT_S of this start.
- fvboot's metrics (metrics.py) appended to vLLM's `/metrics`: how the server started, the
  start-up phases, the requests held at the gate; and, as a restored server opens its gate,
  vLLM's own counters made this start's (served_metrics.py: the bake's warm-up and this start's
  probe are not clients' requests).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import posixpath
import re
import sys
import time

from . import runenv
from .layout import ADMIN_ANSWER, ADMIN_HEADER, ADMIN_REFUSED, RUNTIME_FILE_ENV
from .metrics import exposition
from .served_metrics import zero_served_counts

GATE_OPEN, GATE_CLOSE, GATE_STATE = "/fv/gate/open", "/fv/gate/close", "/fv/gate/state"
TRIM = "/fv/trim"

# What vLLM's api_server registers for clients (vLLM 0.32; read from its routers). Not here on
# purpose: dev-mode and RL routes, /abort_requests, LoRA loading, profiling, /server_info, ...
HEALTH_PATHS = frozenset({"/health", "/ping", "/ready", "/readyz"})
NO_KEY_PATHS = HEALTH_PATHS | {"/metrics", "/version"}  # answered without the API key
PUBLIC_PATHS = HEALTH_PATHS | frozenset({
    "/metrics", "/version", "/load", "/tokenize", "/detokenize", "/tokenizer_info",
    "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc",
    "/v1/models", "/v1/completions", "/v1/completions/render", "/v1/chat/completions",
    "/v1/chat/completions/render", "/v1/chat/completions/batch", "/v1/responses",
    "/v1/responses/render", "/v1/messages", "/v1/messages/count_tokens", "/v1/messages/render",
    "/v1/embeddings", "/v1/score", "/v1/rerank", "/v2/rerank", "/v2/embed", "/v1/systemone",
    "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/realtime",
    "/pooling", "/classify", "/score", "/rerank", "/invocations", "/generative_scoring",
    "/cohere/v2/chat", "/cohere/v2/chat/render", "/inference/v1/generate",
})
PUBLIC_PATTERNS = (re.compile(r"/v1/responses/[A-Za-z0-9_.:-]+(/cancel)?"),)
# What fvboot itself calls (control.ServerControl), besides the public API.
ADMIN_PATHS = frozenset({"/sleep", "/wake_up", "/is_sleeping", "/collective_rpc",
                         GATE_OPEN, GATE_CLOSE, GATE_STATE, TRIM})


def canonical_path(path: str, root_path: str = "") -> str | None:
    """The path a request names, as routing would see it: --root-path stripped, `//` collapsed,
    `.`/`..` resolved, no trailing `/`. None for what no route of ours can name: a path left
    encoded after uvicorn's one decoding (`%2F` sent as `%252F`), backslashes, control bytes."""
    if root_path and (path == root_path or path.startswith(root_path.rstrip("/") + "/")):
        path = path[len(root_path.rstrip("/")):] or "/"
    if not path.startswith("/") or any(c in path for c in "%\\") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None
    path = posixpath.normpath(re.sub(r"/{2,}", "/", path))
    return "/" + path.strip("/") if path != "/" else "/"


def forwarded(scope: dict, path: str) -> dict:
    """SCOPE as vLLM gets it: the path the allowlist judged (canonical_path's PATH, under the
    root path where the request had it), so that routing serves what was checked and nothing a
    raw spelling would reach (`/metrics/../v1/models` is a mount's path raw, a public one
    canonical); this start's admin token taken out of the headers (vLLM's code never sees it)."""
    given, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    under_root = bool(root) and (given == root or given.startswith(root + "/"))
    full = root + path if under_root else path
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != ADMIN_HEADER]
    return {**scope, "path": full, "raw_path": full.encode(), "headers": headers}


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or any(p.fullmatch(path) for p in PUBLIC_PATTERNS)


def _trim() -> dict:
    """Before the checkpoint: free Python garbage and return freed heap to the kernel in the API
    server process, so the CRIU image holds less."""
    import ctypes
    import gc

    collected = gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return {"collected": collected, "trimmed": bool(trim(0)) if trim else False}


def _marked(send):
    """SEND that puts ADMIN_ANSWER on the answer's headers: the probe goes to a public route,
    where another start's server on the same port (the host's network, SO_REUSEPORT) would
    have answered it as a client's (found by review, 2026-12-06)."""

    async def send_marked(msg):
        if msg.get("type") == "http.response.start":
            msg = {**msg, "headers": [*msg.get("headers", []), (ADMIN_ANSWER, b"1")]}
        await send(msg)

    return send_marked


class GateMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self._open = asyncio.Event()
        self._open.set()
        self._wait_s = runenv.seconds("FV_GATE_WAIT_S")
        self._first_served = False
        self._held = 0  # requests that waited at the closed gate, since the bake (kept by the checkpoint)
        self._settings_path = os.environ.get(RUNTIME_FILE_ENV, "")
        self._settings_key: tuple = ()
        self._settings: dict = {}

    def settings(self) -> dict:
        """This start's runtime settings; re-read when the file is replaced (a new start)."""
        try:
            st = os.stat(self._settings_path) if self._settings_path else None
        except OSError:
            st = None
        if st is None:
            self._settings_key, self._settings = (), {}
            return self._settings
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._settings_key:
            try:
                with open(self._settings_path, "rb") as f:
                    data = json.loads(f.read())
            except (OSError, ValueError):
                data = None
            self._settings = data if isinstance(data, dict) else {}
            self._settings_key = key if data is not None else ()
        return self._settings

    def forget_settings(self) -> None:
        """Before the checkpoint: keep the bake's token out of the server's memory image."""
        self._settings_key, self._settings = (), {}

    def _is_admin(self, scope) -> bool:
        given = [v for k, v in scope.get("headers", ()) if k == ADMIN_HEADER]
        if not given:
            return False
        token = self.settings().get("admin_token")
        if not isinstance(token, str) or len(token) < 32:
            return False
        return hmac.compare_digest(given[-1], token.encode())

    def _key_ok(self, scope, path: str) -> bool:
        key = self.settings().get("api_key")
        if not key or path in NO_KEY_PATHS or scope.get("method") == "OPTIONS":  # CORS preflight
            return True
        given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        return bool(given) and hmac.compare_digest(given[-1], b"Bearer " + str(key).encode())

    def _gate_wait_s(self) -> float:
        wait = self.settings().get("gate_wait_s")
        return float(wait) if isinstance(wait, (int, float)) else self._wait_s

    async def _reply(self, scope, send, status: int, body: dict, headers=()) -> None:
        if scope["type"] == "websocket":  # refused before accept: the server answers 403
            await send({"type": "websocket.close", "code": 1013 if status == 503 else 1008})
            return
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), *headers]})
        await send({"type": "http.response.body", "body": data})

    async def _metrics(self, scope, receive, send):
        """vLLM's /metrics answer with fvboot's lines after it (uncompressed: the request's
        Accept-Encoding is dropped; Prometheus' text format, whatever the scraper accepts: in
        OpenMetrics they would come after its `# EOF` and the whole scrape be refused; found by
        review, 2026-12-06; the length is left to the server's chunked encoding)."""
        extra = exposition(self.settings().get("startup"), self._held).encode()
        scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", ()) if k not in (b"accept-encoding", b"accept")]
                 + [(b"accept", b"text/plain; version=0.0.4")]}
        ok = False

        async def send_with_ours(msg):
            nonlocal ok
            if msg["type"] == "http.response.start":
                headers = msg.get("headers", [])
                ok = msg.get("status") == 200 and not any(k.lower() == b"content-encoding" for k, _ in headers)
                if ok:
                    msg = {**msg, "headers": [(k, v) for k, v in headers if k.lower() != b"content-length"]}
            elif msg["type"] == "http.response.body" and ok and not msg.get("more_body"):
                msg = {**msg, "body": msg.get("body", b"") + extra}
            await send(msg)

        await self.app(scope, receive, send_with_ours)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = canonical_path(scope.get("path", ""), scope.get("root_path", ""))
        if path is None:
            return await self._reply(scope, send, 404, {"error": "not found"})
        if self._is_admin(scope):
            send = _marked(send)  # fvboot's calls tell this server's answers from another's on the port
            if path == GATE_CLOSE:
                self._open.clear()
                return await self._reply(scope, send, 200, {"gate": "closed"})
            if path == GATE_OPEN:  # a restored server's start, for monitoring too
                metrics = zero_served_counts()
                self._open.set()
                return await self._reply(scope, send, 200, {"gate": "open", "metrics": metrics})
            if path == TRIM:
                self.forget_settings()
                return await self._reply(scope, send, 200, _trim())
            if path == GATE_STATE:
                return await self._reply(scope, send, 200, {"gate": "open" if self._open.is_set() else "closed"})
            if path in ADMIN_PATHS or is_public(path):
                return await self.app(forwarded(scope, path), receive, send)
            return await self._reply(scope, send, 404, {"error": "not found"})
        if path in ADMIN_PATHS:
            return await self._reply(scope, send, 403, {"error": ADMIN_REFUSED})
        if not is_public(path):
            return await self._reply(scope, send, 404, {"error": "not found"})
        if not self._key_ok(scope, path):
            return await self._reply(scope, send, 401, {"error": "Unauthorized"},
                                     [(b"www-authenticate", b"Bearer")])
        if not self._open.is_set():
            if path in HEALTH_PATHS:
                return await self._reply(scope, send, 503, {"status": "restoring"}, [(b"retry-after", b"1")])
            self._held += 1
            try:
                await asyncio.wait_for(self._open.wait(), self._gate_wait_s())
            except asyncio.TimeoutError:
                return await self._reply(scope, send, 503, {"error": "server is starting"}, [(b"retry-after", b"5")])
        scope = forwarded(scope, path)
        if path == "/metrics" and scope["type"] == "http":
            return await self._metrics(scope, receive, send)
        await self.app(scope, receive, send)
        if not self._first_served and path.startswith("/v1/"):
            self._first_served = True
            print(f"fvboot-event first_request_served {time.time():.6f}", file=sys.stderr, flush=True)
