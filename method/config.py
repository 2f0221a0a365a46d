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
from typing import Callable, Optional


def bounded(default, *, ge=None, gt=None, le=None, lt=None, choices=None, **kw):
    """A dataclass field with validation limits in its metadata."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
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


DATASETS = ("cifar10", "cifar100", "imagenet_subset", "food101")


@dataclass
class DataConfig:
    dataset: str = bounded("cifar100", choices=DATASETS)
    # auto: cifar10 -> the offline Parquet file if present, else the python folder;
    # cifar100 -> the python folder; imagenet_subset/food101 -> train.txt/test.txt lists.
    source: str = bounded("auto", choices=("auto", "parquet", "folder", "filelist"))
    # Where the data lives; the CLI's --data-root / IMBCIL_DATA fill it when empty.
    root: Optional[str] = None
    # Only where the user asks: torchvision's download of CIFAR into `root`.
    download: bool = False
    imbalance: str = bounded("exp", choices=("exp", "step", "none"))
    rho: float = bounded(100.0, ge=1.0)
    scenario: str = bounded("shuffled", choices=("shuffled", "ordered", "conventional"))
    # The long-tail subset's own seed, independent of the run seed (method.md §1).
    subset_seed: int = bounded(0, ge=0)
    val_fraction: float = bounded(0.1, ge=0.0, lt=1.0)
    # Reduced-budget knobs for quick runs and tests: keep this fraction of every class's
    # training (after the LT profile) and test images (at least one image per class).
    train_fraction: float = bounded(1.0, gt=0.0, le=1.0)
    test_fraction: float = bounded(1.0, gt=0.0, le=1.0)
    # File-list datasets: decoding workers of the lazy loader.
    num_workers: int = bounded(4, ge=0)


@dataclass
class ProtocolConfig:
    # Classes in the first task, and the number of incremental tasks after it (method.md
    # "Counting tasks"). CIFAR-100 LFS-10 is 10 + 9x10; LFH-5 is 50 + 5x10.
    first_task_classes: int = bounded(10, ge=2)
    incremental_tasks: int = bounded(9, ge=1)


@dataclass
class ModelConfig:
    # auto: resnet32 for 32x32 datasets, resnet18 (not pretrained) for 224 inputs.
    backbone: str = bounded("auto", choices=registered("method.backbones", "BACKBONES", "auto"))


@dataclass
class TrainConfig:
    # None: the dataset's paper value (CIFAR 160 / [80, 120] / 5e-4; others 90 / [30, 60] / 1e-4).
    epochs: Optional[int] = bounded(None, ge=1)
    milestones: Optional[list[int]] = None
    weight_decay: Optional[float] = bounded(None, ge=0.0)
    lr: float = bounded(0.1, gt=0.0)
    lr_decay: float = bounded(0.1, gt=0.0, le=1.0)
    momentum: float = bounded(0.9, ge=0.0, lt=1.0)
    batch_size: int = bounded(128, ge=1)
    eval_batch_size: int = bounded(1024, ge=1)
    # The reference evaluates validation after every epoch only to print it (method.md §1).
    validate_every_epoch: bool = False
    # bf16: autocast on CUDA, and on CPU where it has AMX or AVX512-BF16 (elsewhere it is
    # slower than fp32 there). fp32 is the default.
    precision: str = bounded("fp32", choices=("fp32", "bf16"))
    # Capture the fixed-shape training step as a CUDA graph (CUDA only).
    cuda_graph: bool = False


@dataclass
class MemoryConfig:
    # per_class: E exemplars per seen class (growing memory, the paper's default);
    # total: a fixed total split evenly over seen classes; none: no memory.
    budget: str = bounded("per_class", choices=registered("method.memory", "BUDGETS"))
    per_class: int = bounded(20, ge=1)
    total: int = bounded(2000, ge=1)
    selection: str = bounded("herding", choices=("herding", "random"))


@dataclass
class DGRConfig:
    """Switches and knobs of the gradient-reweighting method (method.md §3)."""

    logit_adjustment: bool = True
    intra_phase_reweighting: bool = True
    inter_phase_reweighting: bool = True
    distillation: str = bounded("dakd", choices=("dakd", "kd"))
    # The beta schedule: beta = lambda_b * shape(t) for the distillation loss, times T^2.
    lambda_b: float = bounded(0.7, ge=0.0)
    attenuation: float = bounded(1.0, ge=0.0)
    temperature: float = bounded(2.0, gt=0.0)
    # sqrt: the paper's sqrt(n_seen / n_new); constant: 1; linear: the phase index t.
    beta_schedule: str = bounded("sqrt", choices=("sqrt", "constant", "linear"))
    # DAKD prior: l2 (the code's L2-normalised ratio) or sum (the poster's plain ratio).
    dakd_prior: str = bounded("l2", choices=("l2", "sum"))


@dataclass
class LearnerConfig:
    name: str = bounded("dgr", choices=registered("method.learners", "LEARNERS"))
    # Temperature of the plain KD of lwf / icarl / wa.
    kd_temperature: float = bounded(2.0, gt=0.0)
    # After each task, retrain the classifier on a class-balanced sample, backbone frozen.
    two_stage: bool = False
    two_stage_epochs: int = bounded(30, ge=1)
    two_stage_lr: float = bounded(0.01, gt=0.0)
    dgr: DGRConfig = field(default_factory=DGRConfig)


@dataclass
class RunConfig:
    name: str = "dgr-cifar100-lt-lfs10"
    seed: int = bounded(0, ge=0)
    device: str = bounded("auto", choices=("auto", "cpu", "cuda"))
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
    return cfg


def paper_budget(cfg: RunConfig) -> RunConfig:
    """Restore the paper's epochs, schedule and lr for the config's dataset (method.md §2)."""
    facts = DATASET_FACTS[cfg.data.dataset]
    cfg.train.epochs = facts["epochs"]
    cfg.train.milestones = list(facts["milestones"])
    cfg.train.weight_decay = facts["weight_decay"]
    cfg.train.lr_decay = 0.1
    cfg.train.momentum = 0.9
    cfg.train.batch_size = 128
    cfg.data.train_fraction = 1.0
    cfg.data.test_fraction = 1.0
    return cfg
