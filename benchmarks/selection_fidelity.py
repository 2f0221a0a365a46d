"""Does the validation metric choose what the test would? The old image-weighted one and the class-balanced one.

    PYTHONPATH=. python benchmarks/selection_fidelity.py --data-root ../shared/data
    PYTHONPATH=. python benchmarks/selection_fidelity.py --data-root ../shared/data --epochs 20 --milestones 10 15 --train-fraction 1

Trains K configs around DGR's defaults on CIFAR-10-LT shuffled LFS-5 (seed 0, one benchmark for
all), including the ablations that move the head/tail balance (no intra-phase reweighting, no
logit adjustment, replay, WA, iCaRL) and a learning rate high enough to collapse onto each task's
head class. For each it sets the test `avg_incremental_acc` beside two validation values of the
same held-out predictions: `val_avg_incremental_acc` as logged (class-balanced: a task's accuracy
is the mean of its classes'), and the image-weighted version imbcil logged before (pooled over
the task's held-out images, recomputed from per_class's val_count and val_accuracy). Prints the
table, then per metric Kendall's tau against the test over the K configs and the test value of
the config it would choose, beside the test's own best.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from scipy.stats import kendalltau

from method.config import RunConfig, resolve_dataset_defaults
from method.data import build_benchmark
from method.results import PhaseResult
from method.trainer import IncrementalTrainer

# name: (learner, {dotted key: value}) over the defaults (lr 0.1, 20 exemplars per class).
CONFIGS = {
    "dgr": ("dgr", {}),
    "dgr lr 0.03": ("dgr", {"train.lr": 0.03}),
    "dgr lr 0.3": ("dgr", {"train.lr": 0.3}),
    "dgr 10 exemplars/class": ("dgr", {"memory.per_class": 10}),
    "dgr lambda_b 2": ("dgr", {"learner.dgr.lambda_b": 2.0}),
    "dgr attenuation 0": ("dgr", {"learner.dgr.attenuation": 0.0}),
    "dgr w/o intra-phase reweighting": ("dgr", {"learner.dgr.intra_phase_reweighting": False}),
    "dgr w/o inter-phase reweighting": ("dgr", {"learner.dgr.inter_phase_reweighting": False}),
    "dgr w/o logit adjustment": ("dgr", {"learner.dgr.logit_adjustment": False}),
    "replay": ("replay", {}),
    "wa": ("wa", {}),
    "icarl": ("icarl", {}),
}


def config(args, learner: str, changes: dict) -> RunConfig:
    cfg = RunConfig(name="selection-fidelity", seed=args.seed, device=args.device)
    cfg.data.dataset, cfg.data.root, cfg.data.train_fraction = "cifar10", args.data_root, args.train_fraction
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs, cfg.train.milestones = args.epochs, args.milestones
    cfg.learner.name = learner
    for dotted, value in changes.items():
        *path, field = dotted.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        setattr(section, field, value)
    return resolve_dataset_defaults(cfg)


def image_weighted_validation(results: list[PhaseResult]) -> float:
    """The pre-balanced val_avg_incremental_acc: per task, held-out hits over held-out images."""
    phase_values = []
    for result in results:
        counts = dict(zip(result.per_class["position"], result.per_class["val_count"]))
        accuracy = dict(zip(result.per_class["position"], result.per_class["val_accuracy"]))
        task_values = []
        for classes in result.task_classes[: result.phase + 1]:
            images = sum(counts[c] for c in classes)
            if images:
                task_values.append(sum(counts[c] * accuracy[c] for c in classes if counts[c]) / images)
        if task_values:
            phase_values.append(float(np.mean(task_values)))
    return float(np.mean(phase_values)) if phase_values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--milestones", type=int, nargs="+", default=[2])
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first = config(args, "dgr", {})
    benchmark = build_benchmark(first.data, first.protocol, first.seed)
    print(f"CIFAR-10-LT shuffled LFS-5, seed {args.seed}, {args.epochs} epochs per task, milestones "
          f"{args.milestones}, train fraction {args.train_fraction}, {len(args.configs)} configs\n")
    print("| config | test avg inc acc % | val image-weighted % | val class-balanced % | wall s |\n|---|---|---|---|---|", flush=True)
    began = time.perf_counter()
    rows = []
    for name in args.configs:
        learner, changes = CONFIGS[name]
        start = time.perf_counter()
        results = list(IncrementalTrainer(config(args, learner, changes), benchmark=benchmark).phases())
        final = results[-1].metrics
        row = (name, final["avg_incremental_acc"], image_weighted_validation(results), final["val_avg_incremental_acc"])
        rows.append(row)
        print(f"| {name} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} | {time.perf_counter() - start:.0f} |", flush=True)
        print(f"  {name}: test acc per phase {[round(r.metrics['acc'], 1) for r in results]}", file=sys.stderr, flush=True)

    test = np.array([r[1] for r in rows])
    best = int(np.argmax(test))
    print(f"\ntest-best config: {rows[best][0]} ({test[best]:.2f})\n")
    print("| validation metric | Kendall's tau vs test | chosen config | its test % | below the test-best |\n|---|---|---|---|---|")
    for column, label in ((2, "image-weighted (before)"), (3, "class-balanced (now)")):
        values = np.array([r[column] for r in rows])
        tau = kendalltau(values, test).statistic
        chosen = int(np.nanargmax(values))
        print(f"| {label} | {tau:+.2f} | {rows[chosen][0]} | {test[chosen]:.2f} | {test[best] - test[chosen]:.2f} |")
    print(f"\nall configs: {time.perf_counter() - began:.0f} s wall")


if __name__ == "__main__":
    main()
