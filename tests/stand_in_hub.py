"""A stand-in for the Hugging Face Hub on this machine (the real one cannot be reached here): it
serves one repo's files the way the Hub's API does for huggingface_hub's snapshot download, at
the revisions it is given, or answers every request with one error. The unit tests of the
download and the end-to-end bake of a Hub model point the real client at it (HF_ENDPOINT)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from urllib.parse import unquote

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves one repo of FILES the way the Hub's API does for huggingface_hub's snapshot
    download, or answers every request with ERROR (status, X-Error-Code)."""

    def __init__(self, files: dict[str, bytes] | None = None, error: tuple[int, str | None] | None = None,
                 revisions: dict[str, str] | None = None):
        self.files, self.error, self.seen = files or {}, error, []
        self.revisions = {"main": SHA, **(revisions or {})}  # branch or tag -> commit
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes = b"", headers: tuple = ()) -> None:
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub.seen.append(self.path)
                if hub.error:
                    code, err = hub.error
                    return self._send(code, b'{"error": "no"}', (("X-Error-Code", err),) if err else ())
                js = (("content-type", "application/json"),)
                if "/tree/" in self.path:
                    return self._send(200, json.dumps([{"type": "file", "path": f, "size": len(b), "oid": _oid(b)}
                                                       for f, b in hub.files.items()]).encode(), js)
                if self.path.startswith("/api/models/"):
                    rev = unquote(self.path.split("?")[0].split("/revision/", 1)[1]) if "/revision/" in self.path else "main"
                    sha = rev if rev in hub.revisions.values() else hub.revisions.get(rev)
                    if sha is None:
                        return self._send(404, b'{"error": "no"}', (("X-Error-Code", "RevisionNotFound"),))
                    return self._send(200, json.dumps({"id": "org/model", "sha": sha, "siblings":
                                                       [{"rfilename": f} for f in hub.files]}).encode(), js)
                rev, name = self.path.split("/resolve/", 1)[-1].split("/", 1)
                if name in hub.files:
                    b = hub.files[name]
                    commit = hub.revisions.get(unquote(rev), unquote(rev))
                    return self._send(200, b, (("X-Repo-Commit", commit), ("ETag", f'"{_oid(b)}"')))
                self._send(404, b"{}", (("X-Error-Code", "EntryNotFound"),))

            do_HEAD = do_GET

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _oid(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()
