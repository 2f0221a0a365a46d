"""Terminal output: a live progress display on a terminal, plain lines elsewhere."""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class ProgressDisplay:
    """Receives the trainer's progress events; rich bars on a TTY, one line per epoch otherwise."""

    def __init__(self, label: str = "", live: bool | None = None) -> None:
        self.label = label
        self.live = console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.phase_task = self.epoch_task = None

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"), console=console, transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if self.progress is None:
            self._plain(event)
            return
        p = self.progress
        if kind == "phase_start":
            if self.phase_task is None:
                self.phase_task = p.add_task(f"{self.label} phases", total=event["num_phases"], info="")
            p.update(self.phase_task, completed=event["phase"])
            if self.epoch_task is not None:
                p.remove_task(self.epoch_task)
            self.epoch_task = p.add_task(f"phase {event['phase']} batches", total=None, info="")
        elif kind == "batch":
            p.update(self.epoch_task, total=event["batches"], completed=event["batch"],
                     description=f"phase {event['phase']} epoch {event['epoch'] + 1}")
        elif kind == "epoch_end":
            info = f"loss {event['loss']:.4f} lr {event['lr']:.4g}"
            if "val_acc" in event:
                info += f" val {event['val_acc']:.2f}%"
            p.update(self.epoch_task, info=info)
        elif kind == "phase_end":
            m = event["metrics"]
            p.update(self.phase_task, completed=event["phase"] + 1,
                     info=f"acc {m['acc']:.2f}%  avg inc {m['avg_incremental_acc']:.2f}%")

    def _plain(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        prefix = f"[{self.label}] " if self.label else ""
        if kind == "phase_start":
            print(f"{prefix}phase {event['phase']}/{event['num_phases'] - 1}", flush=True)
        elif kind == "epoch_end":
            extra = f" val {event['val_acc']:.2f}%" if "val_acc" in event else ""
            print(f"{prefix}  epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.4f} lr {event['lr']:.4g}{extra}", flush=True)
        elif kind == "phase_end":
            m = event["metrics"]
            print(f"{prefix}  acc {m['acc']:.2f}%  avg incremental {m['avg_incremental_acc']:.2f}%  "
                  f"val avg incremental {_fmt(m.get('val_avg_incremental_acc'))}%  "
                  f"({m['train_images_per_s']:.0f} img/s, {m['phase_seconds']:.1f} s)", flush=True)


def phase_table(rows: Sequence[dict[str, float]], title: str = "") -> Table:
    """Per-phase accuracy table; `rows` are PhaseResult.metrics dicts in phase order."""
    table = Table(title=title or None)
    for column in ("phase", "acc %", "avg inc %", "val avg inc %", "forgetting", "many", "medium", "few", "img/s", "s"):
        table.add_column(column, justify="right")
    for phase, m in enumerate(rows):
        table.add_row(
            str(phase), _fmt(m.get("acc")), _fmt(m.get("avg_incremental_acc")), _fmt(m.get("val_avg_incremental_acc")),
            _fmt(m.get("forgetting")),
            _fmt(m.get("acc_many")), _fmt(m.get("acc_medium")), _fmt(m.get("acc_few")),
            _fmt(m.get("train_images_per_s"), 0), _fmt(m.get("phase_seconds"), 1),
        )
    return table


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def error(message: str) -> None:
    """One line on stderr, passwords in any URI redacted; the caller chooses the exit code."""
    from pipeline.tracking import redact_text

    text = redact_text(message).strip()
    first_line = text.splitlines()[0] if text else "unknown error"
    print(f"error: {first_line}", file=sys.stderr, flush=True)
