"""The frozen model's passes at their fastest batch: the same scores, herding and class means."""

import numpy as np
import pytest
import torch

from method.data import build_benchmark
from method.memory import herding_order
from method.trainer import IncrementalTrainer, fastest_eval_batch, frozen_teacher

from tests.method.test_teacher import trained_statistics_model
from tests.method.test_trainer import small_config


@pytest.fixture(scope="module")
def benchmark(data_root, cifar10_raw):
    cfg = small_config(data_root, train_fraction=0.1)
    return build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=cifar10_raw)


def trained_looking_trainer(data_root, benchmark, **extra) -> IncrementalTrainer:
    """A trainer whose model has every head and BatchNorm statistics of real images."""
    trainer = IncrementalTrainer(small_config(data_root, train_fraction=0.1, **extra), benchmark=benchmark)
    model = trained_statistics_model(head_sizes=trainer.task_sizes)
    with torch.no_grad():  # and the statistics of real images on top
        for x, _ in trainer.train_images.eval_batches(torch.arange(256), 128):
            model(x)
    trainer.model, trainer.old_model = model, frozen_teacher(model)
    return trainer


def test_cpu_scores_in_small_batches_unless_the_config_says_otherwise(data_root, benchmark):
    assert fastest_eval_batch(torch.device("cpu")) == 64
    assert fastest_eval_batch(torch.device("cuda")) == 1024
    assert IncrementalTrainer(small_config(data_root), benchmark=benchmark).eval_batch_size == 64
    assert IncrementalTrainer(small_config(data_root, train__eval_batch_size=300), benchmark=benchmark).eval_batch_size == 300


def test_scores_at_the_fast_batch_are_the_plain_eval_models(data_root, benchmark):
    trainer = trained_looking_trainer(data_root, benchmark)
    num_seen = sum(trainer.task_sizes)
    indices = torch.arange(len(benchmark.test))
    assert len(indices) > 2 * trainer.eval_batch_size  # several batches, and a short last one
    with torch.no_grad():
        fast = torch.cat([trainer._scores(trainer.old_model, x, num_seen, None) for x, _ in trainer.test_images.eval_batches(indices, trainer.eval_batch_size)])
        (x, _), = trainer.test_images.eval_batches(indices, len(indices))  # one batch of them all
        plain = trainer.model.eval()(x.contiguous())[:, :num_seen]
    assert torch.equal(fast.argmax(1), plain.argmax(1))
    assert torch.allclose(fast, plain, atol=1e-5 * plain.abs().max(), rtol=0)


def test_herding_picks_the_same_exemplars_at_any_eval_batch(data_root, benchmark):
    trainer = trained_looking_trainer(data_root, benchmark)
    label = int(np.argmax(benchmark.train_counts))  # the head class: several batches
    candidates = torch.as_tensor(np.flatnonzero(benchmark.train.labels == label))
    assert len(candidates) > 2 * trainer.eval_batch_size
    fast, _ = trainer._features(candidates, trainer.old_model)
    trainer.eval_batch_size = len(candidates)
    whole, _ = trainer._features(candidates, trainer.old_model)
    with torch.no_grad():
        (x, _), = trainer.train_images.eval_batches(candidates, len(candidates))
        plain = trainer.model.eval().backbone(x.contiguous())
    assert torch.allclose(fast, plain, atol=1e-5 * plain.abs().max(), rtol=0)
    assert herding_order(fast, 20).tolist() == herding_order(whole, 20).tolist() == herding_order(plain, 20).tolist()


def test_class_means_take_the_new_classes_rows_from_the_herding_features(data_root, benchmark):
    trainer = IncrementalTrainer(small_config(data_root, learner="icarl", train_fraction=0.1), benchmark=benchmark)
    phases = trainer.phases()
    next(phases), next(phases)  # two phases: old and new classes in memory
    num_seen = sum(trainer.task_sizes[:2])
    new_classes = benchmark.task_classes[1]
    herding = {}
    for label in new_classes:
        candidates = torch.as_tensor(np.flatnonzero(benchmark.train.labels == label))
        herding[label] = trainer._features(candidates, trainer.old_model)[0]
    calls = []
    features = trainer._features
    trainer._features = lambda indices, net: calls.append(indices) or features(indices, net)
    reused = trainer._class_means(num_seen, herding)
    assert len(calls) == 1 and set(benchmark.train.labels[calls[0].numpy()]) == set(benchmark.task_classes[0])
    recomputed = trainer._class_means(num_seen, None)
    assert torch.allclose(reused, recomputed, atol=1e-6, rtol=0)
    assert not torch.allclose(reused[new_classes[0]], reused[new_classes[1]])  # the rows are per class
