"""What the per-phase validation pass adds to a run: its seconds next to the test pass and the wall time.

    PYTHONPATH=. python benchmarks/validation_cost.py --data-root ../shared/data --epochs 2 --threads 1

One DGR run on CIFAR-10-LT shuffled LFS-5 (the quick-start settings, `--train-fraction` and
`--test-fraction` of the data), seed 0. The trainer's scoring of each split is timed as it runs;
the script prints, per phase and in total, the images and seconds of the test and the validation
pass, and the share of the run's wall time the validation pass takes.
"""

from __future__ import annotations

import argparse
import time

import torch

from method.config import RunConfig, resolve_dataset_defaults
from method.data import build_benchmark
from method.trainer import IncrementalTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--test-fraction", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = RunConfig(name="validation-cost", seed=0, device="cpu")
    cfg.data.dataset, cfg.data.root = "cifar10", args.data_root
    cfg.data.train_fraction, cfg.data.test_fraction = args.train_fraction, args.test_fraction
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs, cfg.train.milestones = args.epochs, [max(1, args.epochs - 1)]
    cfg = resolve_dataset_defaults(cfg)
    benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed)
    trainer = IncrementalTrainer(cfg, benchmark=benchmark)

    passes: list[tuple[str, int, float]] = []  # (split, images, seconds), in call order
    score = trainer._score_split

    def timed(images, labels, split, *rest):
        start = time.perf_counter()
        rows, count = score(images, labels, split, *rest)
        passes.append(("val" if split is benchmark.val else "test", count, time.perf_counter() - start))
        return rows, count

    trainer._score_split = timed
    started = time.perf_counter()
    print("| phase | test images | test s | val images | val s | phase s |")
    print("|---|---|---|---|---|---|")
    for result in trainer.phases():
        (_, test_n, test_s), (_, val_n, val_s) = passes[-2:]
        print(f"| {result.phase} | {test_n} | {test_s:.2f} | {val_n} | {val_s:.2f} | {result.metrics['phase_seconds']:.1f} |")
    wall = time.perf_counter() - started
    test_total = sum(s for split, _, s in passes if split == "test")
    val_total = sum(s for split, _, s in passes if split == "val")
    print(f"\nwall {wall:.1f} s; test pass {test_total:.2f} s; validation pass {val_total:.2f} s "
          f"= {100 * val_total / wall:.1f}% of the wall time, {val_total / max(test_total, 1e-9):.2f}x the test pass")  # fmt: skip


if __name__ == "__main__":
    main()
