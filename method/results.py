"""What the phase-by-phase trainer hands back after each task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

# Names of the scalar metrics in PhaseResult.metrics, in the order a table shows them.
# Accuracies are in percent, as in the paper's table.
METRIC_NAMES = (
    "acc",  # avg_acc[t]: mean over seen tasks u of A[t, u] (task-agnostic)
    "acc_class_weighted",  # the same, each task weighted by its number of classes
    "avg_incremental_acc",  # mean of acc over phases 0..t: the paper's number when t = T-1
    "task_aware_acc",  # mean over seen tasks of the task-aware accuracy
    "forgetting",  # mean over u < t of max_{t' < t} A[t', u] - A[t, u]; 0 at t = 0
    "acc_many",  # accuracy on classes with > 100 training images
    "acc_medium",  # 20..100
    "acc_few",  # < 20
    # The same on the held-out 10 % of each task's training images (method.md §1), over the seen
    # tasks that have held-out images: what sweeps select on, so the test set is only reported.
    # A task's held-out accuracy is the mean of its classes' (the test set is balanced, the
    # held-out images follow the long tail).
    "val_acc",
    "val_acc_class_weighted",
    "val_avg_incremental_acc",
    "val_images",  # held-out images of the seen classes that the validation used
    "loss",  # mean training loss of the phase's last epoch
    "train_images",  # images the phase's training saw: epochs x (new images + exemplars)
    "train_images_per_s",  # training images processed per second of training
    "train_seconds",
    "phase_seconds",  # training + memory update + evaluation
    "phase_reused",  # 1 where the phase's training came from the phase store, else 0
)
# Computed on the test set: reported, never selected on.
TEST_METRICS = ("acc", "acc_class_weighted", "avg_incremental_acc", "task_aware_acc", "forgetting", "acc_many", "acc_medium", "acc_few")
VALIDATION_METRICS = ("val_acc", "val_acc_class_weighted", "val_avg_incremental_acc")


def paired_metric(name: str) -> str | None:
    """The same quantity on the other split: val_acc <-> acc; None when there is none."""
    if name in VALIDATION_METRICS:
        return name[len("val_") :]
    if f"val_{name}" in VALIDATION_METRICS:
        return f"val_{name}"
    return None


def metric_split(name: str) -> str:
    """Which images a metric is measured on: "validation", "test" or "training"."""
    if name in VALIDATION_METRICS:
        return "validation"
    return "test" if name in TEST_METRICS else "training"


def reported_beside(name: str) -> str | None:
    """The test metric reported next to a validation metric that a sweep selects by."""
    other = paired_metric(name)
    return other if name in VALIDATION_METRICS else None


@dataclass
class PhaseResult:
    phase: int  # task index t, 0-based
    num_phases: int  # 1 + incremental tasks
    # Class labels are positions in the class order (0..C-1); task u holds task_classes[u].
    task_classes: list[list[int]]
    # (num_phases, num_phases) percent; rows > phase and entries u > row are NaN.
    acc_matrix: np.ndarray
    task_aware_matrix: np.ndarray
    metrics: dict[str, float]
    # One entry per seen class, all lists of equal length: "position" (in the class order,
    # what the heads and task_classes use), "original_label" (the dataset's), "name",
    # "train_count" (orig(c)), "memory_count", "test_count", "accuracy" (percent),
    # "val_count" and "val_accuracy" (held-out images and accuracy on them; NaN where none),
    # "head_weight_norm", "shot" ("many"/"medium"/"few").
    per_class: dict[str, list]
    # Everything needed to continue with phase + 1 (model, memory, RNG states, matrices);
    # torch.save-able, CPU tensors only.
    state: dict[str, Any] = field(repr=False, default_factory=dict)
    # Like acc_matrix, on the held-out images; NaN also for a seen task without held-out images.
    val_matrix: Optional[np.ndarray] = None
    # Who trained this phase, where it came from a phase store (method/phases.py); None: this run.
    reused_from: Optional[str] = None

    @property
    def is_last(self) -> bool:
        return self.phase == self.num_phases - 1
