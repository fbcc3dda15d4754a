"""fvboot's metrics on /metrics: appended to the server's own answer, uncompressed, with the start
path, the phases and the requests held at the gate, in Prometheus' text format."""

from __future__ import annotations

import asyncio
import json

from fvboot.metrics import exposition, phase_name
from fvboot.middleware import GateMiddleware

VLLM_METRICS = b"# HELP vllm:num_requests_running x\nvllm:num_requests_running 0.0\n"
STARTUP = {"path": "normal", "reason": 'baked on cuda, running on "cpu"',
           "phases": {"process start": 0.0, "criu: memory restored": 1.2, "ready": 44.9}}


async def _vllm_metrics(scope, receive, send):
    _vllm_metrics.seen = scope
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(VLLM_METRICS)).encode())]})
    await send({"type": "http.response.body", "body": VLLM_METRICS})


def _get(mw, path="/metrics"):
    sent = []

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "GET", "path": path,
             "headers": [(b"accept-encoding", b"gzip"), (b"accept", b"application/openmetrics-text; version=1.0.0")]}
    asyncio.run(mw(scope, None, send))
    return sent


def test_the_exposition_names_path_reason_and_phases():
    text = exposition(STARTUP, 3)
    assert 'fastvllm_start_path{path="normal",reason="baked on cuda, running on \\"cpu\\""} 1' in text
    assert 'fastvllm_startup_seconds{phase="criu_memory_restored"} 1.200' in text
    assert 'fastvllm_startup_seconds{phase="ready"} 44.900' in text
    assert "fastvllm_gate_held_requests_total 3" in text and "# TYPE fastvllm_gate_held_requests_total counter" in text
    assert phase_name("criu: CUDA resumed") == "criu_cuda_resumed"
    assert exposition(None, 0) == ("# HELP fastvllm_gate_held_requests_total Requests that waited at fvboot's "
                                   "closed gate.\n# TYPE fastvllm_gate_held_requests_total counter\n"
                                   "fastvllm_gate_held_requests_total 0\n")


def test_metrics_answer_is_vllms_then_ours(tmp_path, monkeypatch):
    (tmp_path / "runtime.json").write_text(json.dumps({"admin_token": "5e" * 32, "startup": STARTUP}))
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "runtime.json"))
    mw = GateMiddleware(_vllm_metrics)
    start, body = _get(mw)
    assert start["status"] == 200 and b"content-length" not in dict(start["headers"])
    assert body["body"].startswith(VLLM_METRICS) and b'fastvllm_start_path{path="normal"' in body["body"]
    assert b"accept-encoding" not in dict(_vllm_metrics.seen["headers"])  # so the answer is plain text
    # Prometheus asks for OpenMetrics first: fvboot's lines after its `# EOF` would fail the whole
    # scrape (found by review, 2026-12-06), so vLLM is asked for the text format
    assert [v for k, v in _vllm_metrics.seen["headers"] if k == b"accept"] == [b"text/plain; version=0.0.4"]


def test_requests_held_at_the_gate_are_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("FV_RUNTIME_FILE", str(tmp_path / "missing.json"))
    monkeypatch.setenv("FV_GATE_WAIT_S", "0.05")
    mw = GateMiddleware(_vllm_metrics)
    mw._open.clear()
    assert _get(mw, "/v1/models")[0]["status"] == 503  # waited, then the gate's 503
    mw._open.set()
    assert b"fastvllm_gate_held_requests_total 1" in _get(mw)[1]["body"]


def test_publishing_never_stops_a_server_that_is_up(tmp_path, capfd, monkeypatch):
    """A runtime file that is gone or unknown costs the metrics, never the server."""
    from fvboot import serve
    from fvboot.layout import Layout
    from fvboot.restore import RestoredTree
    from fvboot.timeline import Timeline

    monkeypatch.setenv("FV_RUN_DIR", str(tmp_path / "run"))  # holds no runtime file
    serve._publish_startup(Layout(tmp_path), RestoredTree(1), Timeline("serve"), {})
    serve._publish_startup(Layout(tmp_path / "nothing"), object(), Timeline("serve"), {"reason": "x"})
    err = capfd.readouterr().err
    assert err.count("start-up metrics not published") == 2
