"""The phase-by-phase trainer on real CIFAR-10-LT data (a small slice, few epochs, CPU)."""

import copy
import io

import numpy as np
import pytest
import torch

from method.config import RunConfig, resolve_dataset_defaults
from method.events import BatchDone, EpochDone, PhaseDone, PhaseStarted
from method.data import build_benchmark
from method.results import METRIC_NAMES
from method.trainer import IncrementalTrainer


def small_config(data_root, learner="dgr", epochs=1, train_fraction=0.05, **extra):
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.root = "cifar10", str(data_root)
    # 500 test images: these runs check plumbing, and scoring is a third of a tiny run's time.
    cfg.data.train_fraction, cfg.data.test_fraction = train_fraction, 0.05
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs, cfg.train.milestones = epochs, [max(1, epochs - 1)]
    cfg.learner.name = learner
    cfg.memory.budget = "none" if learner == "finetune" else "per_class"
    cfg.device = "cpu"
    for key, value in extra.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return resolve_dataset_defaults(cfg)


@pytest.fixture(scope="module")
def benchmark_factory(cifar10_raw):
    cache = {}

    def make(cfg):
        key = (cfg.data.scenario, cfg.data.train_fraction, cfg.data.test_fraction, cfg.seed)
        if key not in cache:
            cache[key] = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=cifar10_raw)
        return cache[key]

    return make


def run_all(cfg, benchmark, resume_state=None):
    return list(IncrementalTrainer(cfg, benchmark=benchmark).phases(resume_state))


def test_phase_results_hold_every_metric_and_a_consistent_matrix(data_root, benchmark_factory):
    cfg = small_config(data_root)
    events = []
    trainer = IncrementalTrainer(cfg, benchmark=benchmark_factory(cfg), progress=events.append)
    results = list(trainer.phases())
    assert [r.phase for r in results] == [0, 1, 2, 3, 4]
    last = results[-1]
    assert set(METRIC_NAMES) <= set(last.metrics)
    # the matrix is lower-triangular, filled row by row
    assert np.isnan(last.acc_matrix[np.triu_indices(5, 1)]).all()
    assert not np.isnan(last.acc_matrix[np.tril_indices(5)]).any()
    expected_aia = np.mean([np.mean(last.acc_matrix[t, : t + 1]) for t in range(5)])
    assert last.metrics["avg_incremental_acc"] == pytest.approx(expected_aia)
    assert len(last.per_class["position"]) == 10
    # The dataset's own label and name beside the class-order position.
    cifar10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    order = trainer.benchmark.class_order
    assert last.per_class["original_label"] == [order[p] for p in last.per_class["position"]]
    assert last.per_class["name"] == [cifar10[c] for c in last.per_class["original_label"]]
    # memory: 20 per class, or the whole class when it is smaller
    for count, memory in zip(last.per_class["train_count"], last.per_class["memory_count"]):
        assert memory == min(20, count)
    assert {type(e) for e in events} == {PhaseStarted, BatchDone, EpochDone, PhaseDone}
    # One numbering: phases by index (as MLflow's step), epochs and batches from 1.
    assert [e.phase for e in events if isinstance(e, PhaseStarted)] == [0, 1, 2, 3, 4]
    assert {e.epoch for e in events if isinstance(e, (BatchDone, EpochDone))} == {1}
    assert min(e.batch for e in events if isinstance(e, BatchDone)) == 1


def test_resume_from_a_saved_phase_gives_the_same_results(data_root, benchmark_factory):
    cfg = small_config(data_root)
    straight = run_all(cfg, benchmark_factory(cfg))
    # the state goes through torch.save/load, as a checkpoint file does
    buffer = io.BytesIO()
    torch.save(straight[1].state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    resumed = run_all(cfg, benchmark_factory(cfg), resume_state=state)
    assert [r.phase for r in resumed] == [2, 3, 4]
    for a, b in zip(straight[2:], resumed):
        np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
        for name in ("acc", "avg_incremental_acc", "forgetting", "loss"):
            assert a.metrics[name] == b.metrics[name], name
    for key, value in straight[-1].state["model"].items():
        assert torch.equal(value, resumed[-1].state["model"][key]), key


@pytest.mark.parametrize("learner, two_stage", [("lucir", "lws"), ("podnet", "lws"), ("eeil", "none")])
def test_the_competitors_and_lws_resume_bit_identically(data_root, benchmark_factory, learner, two_stage):
    cfg = small_config(data_root, learner, epochs=2, learner__two_stage=two_stage, learner__two_stage_epochs=2)
    cfg.learner.eeil.finetune_epochs = 2
    straight = run_all(cfg, benchmark_factory(cfg))
    assert all(np.isfinite(r.metrics["loss"]) and np.isfinite(r.metrics["acc"]) for r in straight)
    resumed = run_all(cfg, benchmark_factory(cfg), resume_state=copy.deepcopy(straight[1].state))
    for a, b in zip(straight[2:], resumed):
        np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
        assert a.metrics["loss"] == b.metrics["loss"]
    for key, value in straight[-1].state["model"].items():
        assert torch.equal(value, resumed[-1].state["model"][key]), key
    if two_stage == "lws":  # the scaling is part of the model and moved away from its start at 1
        assert not torch.equal(straight[-1].state["model"]["class_scale"], torch.ones(10))


@pytest.mark.e2e
@pytest.mark.slow
def test_lws_on_linear_heads_once_the_backbone_has_learnt(data_root, benchmark_factory):
    # LWS trains at the task's lr on eval-mode features, as the reference does. In the one-batch
    # runs above those features are 20x their training-mode size (BatchNorm statistics of a few
    # batches) and a linear head with its scale diverges; the ordered first task is learnt in a
    # few epochs (see last_accuracy), and there it stays finite like the cosine heads.
    cfg = small_config(data_root, "eeil", epochs=8, train_fraction=0.15, data__scenario="ordered", data__test_fraction=0.1,
                       learner__two_stage="lws", learner__two_stage_epochs=2)  # fmt: skip
    cfg.learner.eeil.finetune_epochs = 2
    results = run_all(cfg, benchmark_factory(cfg))
    assert all(np.isfinite(r.metrics["loss"]) and np.isfinite(r.metrics["acc"]) for r in results)
    assert results[-1].metrics["acc"] > 100 / 10  # better than chance over the ten classes


def test_resume_refuses_a_checkpoint_of_another_split(data_root, benchmark_factory, cifar10_raw):
    cfg = small_config(data_root)
    first = next(IncrementalTrainer(cfg, benchmark=benchmark_factory(cfg)).phases())
    ordered = small_config(data_root)
    ordered.data.scenario = "ordered"
    benchmark = build_benchmark(ordered.data, ordered.protocol, ordered.seed, raw=cifar10_raw)
    with pytest.raises(ValueError, match="another dataset order"):
        next(IncrementalTrainer(ordered, benchmark=benchmark).phases(first.state))


@pytest.mark.e2e
@pytest.mark.parametrize("learner", ["finetune", "replay", "lwf", "icarl", "wa", "dgr", "lucir", "podnet", "eeil"])
def test_every_learner_runs(data_root, benchmark_factory, learner):
    cfg = small_config(data_root, learner)
    cfg.learner.eeil.finetune_epochs = 2
    results = run_all(cfg, benchmark_factory(cfg))
    assert [r.phase for r in results] == [0, 1, 2, 3, 4]
    assert all(np.isfinite(r.metrics["loss"]) and 0.0 <= r.metrics["acc"] <= 100.0 for r in results)


@pytest.fixture(scope="module")
def last_accuracy(data_root, benchmark_factory):
    """Last accuracy on CIFAR-10-LT ordered LFS-5, 15% of the training data, 8 epochs a task.

    Ordered, because its first task (airplane vs automobile, the two largest classes) is learnt
    in a few epochs; the shuffled order's first task for seed 0 (bird vs deer, 2.2k images)
    stays at the class prior even after 20 epochs, and a memory of features that never formed
    protects nothing. Finetuning ends predicting only the last task's classes (ship, truck).
    """
    from tests.method.test_phases import RecordingStore

    # Finetuning and replay train phase 0 alike (the same key): replay takes it from the store.
    store = RecordingStore()
    results = {}
    for learner in ("finetune", "replay", "dgr"):
        cfg = small_config(data_root, learner, epochs=8, train_fraction=0.15, data__scenario="ordered", data__test_fraction=0.2)
        trained = list(IncrementalTrainer(cfg, benchmark=benchmark_factory(cfg), phase_store=store).phases())
        results[learner] = trained[-1].metrics["acc"]
        results[f"{learner} phase 0 reused"] = trained[0].reused_from is not None
    return results


@pytest.mark.e2e
@pytest.mark.slow
def test_memory_beats_finetuning_on_last_accuracy(last_accuracy):
    assert last_accuracy["dgr"] > last_accuracy["finetune"], last_accuracy
    assert last_accuracy["replay"] > last_accuracy["finetune"], last_accuracy
    assert last_accuracy["replay phase 0 reused"] and not last_accuracy["dgr phase 0 reused"]


@pytest.mark.e2e
def test_two_stage_runs_with_any_learner(data_root, benchmark_factory):
    # This tiny run's eval-mode features reach 1e4-1e8 (BatchNorm statistics from one batch a
    # phase); a refit that is not scale-free blew the heads, then the next phase's loss, to NaN.
    cfg = small_config(data_root, "replay", learner__two_stage="refit", learner__two_stage_epochs=2)
    results = run_all(cfg, benchmark_factory(cfg))
    assert len(results) == 5
    assert all(np.isfinite(r.metrics["loss"]) and np.isfinite(r.metrics["acc"]) for r in results)


def test_the_trainer_never_changes_the_config_it_is_given(data_root, benchmark_factory):
    cfg = small_config(data_root)
    cfg.train.epochs, cfg.train.milestones, cfg.train.weight_decay = None, None, None  # left to the dataset
    before = copy.deepcopy(cfg)
    trainer = IncrementalTrainer(cfg, benchmark=benchmark_factory(small_config(data_root)))
    assert cfg == before and trainer.cfg.train.epochs == 160 and trainer.cfg.train.milestones == [80, 120]


def test_a_cuda_rng_list_saved_on_two_gpus_restores_in_a_process_that_sees_one(monkeypatch):
    # A phase stored by a run on a 2-GPU host (one CUDA state per visible device, as before),
    # reused by a Ray task that sees one GPU: only the run's own device state is put back.
    from tests.method.test_validation import hand_trainer

    trainer = hand_trainer()
    trainer.device = torch.device("cuda")  # as on a GPU host; the CUDA calls are stubbed
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    saved_on_two = [torch.full((4,), 1, dtype=torch.uint8), torch.full((4,), 2, dtype=torch.uint8)]
    torch_rng, generator = torch.get_rng_state(), trainer.generator.get_state()
    torch.manual_seed(123)
    trainer.generator.manual_seed(123)

    trainer._set_rng_states(torch_rng, saved_on_two, generator)
    assert len(restored) == 1 and torch.equal(restored[0][0], saved_on_two[0]) and restored[0][1] == trainer.device
    assert torch.equal(torch.get_rng_state(), torch_rng) and torch.equal(trainer.generator.get_state(), generator)
    # What it saves from now on is its own device's state alone.
    saved = trainer._rng_states()["cuda_rng"]
    assert len(saved) == 1 and torch.equal(saved[0], torch.full((4,), 7, dtype=torch.uint8))
    trainer.device = torch.device("cpu")
    assert trainer._rng_states()["cuda_rng"] is None
