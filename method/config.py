"""The run configuration tree, with the paper's defaults (method.md §1-3).

Plain dataclasses so that `method/` runs on a bare torch machine; `pipeline.config` loads them
from YAML and validates them. Each field's `metadata` carries the bounds and choices that the
validator enforces, so the limits live next to the field they constrain.

A field set to None where the doc says "dataset default" is filled in by
`resolve_dataset_defaults`, so a saved, resolved config names every value explicitly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional


# `first_phase` of a field: the first phase whose trained state the field can change. 0 for what
# shapes every phase, 1 for what only matters once there is memory or an old model (the memory
# settings, distillation), NEVER for where and how a run executes. The phase store's key
# (method/phases.py) is built from these declarations alone; a field without one cannot be keyed.
NEVER = None


def bounded(default, *, first_phase, ge=None, gt=None, le=None, lt=None, choices=None, per_task=None, **kw):
    """A dataclass field with its validation limits and its phase-key declaration in its metadata.

    `per_task(cfg, task)`, where given, is the value a task actually reads (a first-task override,
    say); the key then holds that value for every phase instead of the field's own.
    """
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, per_task=per_task).items() if v is not None}
    meta["first_phase"] = first_phase
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def registered(module: str, registry: str, *extra: str) -> Callable[[], tuple[str, ...]]:
    """Choices read from a registry when a config is validated: the registry is the only list.

    Looked up late, so that this module imports neither torch nor the learners, which import it.
    """

    def names() -> tuple[str, ...]:
        return (*extra, *getattr(importlib.import_module(module), registry))

    return names


def looked_up(module: str, name: str) -> Callable:
    """A function of `module`, imported when first called, for a declaration here that needs it."""

    def call(*args):
        return getattr(importlib.import_module(module), name)(*args)

    return call


DATASETS = ("cifar10", "cifar100", "imagenet_subset", "food101", "imagenet")


@dataclass
class DataConfig:
    dataset: str = bounded("cifar100", first_phase=0, choices=DATASETS)
    # auto: cifar10 -> the offline Parquet file if present, else the python folder;
    # cifar100 -> the python folder; imagenet_subset/food101/imagenet -> train.txt/test.txt lists.
    source: str = bounded("auto", first_phase=0, choices=("auto", "parquet", "folder", "filelist"))
    # Where the data lives; the CLI's --data-root / IMBCIL_DATA fill it when empty. The phase key
    # holds a fingerprint of the images themselves instead (method/phases.py).
    root: Optional[str] = bounded(None, first_phase=NEVER)
    # Only where the user asks: torchvision's download of CIFAR into `root`.
    download: bool = bounded(False, first_phase=NEVER)
    imbalance: str = bounded("exp", first_phase=0, choices=("exp", "step", "none"))
    rho: float = bounded(100.0, first_phase=0, ge=1.0)
    scenario: str = bounded("shuffled", first_phase=0, choices=("shuffled", "ordered", "conventional"))
    # The long-tail subset's own seed, independent of the run seed (method.md §1).
    subset_seed: int = bounded(0, first_phase=0, ge=0)
    val_fraction: float = bounded(0.1, first_phase=0, ge=0.0, lt=1.0)
    # Reduced-budget knobs for quick runs and tests: keep this fraction of every class's
    # training (after the LT profile) and test images (at least one image per class).
    train_fraction: float = bounded(1.0, first_phase=0, gt=0.0, le=1.0)
    test_fraction: float = bounded(1.0, first_phase=0, gt=0.0, le=1.0)
    # File-list datasets: decoding workers of the lazy loader.
    num_workers: int = bounded(4, first_phase=NEVER, ge=0)


@dataclass
class ProtocolConfig:
    # Classes in the first task, and the number of incremental tasks after it (method.md
    # "Counting tasks"). CIFAR-100 LFS-10 is 10 + 9x10; LFH-5 is 50 + 5x10.
    first_task_classes: int = bounded(10, first_phase=0, ge=2)
    incremental_tasks: int = bounded(9, first_phase=0, ge=1)


@dataclass
class ModelConfig:
    # auto: resnet32 for 32x32 datasets, resnet18 (not pretrained) for 224 inputs.
    backbone: str = bounded("auto", first_phase=0, choices=registered("method.backbones", "BACKBONES", "auto"))


class TaskSchedule(NamedTuple):
    lr: float
    epochs: int
    milestones: list[int]


def _task_setting(name: str) -> Callable[["RunConfig", int], object]:
    """The phase key's view of a shared training setting: the value task `task` trains with."""
    return lambda cfg, task: getattr(cfg.train.for_task(task), name)


@dataclass
class FirstTaskConfig:
    """The first task's own training settings; None trains it as every other task.

    Set apart, a search over the later tasks' settings leaves phase 0 unchanged, so every trial
    shares it through the phase store.
    """

    lr: Optional[float] = bounded(None, first_phase=0, gt=0.0)
    epochs: Optional[int] = bounded(None, first_phase=0, ge=1)
    milestones: Optional[list[int]] = bounded(None, first_phase=0)


@dataclass
class TrainConfig:
    # None: the dataset's paper value (CIFAR 160 / [80, 120] / 5e-4; others 90 / [30, 60] / 1e-4).
    epochs: Optional[int] = bounded(None, first_phase=0, ge=1, per_task=_task_setting("epochs"))
    milestones: Optional[list[int]] = bounded(None, first_phase=0, per_task=_task_setting("milestones"))
    weight_decay: Optional[float] = bounded(None, first_phase=0, ge=0.0)
    lr: float = bounded(0.1, first_phase=0, gt=0.0, per_task=_task_setting("lr"))
    lr_decay: float = bounded(0.1, first_phase=0, gt=0.0, le=1.0)
    momentum: float = bounded(0.9, first_phase=0, ge=0.0, lt=1.0)
    batch_size: int = bounded(128, first_phase=0, ge=1)
    # The batch of the frozen model's passes (scores, herding features). None: the fastest
    # measured per device (trainer.eval_batch_size). It batches what a phase stores, so it is keyed.
    eval_batch_size: Optional[int] = bounded(None, first_phase=0, ge=1)
    # The reference evaluates validation after every epoch only to print it (method.md §1).
    validate_every_epoch: bool = bounded(False, first_phase=NEVER)
    # bf16: autocast on CUDA, and on CPU where it has AMX or AVX512-BF16 (elsewhere it is
    # slower than fp32 there). fp32 is the default.
    precision: str = bounded("fp32", first_phase=0, choices=("fp32", "bf16"))
    # Capture the fixed-shape training step as a CUDA graph (CUDA only). How a run executes, like
    # `device`: the graphed step trains as the eager one (tests/method/test_graphs.py), so it
    # enters no phase key and a run may resume with it changed.
    cuda_graph: bool = bounded(False, first_phase=NEVER)
    first_task: FirstTaskConfig = field(default_factory=FirstTaskConfig)

    def for_task(self, task: int) -> TaskSchedule:
        """The learning rate, epochs and milestones that task `task` trains with."""
        own = self.first_task if task == 0 else FirstTaskConfig()
        return TaskSchedule(
            lr=self.lr if own.lr is None else own.lr,
            epochs=self.epochs if own.epochs is None else own.epochs,
            milestones=self.milestones if own.milestones is None else own.milestones,
        )


@dataclass
class MemoryConfig:
    # per_class: E exemplars per seen class (growing memory, the paper's default);
    # total: a fixed total split evenly over seen classes; none: no memory. Phase 0 trains
    # without memory, and a stored phase keeps what selection needs, so these enter at phase 1.
    budget: str = bounded("per_class", first_phase=1, choices=registered("method.memory", "BUDGETS"))
    per_class: int = bounded(20, first_phase=1, ge=1)
    total: int = bounded(2000, first_phase=1, ge=1)
    selection: str = bounded("herding", first_phase=1, choices=("herding", "random"))


@dataclass
class DGRConfig:
    """Switches and knobs of the gradient-reweighting method (method.md §3)."""

    # Both shape the first task's heads' gradient; everything else needs an old model.
    logit_adjustment: bool = bounded(True, first_phase=0)
    intra_phase_reweighting: bool = bounded(True, first_phase=0)
    inter_phase_reweighting: bool = bounded(True, first_phase=1)
    distillation: str = bounded("dakd", first_phase=1, choices=("dakd", "kd"))
    # The beta schedule: beta = lambda_b * shape(t) for the distillation loss, times T^2.
    lambda_b: float = bounded(0.7, first_phase=1, ge=0.0)
    attenuation: float = bounded(1.0, first_phase=1, ge=0.0)
    temperature: float = bounded(2.0, first_phase=1, gt=0.0)
    # sqrt: the paper's sqrt(n_seen / n_new); constant: 1; linear: the phase index t.
    beta_schedule: str = bounded("sqrt", first_phase=1, choices=("sqrt", "constant", "linear"))
    # DAKD prior: l2 (the code's L2-normalised ratio) or sum (the poster's plain ratio).
    dakd_prior: str = bounded("l2", first_phase=1, choices=("l2", "sum"))


@dataclass
class LUCIRConfig:
    """LUCIR (Hou et al. 2019) as the Long-Tailed-CIL reference runs it (docs/method.md §6)."""

    # The less-forget weight's base, times sqrt(old / new classes). None: the reference's 5 for
    # the 160-epoch datasets (CIFAR), 10 for the 90-epoch ones.
    lambda_base: Optional[float] = bounded(None, first_phase=1, ge=0.0)
    lambda_mr: float = bounded(1.0, first_phase=1, ge=0.0)
    margin: float = bounded(0.5, first_phase=1, ge=0.0)
    hard_negatives: int = bounded(2, first_phase=1, ge=1)


@dataclass
class PODNetConfig:
    """PODNet (Douillard et al. 2020) as the Long-Tailed-CIL reference runs it."""

    # Each distillation term is scaled by its factor times sqrt(seen / new classes).
    flat_factor: float = bounded(1.0, first_phase=1, ge=0.0)
    spatial_factor: float = bounded(3.0, first_phase=1, ge=0.0)
    nca_margin: float = bounded(0.6, first_phase=0)


@dataclass
class EEILConfig:
    """EEIL (Castro et al. 2018) as the Long-Tailed-CIL reference runs it."""

    lamb: float = bounded(1.0, first_phase=1, ge=0.0)
    temperature: float = bounded(2.0, first_phase=1, gt=0.0)
    # The balanced fine-tuning after each later task: lr x factor, its own epochs.
    finetune_lr_factor: float = bounded(0.01, first_phase=1, gt=0.0)
    finetune_epochs: int = bounded(40, first_phase=1, ge=0)


@dataclass
class LearnerConfig:
    """The learner and its knobs. A section named after a learner (`dgr`) is that learner's alone:
    the phase key reads it only when that learner runs."""

    name: str = bounded("dgr", first_phase=0, choices=registered("method.learners", "LEARNERS"), per_task=looked_up("method.learners", "trains_task_as"))
    # Temperature of the plain KD of lwf / icarl / wa.
    kd_temperature: float = bounded(2.0, first_phase=1, gt=0.0)
    # After each task's training, the backbone frozen: none; refit (the heads refit on
    # class-balanced draws of fixed features, two_stage_lr); lws (Long-Tailed-CIL's two-stage:
    # the newest head and a per-class scaling of the scores on class-balanced, augmented draws,
    # at the task's lr on a cosine schedule). Both run two_stage_epochs.
    two_stage: str = bounded("none", first_phase=0, choices=("none", "refit", "lws"))
    two_stage_epochs: int = bounded(30, first_phase=0, ge=1)
    two_stage_lr: float = bounded(0.01, first_phase=0, gt=0.0)
    dgr: DGRConfig = field(default_factory=DGRConfig)
    lucir: LUCIRConfig = field(default_factory=LUCIRConfig)
    podnet: PODNetConfig = field(default_factory=PODNetConfig)
    eeil: EEILConfig = field(default_factory=EEILConfig)


@dataclass
class RunConfig:
    name: str = bounded("dgr-cifar100-lt-lfs10", first_phase=NEVER)
    seed: int = bounded(0, first_phase=0, ge=0)
    # The device the trainer resolves enters the key in its place (method/phases.py).
    device: str = bounded("auto", first_phase=NEVER, choices=("auto", "cpu", "cuda"))
    data: DataConfig = field(default_factory=DataConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


# Facts about each dataset that the protocol needs (method.md §1-2).
DATASET_FACTS = {
    "cifar10": dict(num_classes=10, image_size=32, epochs=160, milestones=[80, 120], weight_decay=5e-4),
    "cifar100": dict(num_classes=100, image_size=32, epochs=160, milestones=[80, 120], weight_decay=5e-4),
    "imagenet_subset": dict(num_classes=100, image_size=224, epochs=90, milestones=[30, 60], weight_decay=1e-4),
    "food101": dict(num_classes=101, image_size=224, epochs=90, milestones=[30, 60], weight_decay=1e-4),
    # ILSVRC-2012, all 1000 classes: the authors' script runs it as it runs Food-101.
    "imagenet": dict(num_classes=1000, image_size=224, epochs=90, milestones=[30, 60], weight_decay=1e-4),
}


def protocol_name(cfg: RunConfig) -> str:
    """"LFS-N" (N equal tasks in all) or "LFH-N" (a larger first task, then N tasks), method.md §1."""
    num_classes = DATASET_FACTS[cfg.data.dataset]["num_classes"]
    first = cfg.protocol.first_task_classes
    tasks = cfg.protocol.incremental_tasks
    rest = num_classes - first
    # Equal tasks, or the reference's split of a class count that does not divide: the one
    # left-over class goes to the first task (Food-101 LFS-10 is 11 + 9x10, LFS-20 6 + 19x5).
    if rest in (first * tasks, (first - 1) * tasks):
        return f"LFS-{tasks + 1}"
    return f"LFH-{tasks}"


def resolve_dataset_defaults(cfg: RunConfig) -> RunConfig:
    """Fill the fields left to the dataset's paper defaults; returns the same object."""
    facts = DATASET_FACTS[cfg.data.dataset]
    if cfg.train.epochs is None:
        cfg.train.epochs = facts["epochs"]
    if cfg.train.milestones is None:
        cfg.train.milestones = list(facts["milestones"])
    if cfg.train.weight_decay is None:
        cfg.train.weight_decay = facts["weight_decay"]
    if cfg.model.backbone == "auto":
        cfg.model.backbone = "resnet32" if facts["image_size"] == 32 else "resnet18"
    if cfg.learner.lucir.lambda_base is None:
        cfg.learner.lucir.lambda_base = 10.0 if facts["epochs"] == 90 else 5.0
    return cfg


def paper_budget(cfg: RunConfig) -> RunConfig:
    """Restore the paper's epochs, schedule and lr for the config's dataset (method.md §2)."""
    facts = DATASET_FACTS[cfg.data.dataset]
    cfg.train.epochs = facts["epochs"]
    cfg.train.milestones = list(facts["milestones"])
    cfg.train.first_task.epochs = cfg.train.first_task.milestones = None  # the first task too
    cfg.train.weight_decay = facts["weight_decay"]
    cfg.train.lr_decay = 0.1
    cfg.train.momentum = 0.9
    cfg.train.batch_size = 128
    cfg.data.train_fraction = 1.0
    cfg.data.test_fraction = 1.0
    return cfg
