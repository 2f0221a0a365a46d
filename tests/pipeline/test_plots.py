"""The figures are written, valid PNGs, and leave no open figures behind."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from pipeline import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def _per_class(n=6):
    return {
        "position": list(range(n)),
        "train_count": [50, 500, 20, 500, 5, 120][:n],
        "head_weight_norm": [1.0 + 0.1 * i for i in range(n)],
        "shot": ["medium", "many", "medium", "many", "few", "many"][:n],
    }


def test_heatmap_with_blank_upper_triangle(tmp_path):
    matrix = np.full((4, 4), np.nan)
    for t in range(4):
        matrix[t, : t + 1] = np.linspace(90, 40, t + 1)
    out = plots.accuracy_heatmap(matrix, tmp_path / "sub" / "heat.png")
    assert out == tmp_path / "sub" / "heat.png"
    _assert_png(out)


def test_heatmap_rejects_vectors(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        plots.accuracy_heatmap(np.ones(3), tmp_path / "x.png")


@pytest.mark.parametrize("kwargs", [{}, {"new_labels": [4, 5]}, {"new_labels": [4, 5], "colour_by": "shot"}])
def test_weight_norm_plot(tmp_path, kwargs):
    _assert_png(plots.weight_norm_plot(_per_class(), tmp_path / "norms.png", **kwargs))


def test_weight_norm_plot_many_classes(tmp_path):
    n = 100
    per_class = {
        "position": list(range(n)),
        "train_count": [int(500 * 0.01 ** (i / (n - 1))) for i in range(n)],
        "head_weight_norm": list(np.random.default_rng(0).uniform(0.5, 2.0, n)),
        "shot": ["many"] * 40 + ["medium"] * 30 + ["few"] * 30,
    }
    _assert_png(plots.weight_norm_plot(per_class, tmp_path / "norms.png"))


def test_classes_are_captioned_by_name_or_original_label_with_their_images():
    per_class = {"position": [0, 1, 2], "original_label": [4, 9, 1], "name": ["deer", "", "automobile"], "train_count": [5000, 2997, 1796]}
    assert plots.class_captions(per_class) == ["deer (5000)", "9 (2997)", "automobile (1796)"]
    del per_class["name"]
    assert plots.class_captions(per_class) == ["4 (5000)", "9 (2997)", "1 (1796)"]


def test_classes_sorted_many_to_few_with_stable_ties():
    assert plots._many_to_few([50, 500, 20, 500, 5]) == [1, 3, 0, 2, 4]


def test_weight_norm_plot_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="colour_by"):
        plots.weight_norm_plot(_per_class(), tmp_path / "x.png", colour_by="size")
    with pytest.raises(ValueError, match="new_labels"):
        plots.weight_norm_plot(_per_class(), tmp_path / "x.png", colour_by="task")
    bad = _per_class()
    bad["train_count"] = bad["train_count"][:-1]
    with pytest.raises(ValueError, match="length"):
        plots.weight_norm_plot(bad, tmp_path / "x.png")


def test_accuracy_curves(tmp_path):
    _assert_png(plots.accuracy_curve([80.0, 70.5, math.nan, 60.0], tmp_path / "one.png", label="seed 0"))
    curves = {f"seed {s}": [80.0 - s, 70.0 - s, 61.0 - s] for s in range(3)}
    _assert_png(plots.accuracy_curves(curves, tmp_path / "many.png", title="LFS-5"))


def test_no_figures_left_open(tmp_path):
    before = plt.get_fignums()
    plots.accuracy_curve([1.0, 2.0], tmp_path / "a.png")
    plots.accuracy_heatmap(np.eye(2) * 50, tmp_path / "b.png")
    plots.weight_norm_plot(_per_class(), tmp_path / "c.png")
    assert plt.get_fignums() == before
