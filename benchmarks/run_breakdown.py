"""Where one `imbcil run` spends its wall time: start-up, training, evaluation, herding, tracking.

    PYTHONPATH=. python benchmarks/run_breakdown.py --data-root ../shared/data --epochs 2 20

For each epoch count, one DGR run on CIFAR-10-LT shuffled LFS-5 (seed 0), run as `imbcil run`
runs it (`pipeline.run.run_command`, a fresh SQLite store in a temporary folder), in this
process. The trainer's and the tracker's steps are timed as they run:
- start-up: from the command's start to the first training step (config, data, store);
- training: the phases' training loops;
- evaluation: scoring the test and the held-out images;
- herding: the memory update (and iCaRL's class means);
- tracking: logging each phase (metrics, matrices, plots, checkpoint);
- other: the rest (phase set-up, the frozen copy of the model, the end of the run).
The first run pays the imports of this process and, with a cold cache, the data's decoding;
later runs start warm. Run it on an idle machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 20])
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    print("| epochs | wall s | start-up | training | evaluation | herding | tracking | other | training share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for epochs in args.epochs:
        seconds, wall = one_run(args, epochs)
        other = wall - sum(seconds.values())
        cells = [f"{seconds[k]:.1f}" for k in ("start-up", "training", "evaluation", "herding", "tracking")]
        print(f"| {epochs} | {wall:.1f} | {' | '.join(cells)} | {other:.1f} | {100 * seconds['training'] / wall:.0f}% |", flush=True)


def milestones(epochs: int) -> list[int]:
    """The paper's lr schedule shape (drops at 1/2 and 3/4 of the epochs), or one drop for short runs."""
    return [max(1, epochs // 2)] if epochs < 4 else [epochs // 2, 3 * epochs // 4]


def one_run(args, epochs: int) -> tuple[dict[str, float], float]:
    started = time.perf_counter()
    import torch

    from method.trainer import IncrementalTrainer
    from pipeline import tracking
    from pipeline.run import run_command

    if args.threads:
        torch.set_num_threads(args.threads)
    seconds: dict[str, float] = collections.defaultdict(float)
    first_step: list[float] = []

    def timed(owner, name: str, bucket: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            begin = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                seconds[bucket] += time.perf_counter() - begin

        setattr(owner, name, wrapper)

    train = IncrementalTrainer._train

    def training(self, *a, **k):
        begin = time.perf_counter()
        first_step.append(begin)
        try:
            return train(self, *a, **k)
        finally:
            seconds["training"] += time.perf_counter() - begin

    saved = {name: getattr(IncrementalTrainer, name) for name in ("_train", "_score_split", "_update_memory", "_class_means")}
    saved_log = tracking.RunTracker.log_phase
    IncrementalTrainer._train = training
    timed(IncrementalTrainer, "_score_split", "evaluation")
    timed(IncrementalTrainer, "_update_memory", "herding")
    timed(IncrementalTrainer, "_class_means", "herding")
    timed(tracking.RunTracker, "log_phase", "tracking")
    overrides = [
        "data.dataset=cifar10", "data.scenario=shuffled", f"data.train_fraction={args.train_fraction}",
        "protocol.first_task_classes=2", "protocol.incremental_tasks=4",
        f"train.epochs={epochs}", f"train.milestones={milestones(epochs)}", "device=cpu",
    ]  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="imbcil-breakdown-") as folder:
            run_command(
                None, overrides, data_root=args.data_root, tracking_uri=f"sqlite:///{Path(folder) / 'mlflow.db'}",
                experiment="breakdown", device=None, resume=None,
            )  # fmt: skip
            wall = time.perf_counter() - started
    finally:
        for name, method in saved.items():
            setattr(IncrementalTrainer, name, method)
        tracking.RunTracker.log_phase = saved_log
    seconds["start-up"] = first_step[0] - started
    return dict(seconds), wall


if __name__ == "__main__":
    main()
