"""fvboot's own Prometheus metrics, served on vLLM's `/metrics` next to vLLM's.

fvboot (PID 1) knows how the server started: it writes the path taken and the start-up timeline
into this start's runtime file once the server is up (`runtime_file.add_runtime_info`); the gate
middleware, inside the server, adds these lines to every `/metrics` answer:

    fastvllm_start_path{path="restored",reason=""} 1
    fastvllm_startup_seconds{phase="restore_done"} 1.283     (seconds since the container started)
    fastvllm_gate_held_requests_total 3                       (requests that waited at the gate)
"""

from __future__ import annotations

import re

_LABEL_UNSAFE = re.compile(r"[^a-z0-9]+")


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def phase_name(event: str) -> str:
    """A timeline event as a label value: 'criu: memory restored' -> 'criu_memory_restored'."""
    return _LABEL_UNSAFE.sub("_", event.lower()).strip("_")


def exposition(startup: object, held_requests: int) -> str:
    """The metrics in Prometheus' text format (STARTUP: what fvboot wrote, or None)."""
    lines = ["# HELP fastvllm_gate_held_requests_total Requests that waited at fvboot's closed gate.",
             "# TYPE fastvllm_gate_held_requests_total counter",
             f"fastvllm_gate_held_requests_total {held_requests}"]
    if isinstance(startup, dict):
        path, reason = str(startup.get("path", "")), str(startup.get("reason", ""))
        lines += ["# HELP fastvllm_start_path How this container's server started (restored or normal, and why).",
                  "# TYPE fastvllm_start_path gauge",
                  f'fastvllm_start_path{{path="{_label(path)}",reason="{_label(reason)}"}} 1']
        phases = startup.get("phases")
        if isinstance(phases, dict):
            lines += ["# HELP fastvllm_startup_seconds Seconds from the container's start to each start-up phase.",
                      "# TYPE fastvllm_startup_seconds gauge"]
            lines += [f'fastvllm_startup_seconds{{phase="{_label(phase_name(str(k)))}"}} {float(v):.3f}'
                      for k, v in phases.items() if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n"
