"""Average incremental accuracy of every learner and DGR ablation on CIFAR-10-LT shuffled LFS-5.

    PYTHONPATH=. python benchmarks/learners.py --data-root ../shared/data --epochs 20 --milestones 10 15
    PYTHONPATH=. python benchmarks/learners.py --data-root ../shared/data --phase-store /tmp/phases
    PYTHONPATH=. python benchmarks/learners.py --data-root ../shared/data --rows lucir "lucir-2stage (lws)"

One run per row, seed 0, the same benchmark object for all. Prints a Markdown table with the
average incremental accuracy, the last accuracy and the wall time of each row, and the total.
With --phase-store, rows that train the same first phases share them (replay, lwf, icarl and wa
share phase 0, as do dgr and its ablations of the later phases); the reused column says which.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from method.config import RunConfig, resolve_dataset_defaults
from method.data import build_benchmark
from method.trainer import IncrementalTrainer
from pipeline.phase_store import FolderPhaseStore

ROWS = {
    "finetune": ("finetune", {}),
    "replay": ("replay", {}),
    "lwf": ("lwf", {}),
    "icarl": ("icarl", {}),
    "wa": ("wa", {}),
    "replay two-stage": ("replay", {"two_stage": "refit"}),
    "lucir": ("lucir", {}),
    "lucir-2stage (lws)": ("lucir", {"two_stage": "lws"}),
    "podnet": ("podnet", {}),
    "podnet-2stage (lws)": ("podnet", {"two_stage": "lws"}),
    "eeil": ("eeil", {}),
    # The reference's eeil_2stage.py runs one epoch of its second stage (its loop is range(1)).
    "eeil-2stage (lws)": ("eeil", {"two_stage": "lws", "two_stage_epochs": 1}),
    "dgr": ("dgr", {}),
    "dgr w/o intra-phase reweighting": ("dgr", {"intra_phase_reweighting": False}),
    "dgr w/o inter-phase reweighting": ("dgr", {"inter_phase_reweighting": False}),
    "dgr with plain KD": ("dgr", {"distillation": "kd"}),
    "dgr w/o logit adjustment": ("dgr", {"logit_adjustment": False}),
}


def config(args, learner: str, switches: dict) -> RunConfig:
    cfg = RunConfig(name="learners", seed=args.seed, device=args.device)
    cfg.data.dataset, cfg.data.root, cfg.data.train_fraction = "cifar10", args.data_root, args.train_fraction
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs, cfg.train.milestones = args.epochs, args.milestones
    cfg.learner.name = learner
    cfg.memory.budget = "none" if learner == "finetune" else "per_class"
    for key, value in switches.items():  # a learner field (two_stage...), else one of DGR's switches
        setattr(cfg.learner if hasattr(cfg.learner, key) else cfg.learner.dgr, key, value)
    return resolve_dataset_defaults(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--milestones", type=int, nargs="+", default=[10, 15])
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--phase-store", default=None, help="a phase-store folder the rows share (default: none)")
    args = parser.parse_args()
    store = FolderPhaseStore(Path(args.phase_store)) if args.phase_store else None
    if args.threads:
        torch.set_num_threads(args.threads)
    first = config(args, "dgr", {})
    benchmark = build_benchmark(first.data, first.protocol, first.seed)
    print(f"CIFAR-10-LT shuffled LFS-5, seed {args.seed}, {args.epochs} epochs, milestones {args.milestones}, "
          f"train fraction {args.train_fraction}\n")
    print("| learner | avg incremental acc % | last acc % | wall s | phases reused |\n|---|---|---|---|---|", flush=True)
    began = time.perf_counter()
    for row in args.rows:
        learner, switches = ROWS[row]
        start = time.perf_counter()
        results = []
        owned = store.for_owner(row) if store is not None else None
        for result in IncrementalTrainer(config(args, learner, switches), benchmark=benchmark, phase_store=owned).phases():
            results.append(result)
            print(f"  {row}: phase {result.phase} acc {result.metrics['acc']:.2f}% "
                  f"({result.metrics['phase_seconds']:.0f} s)", file=sys.stderr, flush=True)
        final = results[-1].metrics
        reused = ", ".join(f"{r.phase} ({r.reused_from})" for r in results if r.reused_from) or "-"
        print(f"| {row} | {final['avg_incremental_acc']:.2f} | {final['acc']:.2f} | {time.perf_counter() - start:.0f} | {reused} |", flush=True)
    print(f"\nall rows: {time.perf_counter() - began:.0f} s wall, phase store {args.phase_store or 'off'}", flush=True)


if __name__ == "__main__":
    main()
