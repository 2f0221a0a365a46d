"""Terminal output: a live progress display on a terminal, plain lines elsewhere."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from method.events import BatchDone, EpochDone, PhaseDone, PhaseStarted, ProgressEvent, phase_label

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


class ProgressDisplay:
    """Receives the trainer's progress events; rich bars on a TTY, one line per epoch otherwise."""

    def __init__(self, label: str = "", live: bool | None = None) -> None:
        self.label = label
        self.live = console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.phase_task = self.epoch_task = None
        self.num_phases = 0

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

    def __call__(self, event: ProgressEvent) -> None:
        if self.progress is None:
            self._plain(event)
            return
        p = self.progress
        if isinstance(event, PhaseStarted):
            if self.phase_task is None:
                self.phase_task = p.add_task(f"{self.label} phases", total=event.num_phases, info="")
            p.update(self.phase_task, completed=event.phase)
            if self.epoch_task is not None:
                p.remove_task(self.epoch_task)
            self.epoch_task = p.add_task(f"{phase_label(event.phase, event.num_phases)} batches", total=None, info="")
            self.num_phases = event.num_phases
        elif isinstance(event, BatchDone):
            p.update(self.epoch_task, total=event.batches, completed=event.batch,
                     description=f"{phase_label(event.phase, self.num_phases)} epoch {event.epoch}")
        elif isinstance(event, EpochDone):
            info = f"loss {event.loss:.4f} lr {event.lr:.4g}"
            if event.val_acc is not None:
                info += f" val {event.val_acc:.2f}%"
            p.update(self.epoch_task, info=info)
        elif isinstance(event, PhaseDone):
            m = event.metrics
            p.update(self.phase_task, completed=event.phase + 1,
                     info=f"acc {m['acc']:.2f}%  avg inc {m['avg_incremental_acc']:.2f}%")

    def _plain(self, event: ProgressEvent) -> None:
        prefix = f"[{self.label}] " if self.label else ""
        if isinstance(event, PhaseStarted):
            print(f"{prefix}{phase_label(event.phase, event.num_phases)}", flush=True)
        elif isinstance(event, EpochDone):
            extra = f" val {event.val_acc:.2f}%" if event.val_acc is not None else ""
            print(f"{prefix}  epoch {event.epoch}/{event.epochs} loss {event.loss:.4f} lr {event.lr:.4g}{extra}", flush=True)
        elif isinstance(event, PhaseDone):
            m = event.metrics
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


def reuse_line(rows: Sequence[dict[str, float]], store: Optional[Path]) -> str:
    """How many of a run's phases came from the phase store, and which store."""
    reused = [phase for phase, m in enumerate(rows) if m.get("phase_reused") == 1.0]
    if store is None:
        return "phase store off: every phase trained here"
    which = f" ({', '.join(phase_label(p, len(rows)) for p in reused)})" if reused else ""
    return f"phases reused from the store: {len(reused)} of {len(rows)}{which}; store {store}"


def phase_store_table(entries: Sequence[Any], folder: Path) -> Table:
    """`imbcil phases`: one row per stored phase (pipeline.phase_store.EntryInfo)."""
    import datetime

    total = sum(e.bytes for e in entries)
    table = Table(title=f"phase store {folder}: {len(entries)} entries, {total / 1e6:.1f} MB")
    for column in ("key", "phase", "MB", "trained by", "used by", "last used", "usable"):
        table.add_column(column, justify="right" if column in ("phase", "MB") else "left")
    for e in entries:
        last = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M") if e.last_used else "-"
        table.add_row(
            e.key[:12], "-" if e.phase is None else str(e.phase), f"{e.bytes / 1e6:.1f}", e.trained_by or "-",
            ", ".join(e.used_by) or "-", last, "yes" if e.current else "no: other code",
        )
    return table


def plan_table(plans: Sequence[Any], title: str = "") -> Table:
    """`--dry-run`: one row per phase (method.plan.PhasePlan) and a total."""
    table = Table(title=title or None)
    columns = ("phase", "classes", "new images", "exemplars", "epochs", "steps", "training images", "scored", "feature pass")
    for column in columns:
        table.add_column(column, justify="right")
    fields = ("new_classes", "new_images", "memory_images", "epochs", "steps", "train_images", "scored_images", "feature_images")
    for plan in plans:
        table.add_row(str(plan.phase), *(str(getattr(plan, f)) for f in fields))
    totals = {f: sum(getattr(plan, f) for plan in plans) for f in ("steps", "train_images", "scored_images", "feature_images")}
    table.add_row("total", "", "", "", "", *(str(totals[f]) for f in ("steps", "train_images", "scored_images", "feature_images")))
    return table


def wide_console() -> Console:
    """The console for tables; off a terminal (a log file, CI) rich would squeeze them into 80 columns."""
    return console if console.is_terminal else Console(width=160, highlight=False)


def rates_line(rates: Any) -> str:
    """What a dry run measured (method.plan.Rates), in words."""
    graphs = "; steps timed without CUDA graphs, which train faster" if rates.eager_for_graphs else ""
    return (
        f"{rates.step_s:.3f} s per training step ({rates.teacher_step_s:.3f} s with the teacher), "
        f"{1 / rates.score_s:.0f} images/s scored{graphs}"
    )


def duration(seconds: float) -> str:
    """2 h 05 min, 3 min 20 s, 45 s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


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
