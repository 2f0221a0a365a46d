"""What the trainer tells whoever drives it while a run goes on: small typed events.

Numbering, the same everywhere: `phase` is the 0-based task index (MLflow's `step`), and a person
reads it as `phase_label` gives it, "phase 1/5" for the first of five; epochs and batches count
from 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union


@dataclass(frozen=True)
class PhaseStarted:
    phase: int
    num_phases: int


@dataclass(frozen=True)
class BatchDone:
    phase: int
    epoch: int  # 1..epochs
    batch: int  # 1..batches
    batches: int


@dataclass(frozen=True)
class EpochDone:
    phase: int
    epoch: int  # 1..epochs
    epochs: int
    loss: float
    lr: float
    val_acc: Optional[float] = None  # with train.validate_every_epoch


@dataclass(frozen=True)
class PhaseDone:
    phase: int
    num_phases: int
    metrics: dict[str, float] = field(default_factory=dict)


ProgressEvent = Union[PhaseStarted, BatchDone, EpochDone, PhaseDone]
ProgressCallback = Callable[[ProgressEvent], None]


def phase_label(phase: int, num_phases: int) -> str:
    """How every printed line names a phase: its count over the total, "phase 1/5" for phase 0."""
    return f"phase {phase + 1}/{num_phases}"
