"""Hand-worked checks of the §4 metrics; each expected number is derived in the comments."""

import math

import numpy as np
import pytest
import torch

from method.metrics import (
    accuracy_rows,
    average_accuracy,
    average_incremental_accuracy,
    class_balanced_task_accuracy,
    class_weighted_accuracy,
    forgetting,
    mean_of_present,
    new_matrix,
    shot_accuracies,
    shot_groups,
    validation_accuracy,
    validation_average_incremental_accuracy,
    validation_class_weighted_accuracy,
)


def hand_matrix():
    #          u=0   u=1   u=2
    # t=0      80     -     -
    # t=1      60    90     -
    # t=2      50    70    40
    a = new_matrix(3)
    a[0, 0] = 80.0
    a[1, :2] = [60.0, 90.0]
    a[2, :3] = [50.0, 70.0, 40.0]
    return a


def test_new_matrix_is_nan_square():
    m = new_matrix(4)
    assert m.shape == (4, 4)
    assert np.isnan(m).all()


def test_average_accuracy_per_row():
    a = hand_matrix()
    assert average_accuracy(a, 0) == pytest.approx(80.0)  # 80 / 1
    assert average_accuracy(a, 1) == pytest.approx(75.0)  # (60 + 90) / 2
    assert average_accuracy(a, 2) == pytest.approx(160.0 / 3)  # (50 + 70 + 40) / 3 = 53.33


def test_average_accuracy_rejects_unfilled_row():
    a = hand_matrix()
    a[2, 1] = np.nan
    with pytest.raises(ValueError):
        average_accuracy(a, 2)


def test_average_incremental_accuracy():
    a = hand_matrix()
    assert average_incremental_accuracy(a, 0) == pytest.approx(80.0)
    # (80 + 75) / 2 = 77.5
    assert average_incremental_accuracy(a, 1) == pytest.approx(77.5)
    # (80 + 75 + 160/3) / 3 = (155 + 53.333) / 3 = 208.333 / 3 = 69.444
    assert average_incremental_accuracy(a, 2) == pytest.approx((155.0 + 160.0 / 3) / 3)
    assert average_incremental_accuracy(a, 2) == pytest.approx(69.4444, abs=1e-4)


def test_forgetting():
    a = hand_matrix()
    assert forgetting(a, 0) == 0.0
    # t=1: u=0: max(A[0,0]) - A[1,0] = 80 - 60 = 20  -> mean 20
    assert forgetting(a, 1) == pytest.approx(20.0)
    # t=2: u=0: max(80, 60) - 50 = 30 (the best is from t'=0, not the last row)
    #      u=1: max(90) - 70 = 20                          -> mean (30 + 20) / 2 = 25
    assert forgetting(a, 2) == pytest.approx(25.0)


def test_forgetting_can_be_negative_on_improvement():
    a = new_matrix(2)
    a[0, 0] = 40.0
    a[1, :2] = [50.0, 70.0]
    # u=0: 40 - 50 = -10
    assert forgetting(a, 1) == pytest.approx(-10.0)


def test_class_weighted_accuracy_lfh_like():
    a = hand_matrix()
    counts = [5, 1, 1]  # a 5-class base task, then 1 and 1
    assert class_weighted_accuracy(a, 0, counts) == pytest.approx(80.0)
    # t=1: (5*60 + 1*90) / 6 = 390 / 6 = 65
    assert class_weighted_accuracy(a, 1, counts) == pytest.approx(65.0)
    # t=2: (5*50 + 70 + 40) / 7 = 360 / 7 = 51.43  (unweighted is 53.33)
    assert class_weighted_accuracy(a, 2, counts) == pytest.approx(360.0 / 7)
    # the label lists of the tasks give the same weights
    lists = [[0, 1, 2, 3, 4], [5], [6]]
    assert class_weighted_accuracy(a, 2, lists) == pytest.approx(360.0 / 7)


def test_class_weighted_equals_unweighted_for_equal_tasks():
    a = hand_matrix()
    assert class_weighted_accuracy(a, 2, [10, 10, 10]) == pytest.approx(average_accuracy(a, 2))


def test_shot_groups_boundaries():
    g = shot_groups([19, 20, 100, 101, 0, 500])
    assert g.tolist() == ["few", "medium", "medium", "many", "few", "many"]
    assert isinstance(g, np.ndarray)


def test_shot_accuracies_pool_images_and_nan_for_empty_group():
    # classes with train counts 500 and 150 are many-shot, 50 medium; no few-shot class.
    correct = [90, 10, 30]
    total = [100, 100, 100]
    out = shot_accuracies(correct, total, [500, 150, 50])
    # many: (90 + 10) / (100 + 100) = 50 %
    assert out["acc_many"] == pytest.approx(50.0)
    assert out["acc_medium"] == pytest.approx(30.0)
    assert math.isnan(out["acc_few"])
    assert set(out) == {"acc_many", "acc_medium", "acc_few"}


def test_shot_accuracies_weights_by_test_images():
    # two few-shot classes: 1/1 and 0/3 -> pooled 1/4 = 25 % (not the class mean 50 %)
    out = shot_accuracies([1, 0], [1, 3], [5, 10])
    assert out["acc_few"] == pytest.approx(25.0)


def test_accuracy_rows_by_hand():
    task_classes = [[0, 1], [2], [3]]  # task 2 not seen yet at t = 1
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    # task-agnostic: class 0: 2/2 right; class 1: 1/2; class 2: 1/4 (two confused with class 0)
    pred = torch.tensor([0, 0, 1, 2, 2, 0, 0, 1])
    # task-aware: task 0's argmax within {0, 1}; task 1 has a single class, always right
    pred_ta = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2])
    rows = accuracy_rows(pred, pred_ta, labels, task_classes, t=1)
    # A[1,0] = (2 + 1) / 4 = 75 %, A[1,1] = 1 / 4 = 25 %
    np.testing.assert_allclose(rows.acc, [75.0, 25.0])
    # task-aware: task 0: 3/4, task 1: 4/4
    np.testing.assert_allclose(rows.task_aware, [75.0, 100.0])
    assert rows.class_labels.tolist() == [0, 1, 2]
    assert rows.class_correct.tolist() == [2, 1, 1]
    assert rows.class_total.tolist() == [2, 2, 4]
    np.testing.assert_allclose(rows.class_acc, [100.0, 50.0, 25.0])


def test_accuracy_rows_accepts_numpy_and_fills_matrix():
    task_classes = [[1, 0], [2]]
    labels = np.array([1, 0, 2])
    pred = np.array([1, 1, 2])
    rows = accuracy_rows(pred, pred, labels, task_classes, t=1)
    assert rows.class_labels.tolist() == [1, 0, 2]  # task order, not sorted
    np.testing.assert_allclose(rows.class_acc, [100.0, 0.0, 100.0])
    a = new_matrix(2)
    a[1, :2] = rows.acc
    assert average_accuracy(a, 1) == pytest.approx((50.0 + 100.0) / 2)


def test_accuracy_rows_class_without_test_images_is_nan():
    rows = accuracy_rows([0], [0], [0], [[0, 1]], t=0)
    assert rows.class_total.tolist() == [1, 0]
    assert rows.class_acc[0] == 100.0 and math.isnan(rows.class_acc[1])


# ---------------------------------------------------------------------------------------------
# Validation metrics: a seen task without held-out images is NaN and left out, not counted as 0


def hand_val_matrix():
    #          u=0   u=1   u=2
    # t=0      75     -     -
    # t=1      50   nan     -      task 1 has no held-out image
    # t=2      75   nan   100
    v = new_matrix(3)
    v[0, 0] = 75.0
    v[1, :2] = [50.0, np.nan]
    v[2, :3] = [75.0, np.nan, 100.0]
    return v


def test_validation_accuracy_averages_the_tasks_that_have_held_out_images():
    v = hand_val_matrix()
    assert validation_accuracy(v, 0) == pytest.approx(75.0)
    assert validation_accuracy(v, 1) == pytest.approx(50.0)  # task 1 left out: 50 / 1
    assert validation_accuracy(v, 2) == pytest.approx(87.5)  # (75 + 100) / 2


def test_validation_class_weighted_accuracy_weights_only_the_tasks_present():
    v = hand_val_matrix()
    classes = [[0, 1], [2, 3], [4]]
    assert validation_class_weighted_accuracy(v, 1, classes) == pytest.approx(50.0)  # 50 * 2 / 2
    # (75 * 2 + 100 * 1) / (2 + 1) = 250 / 3 = 83.33; task 1's two classes do not count
    assert validation_class_weighted_accuracy(v, 2, classes) == pytest.approx(250.0 / 3)


def test_validation_average_incremental_accuracy_is_the_mean_of_the_phases():
    v = hand_val_matrix()
    assert validation_average_incremental_accuracy(v, 1) == pytest.approx(62.5)  # (75 + 50) / 2
    # (75 + 50 + 87.5) / 3 = 212.5 / 3 = 70.83
    assert validation_average_incremental_accuracy(v, 2) == pytest.approx(212.5 / 3)


def test_validation_metrics_are_nan_when_no_seen_task_has_held_out_images():
    v = new_matrix(2)
    v[0, 0] = np.nan
    v[1, :2] = [np.nan, 40.0]
    assert math.isnan(validation_accuracy(v, 0))
    assert math.isnan(validation_class_weighted_accuracy(v, 0, [2, 2]))
    assert math.isnan(validation_average_incremental_accuracy(v, 0))
    # phase 0 has no value, so the running mean starts at phase 1: 40 / 1
    assert validation_average_incremental_accuracy(v, 1) == pytest.approx(40.0)


def test_class_balanced_task_accuracy_4_and_1_held_out_images_and_a_class_without():
    tasks = [[0, 1], [2, 3], [4]]
    # Task 0: class 0 has 4 held-out images, 3 right (75 %); class 1 has 1, wrong (0 %).
    #   Pooled image by image: 3 / 5 = 60 %. Balanced: (75 + 0) / 2 = 37.5 %.
    # Task 1: class 2 has 2 images, 1 right (50 %); class 3 has none and is left out: 50 %.
    # Task 2: class 4 has none: NaN.
    labels = [0, 0, 0, 0, 1, 2, 2]
    predicted = [0, 0, 0, 1, 0, 2, 0]
    rows = accuracy_rows(predicted, predicted, labels, tasks, 2)
    np.testing.assert_allclose(rows.acc, [60.0, 50.0, np.nan])  # the image-weighted rows
    balanced = class_balanced_task_accuracy(rows.class_acc, rows.class_labels, tasks, 2)
    np.testing.assert_allclose(balanced, [37.5, 50.0, np.nan])
    assert mean_of_present(balanced) == pytest.approx(43.75)  # (37.5 + 50) / 2: val_acc of the phase


def test_class_balanced_task_accuracy_reads_classes_by_label_not_by_position():
    # The same per-class accuracies listed in another order give the same task means.
    tasks = [[3, 1], [0, 2]]
    balanced = class_balanced_task_accuracy([10.0, 20.0, 30.0, np.nan], [0, 1, 2, 3], tasks, 1)
    np.testing.assert_allclose(balanced, [20.0, 20.0])  # task 0: class 1 alone; task 1: (10 + 30) / 2
    assert math.isnan(class_balanced_task_accuracy([np.nan, np.nan], [0, 1], [[0, 1]], 0)[0])
