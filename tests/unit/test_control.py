"""ServerControl against a real HTTP server: a worker's exception reaches the operator as one
line; a server that stays silent is a bounded, named error."""

from __future__ import annotations

import pytest


def test_server_errors_become_one_line_fvboot_errors():
    """A worker exception (HTTP 500 from collective_rpc) must reach the operator as one line."""
    import http.server
    import threading

    from fvboot.control import ServerControl
    from fvboot.errors import ServerError

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = b'{"error": "WeightCollectionError: layer.cpu_linear captures a Foo"}'
            self.send_response(500)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ctl = ServerControl(srv.server_address[1], "token", "m")
        with pytest.raises(ServerError, match="POST /collective_rpc answered 500: .*captures a Foo"):
            ctl.rpc("fv_dump_weights", "/x")
    finally:
        srv.shutdown()



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
