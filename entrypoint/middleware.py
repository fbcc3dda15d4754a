"""GateMiddleware: the ASGI middleware fvboot passes to vLLM (`--middleware`).

Two jobs, both inside the server process so they survive checkpoint and restore:
- a gate: while closed (from just before the dump until the restored weights are back and
  checked), client requests wait instead of reaching an engine without weights; they get 503
  with Retry-After only if the gate stays shut past FV_GATE_WAIT_S. `/health` says 503 while shut.
- the dev endpoints fvboot needs (sleep, wake_up, collective_rpc, ...) answer only requests that
  carry the admin token. fvboot makes a new token at every start and writes it to a root-only
  runtime file outside FV_HOME (launcher.write_runtime_settings): it is in no image layer, and
  each container has its own. The file's path comes from FV_RUNTIME_FILE, set at bake, so the
  restored middleware (whose environment is the bake's) finds this start's file at the same path;
  it is opened, read and closed per check, so no descriptor is held across the checkpoint.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time

from .layout import ADMIN_HEADER, RUNTIME_FILE_ENV

DEV_PATHS = ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
             "/reset_mm_cache", "/server_info", "/pause", "/resume", "/update_weights",
             "/init_weight_transfer", "/scale_elastic_ep", "/fv/")
GATE_OPEN, GATE_CLOSE, GATE_STATE = "/fv/gate/open", "/fv/gate/close", "/fv/gate/state"
TRIM = "/fv/trim"


def _trim() -> dict:
    """Before the checkpoint: free Python garbage and return freed heap to the kernel in the API
    server process, so the CRIU image holds less."""
    import ctypes
    import gc

    collected = gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return {"collected": collected, "trimmed": bool(trim(0)) if trim else False}


class GateMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self._settings_path = os.environ.get(RUNTIME_FILE_ENV, "")
        self._settings_key: tuple = ()
        self._settings: dict = {}
        self._open = asyncio.Event()
        self._open.set()
        self._wait_s = float(os.environ.get("FV_GATE_WAIT_S", "600"))
        self._first_served = False

    async def _reply(self, send, status: int, body: dict, headers=()) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode()), *headers]})
        await send({"type": "http.response.body", "body": data})

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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self._is_admin(scope):
            if path == GATE_CLOSE:
                self._open.clear()
                return await self._reply(send, 200, {"gate": "closed"})
            if path == GATE_OPEN:
                self._open.set()
                return await self._reply(send, 200, {"gate": "open"})
            if path == TRIM:
                self.forget_settings()
                return await self._reply(send, 200, _trim())
            if path == GATE_STATE:
                return await self._reply(send, 200, {"gate": "open" if self._open.is_set() else "closed"})
            return await self.app(scope, receive, send)
        if path.startswith(DEV_PATHS):
            return await self._reply(send, 403, {"error": "this endpoint is reserved to fvboot"})
        if not self._open.is_set():
            if path in ("/health", "/ping", "/ready"):
                return await self._reply(send, 503, {"status": "restoring"}, [(b"retry-after", b"1")])
            try:
                await asyncio.wait_for(self._open.wait(), self._wait_s)
            except asyncio.TimeoutError:
                return await self._reply(send, 503, {"error": "server is starting"}, [(b"retry-after", b"5")])
        await self.app(scope, receive, send)
        if not self._first_served and path.startswith("/v1/"):
            self._first_served = True
            print(f"fvboot-event first_request_served {time.time():.6f}", file=sys.stderr, flush=True)
