"""How `fvbuild image` tells what it is doing: for people (a progress bar, the bake's log, a phase
table, on stderr) or, with `--json`, for CI (one JSON object per line on stdout: build steps, log
lines, bake lines, then `done` with the tag, the sizes and the phases, or `error`)."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .engine import BuildEvent, BuildResult


class ConsoleReport:
    def __init__(self, console: Console) -> None:
        self.console = console

    def build(self, events: Iterable[BuildEvent | BuildResult]) -> Optional[BuildResult]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        result = None
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=self.console, transient=False) as progress:
            task = progress.add_task("build", total=None)
            for ev in events:
                if isinstance(ev, BuildResult):
                    result = ev
                elif ev.kind == "step":
                    progress.update(task, total=ev.total, completed=ev.step, description=f"[{ev.stage}] {ev.text[:70]}")
                else:
                    progress.console.print(f"  {ev.text}", markup=False, highlight=False)
        return result

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def bake_line(self, line: str) -> None:
        self.console.print(f"  bake| {line}", markup=False, highlight=False)

    def done(self, tag: str, size: int, phases: dict[str, float], total: float, sizes: dict[str, int]) -> None:
        # The name on its own line: a table title would wrap it at the console's width.
        self.console.print(f"{tag}  ({size / 1e9:.2f} GB)", soft_wrap=True, markup=False)
        table = Table()
        table.add_column("stage / phase")
        table.add_column("seconds", justify="right")
        for name, secs in phases.items():
            table.add_row(name, f"{secs:.1f}")
        table.add_row("total", f"{total:.1f}")
        self.console.print(table)
        print(tag, flush=True)

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]fvbuild:[/] {escape(message)}", markup=True, soft_wrap=True, emoji=False)


class JsonReport:
    """One JSON object per line on stdout; nothing else is written there."""

    def _emit(self, **obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def build(self, events: Iterable[BuildEvent | BuildResult]) -> Optional[BuildResult]:
        result = None
        for ev in events:
            if isinstance(ev, BuildResult):
                result = ev
            elif ev.kind == "step":
                self._emit(event="step", stage=ev.stage, step=ev.step, total=ev.total, text=ev.text)
            else:
                self._emit(event="log", stage=ev.stage, text=ev.text)
        return result

    def note(self, text: str) -> None:
        self._emit(event="note", text=text)

    def bake_line(self, line: str) -> None:
        self._emit(event="bake", text=line)

    def done(self, tag: str, size: int, phases: dict[str, float], total: float, sizes: dict[str, int]) -> None:
        self._emit(event="done", tag=tag, image_bytes=size, seconds={**{k: round(v, 2) for k, v in phases.items()},
                                                                     "total": round(total, 2)}, **sizes)

    def error(self, message: str) -> None:
        self._emit(event="error", message=message)
        print(f"fvbuild: {message}", file=sys.stderr, flush=True)
