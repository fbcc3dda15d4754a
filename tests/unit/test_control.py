"""ServerControl against a real HTTP server: a worker's exception reaches the operator as one line."""

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

