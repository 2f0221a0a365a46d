"""Phase keys: every config field is declared, and the key covers what changes a trained phase."""

import contextlib
import copy
import dataclasses
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

from method.config import RunConfig, bounded
from method.data import build_benchmark
from method.phases import UndeclaredFieldError, declared_fields, phase_inputs, phase_keys
from method.trainer import IncrementalTrainer

from tests.method.test_trainer import small_config

CPU = torch.device("cpu")
PHASES = 2  # phase 0, and phase 1: the first with memory and an old model


class RecordingStore:
    """Keeps every phase a run trains, so two runs' trained phases can be compared."""

    def __init__(self) -> None:
        self.entries = {}

    @contextlib.contextmanager
    def slot(self, key, phase):
        entry = self.entries.get(key)
        yield SimpleNamespace(entry=entry, wants_entry=entry is None, save=lambda stored: self.entries.__setitem__(key, stored))


def trained_phases(cfg, benchmark, phases=PHASES) -> list:
    store = RecordingStore()
    trainer = IncrementalTrainer(cfg, benchmark=benchmark, phase_store=store)
    for _, _ in zip(range(phases), trainer.phases()):
        pass
    return [store.entries[key] for key in trainer.phase_keys[:phases]]


def identical(a, b) -> bool:
    """Bitwise equality of nested stored values (tensors, arrays, dicts, dataclasses)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(identical(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if hasattr(a, "shape"):  # numpy
        return a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b or (a != a and b != b)


def comparable(phase):
    """A stored phase without the seconds it took to train, which no two runs share, and without
    its herding features, a cache that a run with random selection leaves empty (`same_features`)."""
    return dataclasses.replace(phase, train_seconds=0.0, herding_features=None)


def same_features(a, b) -> bool:
    """Herding features agree on every class that both phases computed."""
    a, b = a.herding_features or {}, b.herding_features or {}
    return all(identical(a[c], b[c]) for c in a.keys() & b.keys())


# A different, valid value for every config field: a field added without one fails the test below.
ALTERNATIVES = {
    "name": "another-name",
    "seed": 1,
    "device": "auto",  # resolves to this machine's cpu: the same device
    "data.dataset": "cifar100",
    "data.source": "parquet",
    "data.root": "<copy>",  # the same files under another folder
    "data.download": True,  # the data is there: nothing downloads
    "data.imbalance": "step",
    "data.rho": 50.0,
    "data.scenario": "ordered",
    "data.subset_seed": 1,
    "data.val_fraction": 0.2,
    "data.train_fraction": 0.06,
    "data.test_fraction": 0.2,
    "data.num_workers": 0,
    "protocol.first_task_classes": 4,
    "protocol.incremental_tasks": 2,
    "model.backbone": "resnet18",
    "train.epochs": 2,
    "train.milestones": [1],
    "train.weight_decay": 1e-4,
    "train.lr": 0.05,
    "train.lr_decay": 0.5,
    "train.momentum": 0.8,
    "train.batch_size": 64,
    "train.eval_batch_size": 100,
    "train.validate_every_epoch": True,
    "train.precision": "bf16",
    "train.cuda_graph": True,
    "train.first_task.lr": 0.05,
    "train.first_task.epochs": 2,
    "train.first_task.milestones": [1],
    "memory.budget": "total",
    "memory.per_class": 5,
    "memory.total": 30,
    "memory.selection": "random",
    "learner.name": "icarl",
    "learner.kd_temperature": 3.0,
    "learner.two_stage": "refit",
    "learner.two_stage_epochs": 2,
    "learner.two_stage_lr": 0.05,
    "learner.dgr.logit_adjustment": False,
    "learner.dgr.intra_phase_reweighting": False,
    "learner.dgr.inter_phase_reweighting": False,
    "learner.dgr.distillation": "kd",
    "learner.dgr.lambda_b": 0.3,
    "learner.dgr.attenuation": 0.5,
    "learner.dgr.temperature": 3.0,
    "learner.dgr.beta_schedule": "linear",
    "learner.dgr.dakd_prior": "sum",
    "learner.lucir.lambda_base": 7.0,
    "learner.lucir.lambda_mr": 0.5,
    "learner.lucir.margin": 0.3,
    "learner.lucir.hard_negatives": 1,
    "learner.podnet.flat_factor": 2.0,
    "learner.podnet.spatial_factor": 1.0,
    "learner.podnet.nca_margin": 0.3,
    "learner.eeil.lamb": 0.5,
    "learner.eeil.temperature": 3.0,
    "learner.eeil.finetune_lr_factor": 0.1,
    "learner.eeil.finetune_epochs": 2,
}


# Fields whose alternative cannot train on a machine without CUDA.
NEEDS_CUDA = {"train.cuda_graph"}


def set_key(cfg, key, value):
    *sections, name = key.split(".")
    node = cfg
    for section in sections:
        node = getattr(node, section)
    setattr(node, name, value)


def test_every_config_field_declares_the_first_phase_it_can_change():
    keys = [key for key, _, _ in declared_fields(RunConfig())]
    assert sorted(keys) == sorted(ALTERNATIVES), "a field without an alternative in ALTERNATIVES, or one that is gone"

    @dataclasses.dataclass
    class Undeclared:
        declared: int = bounded(1, first_phase=0)
        forgotten: int = 2

    with pytest.raises(UndeclaredFieldError, match="forgotten: the config field declares no first_phase"):
        declared_fields(Undeclared())


def test_the_first_tasks_own_schedule_enters_phase_0_and_the_shared_one_the_later_phases(data_root):
    cfg = small_config(data_root, epochs=3)
    cfg.train.first_task.lr, cfg.train.first_task.epochs = 0.05, 2
    assert phase_inputs(cfg, 0)["train.lr"] == 0.05 and phase_inputs(cfg, 0)["train.epochs"] == 2
    assert phase_inputs(cfg, 1)["train.lr"] == 0.1 and phase_inputs(cfg, 1)["train.epochs"] == 3
    # Memory and distillation first matter at phase 1; another learner's section never does.
    assert "memory.per_class" not in phase_inputs(cfg, 0) and "memory.per_class" in phase_inputs(cfg, 1)
    assert "learner.dgr.lambda_b" in phase_inputs(cfg, 1)
    cfg.learner.name = "replay"
    assert not any(key.startswith("learner.dgr.") for t in (0, 1) for key in phase_inputs(cfg, t))


def test_every_field_either_changes_the_key_or_leaves_the_trained_phase_bit_identical(data_root, cifar10_raw, tmp_path):
    """For each field: key(k) differs, or the state after phase k is the same bits (tiny budget)."""
    base = small_config(data_root, train_fraction=0.02)
    base.memory.per_class = 3
    benchmark = build_benchmark(base.data, base.protocol, base.seed, raw=cifar10_raw)
    base_keys = phase_keys(base, benchmark, CPU)
    base_phases: Optional[list] = None
    copy_root = tmp_path / "copy"
    copy_root.mkdir()
    for source in data_root.iterdir():  # the same files, under another folder
        (copy_root / source.name).symlink_to(source.resolve())
    checked_equal = []
    for key, value in ALTERNATIVES.items():
        cfg = copy.deepcopy(base)
        set_key(cfg, key, str(copy_root) if value == "<copy>" else value)
        # The key on this run's data; where a data field changes the data, the key differs even more.
        keys = phase_keys(cfg, benchmark, CPU)
        if all(a != b for a, b in zip(keys[:PHASES], base_keys[:PHASES])):
            continue
        # Equal keys up to some phase: the phases trained there must be bit-identical.
        bench = build_benchmark(cfg.data, cfg.protocol, cfg.seed, raw=cifar10_raw)
        keys = phase_keys(cfg, bench, CPU)
        equal = [k for k in range(PHASES) if keys[k] == base_keys[k]]
        if not equal:
            continue
        if key in NEEDS_CUDA and not torch.cuda.is_available():
            checked_equal.append((key, equal))  # keyed as placement; test_graphs trains it on CUDA
            continue
        base_phases = base_phases or trained_phases(base, benchmark)
        phases = trained_phases(cfg, bench, phases=max(equal) + 1)
        for k in equal:
            assert identical(comparable(phases[k]), comparable(base_phases[k])), f"{key}: key({k}) is unchanged but phase {k} trained differently"
            assert same_features(phases[k], base_phases[k]), f"{key}: key({k}) is unchanged but its herding features differ"
        checked_equal.append((key, equal))
    # The declarations at work: these share phase 0 (and the NEVER fields every phase).
    shared = dict(checked_equal)
    assert shared["memory.per_class"] == [0] and shared["learner.dgr.lambda_b"] == [0]
    assert shared["data.num_workers"] == [0, 1] and shared["data.root"] == [0, 1] and shared["name"] == [0, 1]
    assert shared["train.cuda_graph"] == [0, 1]  # how the step runs, like the device


def test_learners_that_differ_only_once_there_is_an_old_model_share_phase_0(data_root, cifar10_raw):
    cfgs = {name: small_config(data_root, learner=name, train_fraction=0.02) for name in ("replay", "lwf", "icarl", "wa", "dgr")}
    benchmark = build_benchmark(cfgs["replay"].data, cfgs["replay"].protocol, 0, raw=cifar10_raw)
    keys = {name: phase_keys(cfg, benchmark, CPU) for name, cfg in cfgs.items()}
    assert len({keys[name][0] for name in ("replay", "lwf", "icarl", "wa")}) == 1
    assert keys["dgr"][0] != keys["replay"][0]  # DGR reweights the first task's heads too
    assert len({keys[name][1] for name in keys}) == len(keys)
    replay, icarl = (trained_phases(cfgs[name], benchmark, phases=1)[0] for name in ("replay", "icarl"))
    # iCaRL scores by nearest mean of exemplars: its phase stores no scores, the rest is the same.
    assert icarl.evaluation is None and replay.evaluation is not None
    assert identical(comparable(dataclasses.replace(replay, evaluation=None)), comparable(icarl))
