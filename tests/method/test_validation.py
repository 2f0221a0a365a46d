"""Validation metrics per phase: a hand-made benchmark scored by hand, and the hold-out kept apart.

The hand-made case: a model whose prediction for each image is set by the test, so every
validation value can be worked out on paper, including a seen task with no held-out image.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method.backbones import IncrementalNet
from method.config import RunConfig
from method.data import Benchmark, Split, build_benchmark
from method.trainer import IncrementalTrainer

NUM_CLASSES = 5
TASKS = [[0, 1], [2, 3], [4]]  # task 1's classes have no held-out image (as classes of n <= 5 do)


class TablePredictor(nn.Module):
    """Reads an image's id from its first pixel and outputs the one-hot of `predicted[id]`.

    With identity heads, the argmax over the seen classes is then exactly `predicted[id]`.
    """

    feature_dim = NUM_CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("predicted", torch.zeros(256, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.round(x[:, 0, 0, 0] * 255).long()  # mean 0, std 1: the pixel is id / 255
        return F.one_hot(self.predicted[ids], NUM_CLASSES).float()


def images_with_ids(ids):
    images = torch.zeros(len(ids), 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.as_tensor(ids, dtype=torch.uint8)
    return images


def split(ids, labels):
    return Split(labels=np.asarray(labels, dtype=np.int64), images=images_with_ids(ids), origin=np.asarray(ids))


# Held-out images: ids 0, 1 (class 0), 2, 3 (class 1), 4 (class 4). Test images: ids 10..14, one per class.
VAL_LABELS = {0: 0, 1: 0, 2: 1, 3: 1, 4: 4}
TEST_LABELS = {10 + c: c for c in range(NUM_CLASSES)}


def hand_benchmark(val_labels=VAL_LABELS) -> Benchmark:
    train_ids = list(range(20, 30))
    return Benchmark(
        dataset="cifar10", image_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        class_order=list(range(NUM_CLASSES)), class_names=[f"c{c}" for c in range(NUM_CLASSES)], task_classes=TASKS,
        train=split(train_ids, [c for c in range(NUM_CLASSES) for _ in range(2)]),
        val=split(list(val_labels), list(val_labels.values())),
        test=split(list(TEST_LABELS), list(TEST_LABELS.values())),
    )  # fmt: skip


def hand_trainer(val_labels=VAL_LABELS) -> IncrementalTrainer:
    cfg = RunConfig()
    cfg.device = "cpu"
    trainer = IncrementalTrainer(cfg, benchmark=hand_benchmark(val_labels))
    trainer._initialise()
    trainer.model = IncrementalNet(TablePredictor())
    for classes in TASKS:
        trainer.model.add_head(len(classes))
    with torch.no_grad():
        trainer.model.head_weight.copy_(torch.eye(NUM_CLASSES))
        trainer.model.head_bias.zero_()
    trainer.old_model = trainer.model.eval()  # the phase's final model scores both splits
    return trainer


def score_phase(trainer, phase, predictions):
    """Evaluate `phase` with the images predicted as given by id (test images not given: correct)."""
    table = trainer.model.backbone.predicted
    table.zero_()
    for image_id, label in TEST_LABELS.items():
        table[image_id] = label
    for image_id, prediction in predictions.items():
        table[image_id] = prediction
    num_seen = sum(len(c) for c in TASKS[: phase + 1])
    return trainer._evaluate(phase, num_seen, trainer._score_phase(phase, num_seen, None))


def test_validation_metrics_of_a_hand_made_benchmark():
    trainer = hand_trainer()
    # Phase 0: ids 0->0 right, 1->1 wrong, 2->1 right, 3->1 right: task 0 at 3/4 = 75 %.
    r0 = score_phase(trainer, 0, {0: 0, 1: 1, 2: 1, 3: 1})
    assert r0.metrics["val_acc"] == pytest.approx(75.0)
    assert r0.metrics["val_acc_class_weighted"] == pytest.approx(75.0)
    assert r0.metrics["val_avg_incremental_acc"] == pytest.approx(75.0)
    assert r0.metrics["val_images"] == 4  # id 4's class is not seen yet
    # Phase 1: ids 0->0 right, 1->0 right, 2->0 wrong, 3->2 wrong: task 0 at 50 %; task 1 has no
    # held-out image, so its entry is NaN and the mean is over task 0 alone.
    r1 = score_phase(trainer, 1, {0: 0, 1: 0, 2: 0, 3: 2})
    assert r1.val_matrix[1, 0] == pytest.approx(50.0) and math.isnan(r1.val_matrix[1, 1])
    assert r1.metrics["val_acc"] == pytest.approx(50.0)
    assert r1.metrics["val_avg_incremental_acc"] == pytest.approx(62.5)  # (75 + 50) / 2
    assert r1.metrics["val_images"] == 4
    # Phase 2: task 0 at 75 % again (as in phase 0), task 2's one image (id 4 -> 4) right: 100 %.
    r2 = score_phase(trainer, 2, {0: 0, 1: 1, 2: 1, 3: 1, 4: 4})
    np.testing.assert_array_equal(np.isnan(r2.val_matrix[2]), [False, True, False])
    assert r2.metrics["val_acc"] == pytest.approx(87.5)  # (75 + 100) / 2
    assert r2.metrics["val_acc_class_weighted"] == pytest.approx(250.0 / 3)  # (75 * 2 + 100 * 1) / 3
    assert r2.metrics["val_avg_incremental_acc"] == pytest.approx(212.5 / 3)  # (75 + 50 + 87.5) / 3
    assert r2.metrics["val_images"] == 5
    # The test images were all predicted right, whatever the held-out ones were.
    assert r2.metrics["acc"] == pytest.approx(100.0) and r2.metrics["avg_incremental_acc"] == pytest.approx(100.0)


# Held-out images of a long tail: class 0 has four (ids 0-3), class 1 one (id 4); the test set
# has one image per class (ids 10..14), balanced as CIFAR's is.
LONG_TAILED_VAL = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1}


def test_a_task_of_4_and_1_held_out_images_is_scored_class_balanced_with_per_class_columns():
    trainer = hand_trainer(LONG_TAILED_VAL)
    # Class 0: ids 0, 1, 2 right, id 3 wrong (75 %); class 1: id 4 wrong (0 %).
    # Image-weighted: 3 / 5 = 60 %; class-balanced: (75 + 0) / 2 = 37.5 %.
    result = score_phase(trainer, 0, {0: 0, 1: 0, 2: 0, 3: 1, 4: 0})
    assert result.metrics["val_acc"] == pytest.approx(37.5)
    assert result.metrics["val_avg_incremental_acc"] == pytest.approx(37.5)
    assert result.metrics["val_images"] == 5
    assert result.per_class["val_count"] == [4, 1]
    assert result.per_class["val_accuracy"] == pytest.approx([75.0, 0.0])
    # Phases 1 and 2: task 1's classes and task 2's class have no held-out image: NaN columns,
    # and tasks 1 and 2 are left out of val_acc (task 0 alone: class 0 at 100 %, class 1 at 100 %).
    score_phase(trainer, 1, {0: 0, 1: 0, 2: 0, 3: 0, 4: 1})
    result = score_phase(trainer, 2, {0: 0, 1: 0, 2: 0, 3: 0, 4: 1})
    assert result.per_class["val_count"] == [4, 1, 0, 0, 0]
    assert np.isnan(result.per_class["val_accuracy"][2:]).all()
    assert result.metrics["val_acc"] == pytest.approx(100.0)


def val_and_test(trainer, predictions):
    """(the old image-weighted held-out accuracy, val_acc, the test acc) of phase 0."""
    result = score_phase(trainer, 0, predictions)
    image_weighted = trainer._score_phase(0, 2, None)["val"].acc[0]  # the rows, pooled image by image
    return image_weighted, result.metrics["val_acc"], result.metrics["acc"]


def test_the_balanced_metric_ranks_two_configs_as_the_balanced_test_does_and_the_pooled_one_does_not():
    trainer = hand_trainer(LONG_TAILED_VAL)
    # "head": everything predicted as class 0, the task's head. Held-out: 4 / 5 = 80 % pooled,
    # (100 + 0) / 2 = 50 % balanced; test: class 0 right, class 1 wrong, 50 %.
    head = val_and_test(trainer, {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 11: 0})
    # "fair": class 0 half right (ids 0, 1), class 1 right. Held-out: 3 / 5 = 60 % pooled,
    # (50 + 100) / 2 = 75 % balanced; test: both right, 100 %.
    fair = val_and_test(trainer, {0: 0, 1: 0, 2: 1, 3: 1, 4: 1})
    assert head == pytest.approx((80.0, 50.0, 50.0))
    assert fair == pytest.approx((60.0, 75.0, 100.0))
    pooled_choice = max(("head", head), ("fair", fair), key=lambda c: c[1][0])[0]
    balanced_choice = max(("head", head), ("fair", fair), key=lambda c: c[1][1])[0]
    test_choice = max(("head", head), ("fair", fair), key=lambda c: c[1][2])[0]
    assert (pooled_choice, balanced_choice, test_choice) == ("head", "fair", "fair")


def test_the_per_epoch_validation_print_is_the_phase_measure():
    trainer = hand_trainer(LONG_TAILED_VAL)
    score_phase(trainer, 0, {0: 0, 1: 0, 2: 0, 3: 1, 4: 0})  # sets the prediction table
    assert trainer._validation_accuracy(0, 2) == pytest.approx(37.5)  # not the pooled 60 %


def test_the_validation_matrix_is_carried_in_the_state():
    trainer = hand_trainer()
    score_phase(trainer, 0, {0: 0, 1: 1, 2: 1, 3: 1})
    state = trainer._state(0)
    assert state["val_matrix"][0, 0] == pytest.approx(75.0)


# ---------------------------------------------------------------------------------------------
# The hold-out on real CIFAR-10-LT


def lt_config(data_root) -> RunConfig:
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.root = "cifar10", str(data_root)
    cfg.data.train_fraction, cfg.data.test_fraction = 0.05, 0.05
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs, cfg.train.milestones = 1, [1]
    cfg.memory.per_class = 5
    cfg.device = "cpu"
    return cfg


def test_held_out_images_are_never_trained_on_nor_tested(data_root, cifar10_raw):
    cfg = lt_config(data_root)
    benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=cifar10_raw)
    val_origin = set(benchmark.val.origin.tolist())
    assert len(val_origin) == len(benchmark.val) > 0
    assert val_origin.isdisjoint(benchmark.train.origin.tolist())
    # Both come from CIFAR-10's training array, the test images from its test array.
    assert torch.equal(benchmark.val.images, cifar10_raw.train_images[torch.as_tensor(benchmark.val.origin)])
    assert torch.equal(benchmark.test.images, cifar10_raw.test_images[torch.as_tensor(benchmark.test.origin)])
    # 10 % per class of the task's training images, rounded half to even (method.md §1).
    for c in range(10):
        n = int((benchmark.train.labels == c).sum() + (benchmark.val.labels == c).sum())
        assert (benchmark.val.labels == c).sum() == int(np.round(0.1 * n))
    # And no held-out image is the same picture as a test image.
    test_bytes = {bytes(image.numpy()) for image in benchmark.test.images}
    assert not any(bytes(image.numpy()) in test_bytes for image in benchmark.val.images)

    # Every image the trainer trains on (new data, then memory) is an image of the training split.
    trainer = IncrementalTrainer(cfg, benchmark=benchmark)
    drawn = []
    batches = trainer.train_images.train_batches

    def recording(indices, batch_size, generator):
        drawn.append(indices.clone())
        return batches(indices, batch_size, generator)

    trainer.train_images.train_batches = recording
    results = list(trainer.phases())
    trained_origin = set(benchmark.train.origin[torch.cat(drawn).numpy()].tolist())
    assert len(drawn) == 5 and trained_origin and trained_origin.isdisjoint(val_origin)
    assert [r.metrics["val_images"] for r in results] == [
        int(np.isin(benchmark.val.labels, sum(benchmark.task_classes[: t + 1], [])).sum()) for t in range(5)
    ]
    assert all(math.isfinite(r.metrics["val_avg_incremental_acc"]) for r in results)
