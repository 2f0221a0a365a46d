"""Accuracy-matrix metrics of method.md §4, kept free of training code so they can be checked by hand.

Matrices are (num_phases, num_phases) float arrays in percent: A[t, u] is the accuracy after
task t on the test images of task u; entries with u > t, and rows not reached yet, are NaN.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

SHOT_MANY_ABOVE = 100  # more than this many training images: many-shot
SHOT_FEW_BELOW = 20  # fewer than this: few-shot; in between (inclusive): medium


def new_matrix(num_phases: int) -> np.ndarray:
    """NaN marks 'not evaluated', so unfilled rows can never be mistaken for 0 % accuracy."""
    return np.full((num_phases, num_phases), np.nan, dtype=np.float64)


def _seen_row(acc_matrix: np.ndarray, t: int) -> np.ndarray:
    row = np.asarray(acc_matrix, dtype=np.float64)[t, : t + 1]
    if np.isnan(row).any():
        raise ValueError(f"row {t} of the accuracy matrix has NaN among seen tasks 0..{t}")
    return row


def average_accuracy(acc_matrix: np.ndarray, t: int) -> float:
    """The reference's unweighted avg_acc[t]: every seen task counts once."""
    return float(_seen_row(acc_matrix, t).mean())


def class_weighted_accuracy(acc_matrix: np.ndarray, t: int, classes_per_task: Sequence) -> float:
    """Weights each task by its class count, so LFH's 50-class base task is not drowned by small tasks.

    `classes_per_task` holds either counts or the label lists of the tasks.
    """
    row = _seen_row(acc_matrix, t)
    weights = _task_weights(classes_per_task, t)
    if weights.shape != row.shape:
        raise ValueError(f"need class counts for tasks 0..{t}, got {len(weights)}")
    return float((row * weights).sum() / weights.sum())


def _task_weights(classes_per_task: Sequence, t: int) -> np.ndarray:
    """Classes per seen task; `classes_per_task` holds counts or the tasks' label lists."""
    return np.array(
        [len(c) if isinstance(c, (list, tuple, np.ndarray)) else c for c in classes_per_task[: t + 1]],
        dtype=np.float64,
    )


def average_incremental_accuracy(acc_matrix: np.ndarray, t: int) -> float:
    """The paper's table number (at t = T-1): every phase counts, task 0 included."""
    return float(np.mean([average_accuracy(acc_matrix, s) for s in range(t + 1)]))


# What the validation metrics mean, recorded on every run and sweep so that a resume never mixes
# two meanings under one metric name. 1: a task's held-out accuracy pooled its images (the long
# tail's head outvoted its tail); 2: the mean of its classes' held-out accuracies (below).
VALIDATION_METRIC_VERSION = 2


def class_balanced_task_accuracy(class_acc, class_labels, task_classes: Sequence[Sequence[int]], t: int) -> np.ndarray:
    """Per seen task, the mean of its classes' accuracies: (t+1,) percent; NaN for a task without images.

    The held-out images follow the long tail while the test set is balanced, so only this mean
    estimates what a task's test accuracy measures; a class without images (NaN) is left out.
    """
    acc_by_class = dict(zip(np.asarray(class_labels, dtype=np.int64).tolist(), np.asarray(class_acc, dtype=np.float64)))
    out = np.full(t + 1, np.nan)
    for u in range(t + 1):
        present = [acc_by_class[c] for c in task_classes[u] if not np.isnan(acc_by_class.get(c, np.nan))]
        if present:
            out[u] = float(np.mean(present))
    return out


def validation_accuracy(val_matrix: np.ndarray, t: int) -> float:
    """avg_acc[t] on the held-out images: the mean over the seen tasks that have any (method.md §4).

    Each entry of the validation matrix is already class-balanced (`class_balanced_task_accuracy`).

    A task whose classes all kept every image (n <= 5, method.md §1) has no held-out image and a
    NaN entry; it is left out rather than counted as 0 %. NaN when no seen task has one.
    """
    return mean_of_present(np.asarray(val_matrix, dtype=np.float64)[t, : t + 1])


def mean_of_present(values) -> float:
    """The mean of the non-NaN entries; NaN when there are none (no held-out image to judge by)."""
    values = np.asarray(values, dtype=np.float64)
    present = ~np.isnan(values)
    return float(values[present].mean()) if present.any() else math.nan


def validation_class_weighted_accuracy(val_matrix: np.ndarray, t: int, classes_per_task: Sequence) -> float:
    """The class-weighted avg_acc[t] on held-out images, over the seen tasks that have any."""
    row = np.asarray(val_matrix, dtype=np.float64)[t, : t + 1]
    weights = _task_weights(classes_per_task, t)
    present = ~np.isnan(row)
    if not present.any():
        return math.nan
    return float((row[present] * weights[present]).sum() / weights[present].sum())


def validation_average_incremental_accuracy(val_matrix: np.ndarray, t: int) -> float:
    """The mean of validation_accuracy over phases 0..t, skipping phases where it is NaN."""
    values = [validation_accuracy(val_matrix, s) for s in range(t + 1)]
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def forgetting(acc_matrix: np.ndarray, t: int) -> float:
    """Best past accuracy minus current, per old task, as the reference logs it; 0 before any old task."""
    if t == 0:
        return 0.0
    a = np.asarray(acc_matrix, dtype=np.float64)
    drops = [np.nanmax(a[u:t, u]) - a[t, u] for u in range(t)]
    return float(np.mean(drops))


def shot_groups(train_counts) -> np.ndarray:
    """The usual long-tail split, so head/tail behaviour can be reported separately."""
    counts = np.asarray(train_counts)
    groups = np.full(counts.shape, "medium", dtype="<U6")
    groups[counts > SHOT_MANY_ABOVE] = "many"
    groups[counts < SHOT_FEW_BELOW] = "few"
    return groups


def shot_accuracies(per_class_correct, per_class_total, train_counts) -> dict[str, float]:
    """Pooled over images (not averaged over classes), so with balanced test sets both agree."""
    correct = np.asarray(per_class_correct, dtype=np.float64)
    total = np.asarray(per_class_total, dtype=np.float64)
    groups = shot_groups(train_counts)
    out = {}
    for name in ("many", "medium", "few"):
        mask = groups == name
        n = total[mask].sum()
        out[f"acc_{name}"] = float(100.0 * correct[mask].sum() / n) if n > 0 else float("nan")
    return out


class AccuracyRows(NamedTuple):
    """One phase's evaluation, ready to write into row t of both matrices and into per-class tables."""

    acc: np.ndarray  # (t+1,) task-agnostic A[t, 0..t], percent
    task_aware: np.ndarray  # (t+1,) task-aware accuracy per seen task, percent
    class_labels: np.ndarray  # (n_seen,) seen labels in task order
    class_correct: np.ndarray  # (n_seen,) task-agnostic correct test images per class
    class_total: np.ndarray  # (n_seen,) test images per class
    class_acc: np.ndarray  # (n_seen,) percent; NaN for a class without test images


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy_rows(predictions, task_aware_predictions, labels, task_classes: Sequence[Sequence[int]], t: int) -> AccuracyRows:
    """Scores one phase from predicted labels, so the model code only has to produce argmaxes.

    All three label arrays (torch or numpy, one entry per test image of a seen class) hold class
    positions 0..C-1; `task_aware_predictions` is the argmax within the image's own task head.
    """
    pred = _to_numpy(predictions).astype(np.int64).ravel()
    pred_ta = _to_numpy(task_aware_predictions).astype(np.int64).ravel()
    y = _to_numpy(labels).astype(np.int64).ravel()
    if not (pred.shape == pred_ta.shape == y.shape):
        raise ValueError("predictions, task-aware predictions and labels differ in length")
    hit = pred == y
    hit_ta = pred_ta == y

    acc = np.full(t + 1, np.nan)
    acc_ta = np.full(t + 1, np.nan)
    for u in range(t + 1):
        mask = np.isin(y, np.asarray(task_classes[u], dtype=np.int64))
        if mask.any():
            acc[u] = 100.0 * hit[mask].mean()
            acc_ta[u] = 100.0 * hit_ta[mask].mean()

    seen = np.array([c for u in range(t + 1) for c in task_classes[u]], dtype=np.int64)
    size = int(max(seen.max(initial=-1), y.max(initial=-1))) + 1
    correct_all = np.bincount(y[hit], minlength=size)
    total_all = np.bincount(y, minlength=size)
    class_correct = correct_all[seen]
    class_total = total_all[seen]
    with np.errstate(invalid="ignore", divide="ignore"):
        class_acc = np.where(class_total > 0, 100.0 * class_correct / np.maximum(class_total, 1), np.nan)
    return AccuracyRows(acc, acc_ta, seen, class_correct, class_total, class_acc)
