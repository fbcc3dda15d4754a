"""Start-up timeline: named events in seconds since the process (container) started, printed as
a table and as JSON lines (`{"fvboot_timeline": ...}`) for log collectors."""

from __future__ import annotations

import json
import os
import time

from .output import write_line


def process_start_epoch() -> float:
    """When this process started (for PID 1: when the container started): its start time in
    clock ticks since boot, against /proc/uptime (10 ms resolution; btime is whole seconds)."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return time.time()


class Timeline:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.t0 = process_start_epoch()
        self.events: list[tuple[str, float]] = [("process start", 0.0)]

    def mark(self, event: str, at_epoch: float | None = None) -> float:
        t = (at_epoch if at_epoch is not None else time.time()) - self.t0
        self.events.append((event, t))
        write_line(json.dumps({"fvboot_timeline": {"kind": self.kind, "event": event, "t": round(t, 3)}}))
        return t

    def as_dict(self) -> dict[str, float]:
        return {e: round(t, 3) for e, t in self.events}

    def print_table(self) -> None:
        lines = [f"fvboot {self.kind} timeline", f"{'event':<28}{'t (s)':>9}{'step (s)':>10}"]
        prev = 0.0
        for e, t in self.events:
            lines.append(f"{e:<28}{t:>9.3f}{t - prev:>10.3f}")
            prev = t
        write_line("\n".join(lines))
