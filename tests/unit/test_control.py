"""ServerControl against a real HTTP server: a worker's exception reaches the operator as one
line; a server that stays silent is a bounded, named error."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from typing import Any, Callable, Iterator

import pytest


@contextlib.contextmanager
def _server(answer: Callable[[str, http.server.BaseHTTPRequestHandler, Any], tuple[int, Any]]) -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 whose every request ANSWER(method, request, JSON body or
    None) turns into (status, JSON answer); its port. As fvboot's middleware does, it marks its
    answer to a request with an admin token (unless ANSWER gives a third item, False)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            n = int(self.headers.get("content-length") or 0)
            status, out, *mark = answer(method, self, json.loads(self.rfile.read(n)) if n else None)
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            if self.headers.get("x-fastvllm-admin") and (mark or [True])[0]:
                self.send_header("x-fastvllm-admin-answer", "1")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()


def test_server_errors_become_one_line_fvboot_errors():
    """A worker exception (HTTP 500 from collective_rpc) must reach the operator as one line."""
    from fvboot.control import ServerControl
    from fvboot.errors import ServerError

    with _server(lambda *_: (500, {"error": "WeightCollectionError: layer.cpu_linear captures a Foo"})) as port:
        ctl = ServerControl(port, "token", "m")
        with pytest.raises(ServerError, match="POST /collective_rpc answered 500: .*captures a Foo"):
            ctl.rpc("fv_dump_weights", "/x")



def test_another_server_on_the_port_is_not_taken_for_ours():
    """With the host's network another server may hold the port (another container's, a
    restore's): it answers /health, but without this start's token its gate's state is not
    found. fvboot stops there, saying so, instead of warming, probing or serving it."""
    from fvboot.control import ServerControl
    from fvboot.errors import ServerDied
    from fvboot.layout import ADMIN_HEADER

    def answer(method, req, body):
        if req.path == "/health":
            return 200, {}
        if req.path == "/fv/gate/state" and req.headers.get(ADMIN_HEADER.decode()) == "ours":
            return 200, {"gate": "closed"}
        return 404, {"error": "not found"}

    with _server(answer) as port:
        ServerControl(port, "ours", "m").wait_healthy(5, lambda: True)
        with pytest.raises(ServerDied, match=f"another server answers on http://127.0.0.1:{port}, not the vLLM"):
            ServerControl(port, "a token of another start", "m").wait_healthy(5, lambda: True)


def test_an_admin_call_another_starts_server_refuses_says_another_server_shares_the_port():
    """Two containers of an image started at once with the host's network (tried by hand,
    2026-12-06): both restored servers listen on the port (vLLM's socket has SO_REUSEPORT), the
    kernel hands fvboot's calls to either, and the other's middleware refuses this start's token.
    The start falls back saying so, not "answered 403: this endpoint is reserved to fvboot"."""
    from fvboot.control import ServerControl
    from fvboot.errors import ServerError
    from fvboot.layout import ADMIN_REFUSED

    with _server(lambda *_: (403, {"error": ADMIN_REFUSED})) as port:
        with pytest.raises(ServerError, match=rf"^POST /collective_rpc was refused by a server that does not know this"
                                              rf" start's admin token: another server listens on http://127.0.0.1:{port}"
                                              " beside this start's"):
            ServerControl(port, "token", "m").rpc("fv_dump_weights", "/x")
    with _server(lambda *_: (403, {"error": "Forbidden"})) as port:  # any other 403 is said as it came
        with pytest.raises(ServerError, match="answered 403: .*Forbidden"):
            ServerControl(port, "token", "m").rpc("fv_dump_weights", "/x")


def test_a_server_that_takes_the_call_and_stays_silent_is_a_bounded_error():
    """As a restored tree whose GPU state did not come back: it accepts the connection, then never
    answers. The call ends at its bound, named, and that ends the restore (fallback)."""
    import socket
    import time

    from fvboot.control import ServerControl
    from fvboot.errors import ServerError

    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel accepts; nobody answers
        ctl = ServerControl(listener.getsockname()[1], "token", "m")
        t = time.monotonic()
        with pytest.raises(ServerError, match=r"^POST /wake_up\?tags=weights got no answer within 0.5 s$"):
            ctl.wake_up(["weights"], timeout=0.5)
        assert time.monotonic() - t < 5


def test_the_probe_asked_together_is_one_request_read_back_in_prompt_order():
    """vLLM answers a list of prompts with one choice each, by index; the answers come back in
    the prompts' order whatever order the choices arrive in, and a missing one is an error."""
    from fvboot.control import PROBE_PROMPTS, ServerControl
    from fvboot.errors import ServerError

    bodies, drop = [], []

    def answer(method, request, body):
        bodies.append(body)
        choices = [{"index": i, "text": f"answer {i}", "logprobs": {"token_logprobs": [-0.123456, None]}}
                   for i in range(len(body["prompt"]))][::-1][len(drop):]
        return 200, {"choices": choices}

    with _server(answer) as port:
        ctl = ServerControl(port, "token", "m")
        answers = ctl.probe_together()
        assert [b["prompt"] for b in bodies] == [list(PROBE_PROMPTS)]
        assert answers == [{"prompt": p, "text": f"answer {i}", "logprobs": [-0.1235]}
                           for i, p in enumerate(PROBE_PROMPTS)]
        drop.append(1)
        with pytest.raises(ServerError, match=f"{len(PROBE_PROMPTS)} probe prompts got {len(PROBE_PROMPTS) - 1} answers"):
            ctl.probe_together()


def test_fvboots_start_leaves_the_http_client_for_while_criu_runs(tmp_path):
    """urllib (http.client, email, tempfile: ~12 ms) is not imported with `fvboot serve`'s
    modules; warm_up imports it in a thread, which the restore starts beside CRIU."""
    import subprocess
    import sys
    from pathlib import Path

    import fvboot

    (tmp_path / "fvboot").symlink_to(Path(fvboot.__file__).parent)
    code = ("import sys, time; import fvboot.serve, fvboot.control as c\n"
            "before = 'urllib.request' in sys.modules\n"
            "c.warm_up(); t = time.monotonic()\n"
            "while 'urllib.request' not in sys.modules and time.monotonic() - t < 10: time.sleep(0.001)\n"
            "print(before, 'urllib.request' in sys.modules)")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_whether_vllm_still_sleeps_is_read_from_its_own_route():
    """vLLM's GET /is_sleeping (its dev routes, with the admin token): the restore asks it after
    the KV cache's wake, because vLLM answers a wake it refused with 200."""
    from fvboot.control import ServerControl

    answers, tokens = [{"is_sleeping": True}, {"is_sleeping": False}], []

    def answer(method, request, body):
        assert (method, request.path) == ("GET", "/is_sleeping")
        tokens.append(request.headers.get("x-fastvllm-admin"))
        return 200, answers.pop(0)

    with _server(answer) as port:
        ctl = ServerControl(port, "secret", "m")
        assert ctl.is_sleeping(timeout=5) is True
        assert ctl.is_sleeping(timeout=5) is False
        assert tokens == ["secret", "secret"]


def test_the_trim_leaves_no_admin_token_in_the_servers_memory(tmp_path, monkeypatch):
    """The bake's last calls before the dump are the trim's; the middleware forgets this start's
    token on /fv/trim so that the checkpoint holds none. Found by review, 2026-12-06: the trim
    asked the workers after /fv/trim, and that admin call read the token back in. The real
    middleware behind a real HTTP server, asked as the bake asks it."""
    import asyncio

    from fvboot.control import ServerControl
    from fvboot.middleware import GateMiddleware

    token = "7a" * 32
    (tmp_path / "runtime.json").write_text(json.dumps({"admin_token": token}))
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "runtime.json"))

    async def app(scope, receive, send):  # vLLM's routes: each worker answers its collective_rpc
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps({"results": [{"rank": 0}]}).encode()})

    mw = GateMiddleware(app)
    seen = []

    def answer(method, request, body):
        seen.append(request.path)
        sent = []
        scope = {"type": "http", "method": method, "path": request.path, "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]}

        async def receive():
            return {"type": "http.request", "body": json.dumps(body).encode() if body is not None else b""}

        async def send(message):
            sent.append(message)

        asyncio.run(mw(scope, receive, send))
        data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], json.loads(data) if data else {}

    with _server(answer) as port:
        ServerControl(port, token, "m").trim()
    assert seen[-1] == "/fv/trim" and "/collective_rpc" in seen, seen
    assert token not in json.dumps(mw.__dict__, default=repr), "the token is still in the middleware's memory"


@pytest.mark.parametrize("gate_opened", [True, False])
def test_an_opening_of_the_gate_answered_late_stops_only_a_server_whose_gate_stayed_shut(gate_opened, capsys):
    """The middleware opens the gate before it answers: an answer that comes too late (a loop
    busy with the requests just let through) must not stop a server already serving checked
    answers; a gate still shut ends the restore, as any failed step does."""
    import time

    from fvboot import restore
    from fvboot.control import ServerControl
    from fvboot.errors import ServerError
    from fvboot.timeline import Timeline

    def answer(method, req, body):
        if req.path == "/fv/gate/open":
            time.sleep(1.5)
            return 200, {"gate": "open"}
        return 200, {"gate": "open" if gate_opened else "closed"}

    with _server(answer) as port:
        s = restore.RestoreState(layout=None, manifest=None, here=None, tl=Timeline("serve"), pipes=None,
                                 criu_env={}, settings={}, check=None, ctl=ServerControl(port, "token", "m"),
                                 step_timeout_s=0.3)
        if gate_opened:
            restore.open_gate(s)
            assert "the gate is open, though opening it answered: POST /fv/gate/open got no answer" in capsys.readouterr().err
        else:
            with pytest.raises(ServerError, match="POST /fv/gate/open got no answer within 0.3 s"):
                restore.open_gate(s)


def test_an_answer_that_is_not_http_or_is_cut_short_is_a_server_error():
    """Something else on the port (`SSH-2.0-...`), or a body shorter than its length: http.client's
    own exceptions are not OSErrors, and escaped every caller as a traceback (found by review,
    2026-12-06); healthy() and gate_is_open() then say no."""
    import socket

    from fvboot.control import ServerControl
    from fvboot.errors import ServerError

    for reply in (b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"gate\":"):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]

        def answer(srv=srv, reply=reply):
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conn.recv(4096)
                conn.sendall(reply)
                conn.close()

        threading.Thread(target=answer, daemon=True).start()
        try:
            ctl = ServerControl(port, "token", "m")
            with pytest.raises(ServerError, match=r"^GET /fv/gate/state got no HTTP answer: (BadStatusLine|IncompleteRead)"):
                ctl._call("GET", "/fv/gate/state", timeout=5)
            assert not ctl.healthy() and not ctl.gate_is_open()
        finally:
            srv.close()


def test_an_admin_call_answered_without_this_starts_mark_is_another_servers():
    """The probe goes to a public route: another start's server on the port (the host's network,
    both listening with SO_REUSEPORT) answered it as a client's, and the gate opened on answers
    this start's server never gave (found by review, 2026-12-06). fvboot's middleware marks its
    answers to a request whose token it took; an answer without the mark is not this server's."""
    from fvboot.control import ServerControl
    from fvboot.errors import ServerError

    with _server(lambda *_: (200, {"choices": [{"text": " B answers"}]}, False)) as port:
        ctl = ServerControl(port, "token", "m")
        with pytest.raises(ServerError, match=r"^POST /v1/completions was answered by a server that does not know"
                                              r" this start's admin token: another server listens on"):
            ctl.complete("p", 4)
        assert ctl.healthy()  # /health is public: whose server it is, knows_the_token says
