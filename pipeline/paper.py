"""The paper's table (He, CVPR 2024, poster "Experiments"): average incremental accuracy in %.

Reports compare a reproduction with these numbers, so they are typed in once here, row by row
exactly as the poster prints them, rather than scattered over report code. Every number is a
single run of the *shuffled* long-tail scenario at the paper's full budget (method.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from method.config import DATASET_FACTS, RunConfig, protocol_name

SCENARIO = "shuffled"
# Column order of the poster's table: dataset, then protocol.
DATASETS = ("cifar100", "imagenet_subset", "food101")
PROTOCOLS = ("LFS-10", "LFS-20", "LFH-5", "LFH-10")
DGR = "DGR (Ours)"

DATASET_LABELS = {
    "cifar10": "CIFAR-10-LT",
    "cifar100": "CIFAR100-LT",
    "imagenet_subset": "ImageNetSubset-LT",
    "food101": "Food101-LT",
    "imagenet": "ImageNet-1000",
}

# One row per method, 12 values in column order: CIFAR100-LT, ImageNetSubset-LT, Food101-LT,
# each LFS-10, LFS-20, LFH-5, LFH-10.
_ROWS: dict[str, tuple[float, ...]] = {
    "iCaRL": (21.83, 24.28, 28.68, 28.33, 33.75, 29.71, 41.82, 40.21, 18.13, 12.50, 21.83, 21.31),
    "IL2M": (31.37, 29.99, 34.90, 33.42, 31.70, 25.20, 40.75, 39.08, 16.11, 16.27, 23.93, 22.48),
    "BiC": (28.89, 20.10, 25.68, 25.95, 33.31, 30.86, 33.18, 29.23, 16.94, 16.81, 22.80, 20.75),
    "WA": (27.63, 23.48, 32.07, 26.85, 32.58, 29.03, 32.62, 28.10, 16.58, 15.99, 18.45, 19.45),
    "SSIL": (26.07, 26.15, 30.72, 29.21, 30.38, 25.99, 38.97, 35.18, 16.86, 15.65, 21.65, 19.03),
    "FOSTER": (30.43, 29.96, 37.25, 37.91, 34.38, 29.75, 46.51, 43.88, 24.27, 20.45, 32.39, 31.46),
    "MAFDRC": (32.67, 31.95, 37.94, 38.51, 40.01, 34.48, 48.23, 44.12, 26.93, 19.21, 34.22, 30.91),
    "EEIL-2stage": (33.64, 32.25, 36.40, 34.91, 36.84, 30.39, 43.62, 41.49, 19.75, 20.02, 22.65, 22.83),
    "LUCIR-2stage": (31.09, 31.03, 38.47, 37.86, 39.87, 34.79, 48.97, 47.39, 27.65, 24.68, 36.05, 35.06),
    "PODNet-2stage": (30.41, 30.37, 38.38, 38.45, 35.47, 31.71, 48.02, 47.74, 23.78, 21.13, 35.42, 35.22),
    "FOSTER-2stage": (31.27, 30.68, 40.26, 39.43, 36.47, 33.95, 48.89, 46.93, 25.82, 22.28, 35.69, 33.48),
    DGR: (35.66, 34.35, 40.18, 39.11, 45.12, 40.79, 50.57, 49.13, 29.05, 26.42, 36.84, 36.19),
}

METHODS = tuple(_ROWS)

# Our configs that are rows of the table: (learner.name, learner.two_stage) -> the row's label.
# The competitors' rows are the two-stage (LWS) runs of Long-Tailed-CIL.
PAPER_ROWS = {
    ("dgr", "none"): DGR,
    ("icarl", "none"): "iCaRL",
    ("wa", "none"): "WA",
    ("eeil", "lws"): "EEIL-2stage",
    ("lucir", "lws"): "LUCIR-2stage",
    ("podnet", "lws"): "PODNet-2stage",
}


def paper_row(learner: str, two_stage: str) -> Optional[str]:
    """The table's row that a config of this learner reproduces, or None."""
    return PAPER_ROWS.get((learner, two_stage))


def paper_table() -> dict[tuple[str, str], dict[str, float]]:
    """{(dataset, protocol): {method: accuracy}} for every cell of the poster's table."""
    columns = [(d, p) for d in DATASETS for p in PROTOCOLS]
    return {col: {method: row[i] for method, row in _ROWS.items()} for i, col in enumerate(columns)}


@dataclass(frozen=True)
class PaperReference:
    """The numbers a reproduction of one setting is compared against."""

    dataset: str
    scenario: str
    protocol: str
    dgr: float
    best_other_method: str
    best_other: float

    @property
    def setting(self) -> str:
        return f"{DATASET_LABELS[self.dataset]} {self.scenario} {self.protocol}"


def paper_reference(dataset: str, scenario: str, protocol: Optional[str]) -> Optional[PaperReference]:
    """DGR's number and the strongest other method for a setting; None where the paper has none.

    The paper ran the shuffled scenario only, on CIFAR-100-LT, ImageNet-Subset-LT and
    Food-101-LT; CIFAR-10-LT (the offline stand-in) and the other scenarios have no number.
    """
    if scenario != SCENARIO or protocol is None:
        return None
    cell = paper_table().get((dataset, protocol))
    if cell is None:
        return None
    others = {m: v for m, v in cell.items() if m != DGR}
    best = max(others, key=others.get)  # poster order breaks ties, as dicts keep insertion order
    return PaperReference(dataset, scenario, protocol, cell[DGR], best, others[best])


def paper_protocol(cfg: RunConfig) -> Optional[str]:
    """The paper's name for the config's task split, or None when the paper never ran that split.

    Same names as `method.config.protocol_name`, but stricter: LFH must start from half the classes
    (CIFAR-100 20 + 8x10 is "LFH-8" there, yet no paper setting), and LFS allows no other
    remainder than the one class Food-101's 101 classes leave (11 + 9x10 for LFS-10).
    """
    num_classes = DATASET_FACTS[cfg.data.dataset]["num_classes"]
    first, tasks = cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks
    total = tasks + 1
    equal, left_over = divmod(num_classes, total)
    # The reference hands a remainder out one class per task from the first; only a remainder
    # of one keeps the later tasks equal, which is all our config can express.
    if left_over <= 1 and first == equal + left_over and (num_classes - first) == equal * tasks:
        return f"LFS-{total}"
    if first in (num_classes // 2, (num_classes + 1) // 2):
        name = protocol_name(cfg)
        return name if name.startswith("LFH-") else None
    return None
