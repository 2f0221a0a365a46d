"""Figures logged per phase and reused by reports.

Figures are built on matplotlib's object API with an explicit Agg canvas rather than pyplot:
pyplot keeps every figure in a process-wide registry and may pick a GUI backend, which leaks
memory over hundreds of phases and breaks on headless workers. A `Figure` that no registry
holds is freed as soon as the function returns, so there is nothing left open to close.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

# Colours that stay distinguishable for colour-blind readers (Okabe-Ito).
_OLD_NEW_COLOURS = {"old": "#0072B2", "new": "#E69F00"}
_SHOT_COLOURS = {"many": "#0072B2", "medium": "#009E73", "few": "#D55E00"}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
    return path


def accuracy_heatmap(acc_matrix: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Accuracy matrix A[t, u] (row: after task t, column: task u); NaN cells stay blank.

    Annotations make the figure readable without a colour bar lookup, which is how the
    forgetting of single tasks is usually read off.
    """
    matrix = np.asarray(acc_matrix, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D (got shape {matrix.shape})")
    rows, cols = matrix.shape
    size = max(3.0, 0.55 * max(rows, cols) + 1.5)
    fig = _new_figure(size + 0.8, size)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=100.0, aspect="equal")
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.8)
    font = 8 if max(rows, cols) <= 10 else 6
    for (r, c), value in np.ndenumerate(matrix):
        if math.isfinite(value):
            # Dark text on the bright end of viridis, light text on the dark end.
            colour = "black" if value > 60.0 else "white"
            ax.text(c, r, f"{value:.1f}", ha="center", va="center", fontsize=font, color=colour)
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_xlabel("evaluated task u")
    ax.set_ylabel("after training task t")
    ax.set_title(title or "task-agnostic accuracy A[t, u]")
    return _save(fig, path)


def weight_norm_plot(
    per_class: Mapping[str, Sequence],
    path: str | Path,
    *,
    new_labels: Sequence[int] | None = None,
    colour_by: str | None = None,
    title: str | None = None,
) -> Path:
    """Per-class L2 norm of the head weights, classes sorted by training-set size (largest first).

    This is the bias-correction figure: without reweighting, the norms of frequent (and new)
    classes dominate. Bars are coloured old/new when `new_labels` (the current task's classes,
    by class-order position) is given, else by shot group; `colour_by` ("task" or "shot") forces
    either. Up to 30 bars are captioned with the class's name and training images.
    """
    labels = list(per_class["position"])
    norms = np.asarray(per_class["head_weight_norm"], dtype=float)
    counts = list(per_class["train_count"])
    if not (len(labels) == len(norms) == len(counts)):
        raise ValueError("per_class columns label, head_weight_norm and train_count differ in length")
    mode = colour_by or ("task" if new_labels is not None else "shot")
    if mode not in ("task", "shot"):
        raise ValueError(f"colour_by must be 'task' or 'shot' (got {colour_by!r})")
    if mode == "task" and new_labels is None:
        raise ValueError("colour_by='task' needs new_labels")

    order = _many_to_few(counts)
    if mode == "task":
        new = set(int(x) for x in new_labels)
        groups = ["new" if int(labels[i]) in new else "old" for i in order]
        palette = _OLD_NEW_COLOURS
    else:
        shots = list(per_class.get("shot", ["many"] * len(labels)))
        groups = [str(shots[i]) for i in order]
        palette = _SHOT_COLOURS
    colours = [palette.get(g, "#999999") for g in groups]

    fig = _new_figure(max(4.0, 0.12 * len(labels) + 2.0), 3.2)
    ax = fig.add_subplot()
    ax.bar(range(len(order)), norms[order], color=colours, width=0.85)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xlabel("class (sorted by training images, many to few)")
    ax.set_ylabel("head weight L2 norm")
    if len(order) <= 30:
        captions = class_captions(per_class)
        ax.set_xticks(range(len(order)), [captions[i] for i in order], fontsize=7, rotation=90)
    else:
        ax.set_xticks([])
    present = [g for g in palette if g in groups]
    ax.legend(handles=[Patch(color=palette[g], label=g) for g in present], fontsize=8, frameon=False)
    ax.set_title(title or "classifier weight norms")
    return _save(fig, path)


def class_captions(per_class: Mapping[str, Sequence]) -> list[str]:
    """Each class as a reader knows it: the dataset's name, else its original label, with its training images.

    The class-order position (`position`) is what the heads use, not what the data calls the
    class: CIFAR-10-LT shuffled trains position 0 on whatever class the seed put first.
    """
    positions = list(per_class["position"])
    names = list(per_class.get("name", [""] * len(positions)))
    originals = list(per_class.get("original_label", positions))
    return [f"{name or original} ({count})" for name, original, count in zip(names, originals, per_class["train_count"])]


def _many_to_few(train_counts: Sequence[int]) -> list[int]:
    """Indices by training-set size, largest first; the stable sort keeps ties in class order."""
    return sorted(range(len(train_counts)), key=lambda i: -train_counts[i])


def accuracy_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str | None = None,
    ylabel: str = "accuracy (%)",
) -> Path:
    """One line per label (a seed, a learner) of accuracy against phase; NaN values leave gaps."""
    fig = _new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    longest = 0
    for label, values in curves.items():
        y = np.asarray(list(values), dtype=float)
        longest = max(longest, len(y))
        ax.plot(np.arange(len(y)), y, marker="o", markersize=3, linewidth=1.5, label=str(label))
    if longest:
        ax.set_xticks(range(longest))
    ax.set_xlabel("phase (task)")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(curves) > 1 or any(str(k) for k in curves):
        ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "accuracy per phase")
    return _save(fig, path)


def accuracy_curve(acc_per_phase: Sequence[float], path: str | Path, label: str = "acc", title: str | None = None) -> Path:
    """Single-run accuracy per phase; the one-line case of `accuracy_curves`."""
    return accuracy_curves({label: acc_per_phase}, path, title=title)
