"""`fvbuild image --json`: one JSON object per line on stdout, for CI; the console report keeps
stdout for the tag alone."""

from __future__ import annotations

import json

from rich.console import Console

from fvbuild.engine import BuildEvent, BuildResult
from fvbuild.report import ConsoleReport, JsonReport

EVENTS = [BuildEvent("step", "FROM debian AS criu", 1, 3, "criu"), BuildEvent("log", "compiling", stage="criu"),
          BuildResult("sha256:" + "a" * 64, {"criu": 1.5})]


def test_json_report_is_one_object_per_line_ending_in_done(capsys):
    r = JsonReport()
    assert r.build(EVENTS) is EVENTS[-1]
    r.bake_line("fvboot: vLLM is healthy")
    r.done("fv/x:cpu", 5_640_000_000, {"criu": 1.5, "bake run": 130.0}, 171.234,
           {"checkpoint_bytes": 1420000000, "weights_bytes": 984352})
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["step", "log", "bake", "done"]
    assert lines[0] == {"event": "step", "stage": "criu", "step": 1, "total": 3, "text": "FROM debian AS criu"}
    assert lines[-1] == {"event": "done", "tag": "fv/x:cpu", "image_bytes": 5640000000,
                         "seconds": {"criu": 1.5, "bake run": 130.0, "total": 171.23},
                         "checkpoint_bytes": 1420000000, "weights_bytes": 984352}


def test_json_errors_are_an_event_and_one_stderr_line(capsys):
    JsonReport().error("base image x:1 is not on this machine")
    out, err = capsys.readouterr()
    assert json.loads(out) == {"event": "error", "message": "base image x:1 is not on this machine"}
    assert err == "fvbuild: base image x:1 is not on this machine\n"


def test_console_report_leaves_stdout_to_the_tag(capsys):
    r = ConsoleReport(Console(stderr=True, highlight=False))
    r.build(EVENTS)
    r.bake_line("line")
    r.done("fv/x:cpu", 5_640_000_000, {"criu": 1.5}, 10.0, {})
    out, err = capsys.readouterr()
    assert out == "fv/x:cpu\n"
    assert "  bake| line" in err and "fv/x:cpu  (5.64 GB)" in err
