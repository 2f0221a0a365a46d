"""imbcil's LUCIR-, PODNet- and EEIL-2stage against the Long-Tailed-CIL reference code, on the same data.

    PYTHONPATH=. python benchmarks/reference_comparison.py --reference PATH/Long-Tailed-CIL/src \\
        --data-root ../shared/data --epochs 20 --milestones 10 15 --train-fraction 0.25

Both sides get one benchmark object: imbcil's CIFAR-10-LT subset, shuffled class order, held-out
split and test images (shuffled LFS-5, seed 0). The reference side runs the reference's own
approach classes (`approach.<method>_2stage.Appr`), network (`resnet32`, PODNet's
`resnet32_podnet`), exemplar herding (20 per class) and image transforms (pad 4, random resized
crop, flip), in a task loop written here that does what its `main_incremental.py` does: a head per
task, PODNet's class counts set before each task, `appr.train`, then the test accuracy of every
seen task. Its numbers are its task-agnostic accuracies, averaged as imbcil averages them.
The reference's source is needed on disk (it is not a dependency); nothing of it is copied here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np
import torch

from method.config import RunConfig, resolve_dataset_defaults
from method.data import build_benchmark
from method.trainer import IncrementalTrainer

METHODS = ("lucir", "podnet", "eeil")


def config(args, learner: str) -> RunConfig:
    cfg = RunConfig(name=f"{learner}-reference-comparison", seed=args.seed, device="cpu")
    cfg.data.dataset, cfg.data.root, cfg.data.train_fraction = "cifar10", args.data_root, args.train_fraction
    cfg.data.scenario = args.scenario
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs, cfg.train.milestones = args.epochs, args.milestones
    cfg.learner.name, cfg.learner.two_stage = learner, "lws"
    if learner == "eeil":
        cfg.learner.two_stage_epochs = 1  # eeil_2stage.py's second stage is range(1)
    return resolve_dataset_defaults(cfg)


def _flattening_margin_ranking_loss(original):
    """LUCIR's reference ranks (N, 1) scores against (N,) targets, which the torch of its day
    broadcast to (N, N) rows of equal values (the same mean); torch 2.14 refuses the shapes."""

    def margin_ranking_loss(input1, input2, target, *args, **kwargs):
        return original(input1.reshape(-1), input2.reshape(-1), target.reshape(-1), *args, **kwargs)

    return margin_ranking_loss


class _NoLogger:
    def log_scalar(self, *args, **kwargs) -> None:
        pass


def _loaders(benchmark, batch_size: int, memory_dataset, get_transforms):
    """Per task: the reference's MemoryDataset loaders of our train, held-out and test images."""
    train_transform, test_transform = get_transforms(None, 4, 32, True, (benchmark.mean, benchmark.std), None)
    loaders = {"train": [], "val": [], "test": []}
    for task in range(benchmark.num_tasks):
        for name, split, transform, shuffle in (
            ("train", benchmark.train, train_transform, True),
            ("val", benchmark.val, test_transform, False),
            ("test", benchmark.test, test_transform, False),
        ):
            rows = benchmark.task_indices(split, [task])
            images = split.images[torch.as_tensor(rows)].permute(0, 2, 3, 1).numpy()  # HWC uint8, as PIL wants
            data = {"x": list(images), "y": [int(v) for v in split.labels[rows]]}
            dataset = memory_dataset.MemoryDataset(data, transform, class_indices=list(range(benchmark.num_classes)))
            loaders[name].append(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0))
    return loaders, train_transform


def run_reference(method: str, cfg: RunConfig, benchmark, args) -> list[float]:
    """The reference's approach on our benchmark; the average accuracy after each task (%)."""
    sys.path.insert(0, args.reference)
    if not hasattr(torch.nn.functional.margin_ranking_loss, "__wrapped_for_reference__"):
        torch.nn.functional.margin_ranking_loss = _flattening_margin_ranking_loss(torch.nn.functional.margin_ranking_loss)
        torch.nn.functional.margin_ranking_loss.__wrapped_for_reference__ = True
    memory_dataset = importlib.import_module("datasets.memory_dataset")
    get_transforms = importlib.import_module("datasets.data_loader").get_transforms
    exemplars = importlib.import_module("datasets.exemplars_dataset")
    podnet = method == "podnet"
    network = importlib.import_module("networks.network_podnet" if podnet else "networks.network")
    backbone = getattr(importlib.import_module("networks"), "resnet32_podnet" if podnet else "resnet32")
    Appr = importlib.import_module(f"approach.{method}_2stage").Appr
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    loaders, train_transform = _loaders(benchmark, cfg.train.batch_size, memory_dataset, get_transforms)
    net = network.LLL_Net(backbone(pretrained=False), remove_existing_head=True)
    net.schedule_step = list(cfg.train.milestones)
    memory = exemplars.ExemplarsDataset(train_transform, list(range(benchmark.num_classes)), num_exemplars_per_class=20, exemplar_selection="herding")
    defaults = vars(Appr.extra_parser([])[0])  # the approach's own arguments, as its command line sets them
    appr = Appr(
        net, "cpu", nepochs=cfg.train.epochs, lr=cfg.train.lr, lr_factor=round(1 / cfg.train.lr_decay),
        momentum=cfg.train.momentum, wd=cfg.train.weight_decay, logger=_NoLogger(), exemplars_dataset=memory,
        **defaults,
    )  # fmt: skip
    sizes = [len(c) for c in benchmark.task_classes]
    accuracies = []
    for task, size in enumerate(sizes):
        if podnet:  # main_incremental.py: every head's class count, then the counts PODNet scales by
            net.add_head(sizes[: task + 1])
            appr._task_size, appr._n_classes = size, appr._n_classes + size
        else:
            net.add_head(size)
        appr.train(task, loaders["train"][task], loaders["val"][task])
        task_agnostic = [appr.eval(u, loaders["test"][u])[2] for u in range(task + 1)]
        accuracies.append(100.0 * float(np.mean(task_agnostic)))
        print(f"  reference {method}: phase {task} acc {accuracies[-1]:.2f}%", file=sys.stderr, flush=True)
    return accuracies


def run_ours(cfg: RunConfig, benchmark) -> list[float]:
    accuracies = []
    for result in IncrementalTrainer(cfg, benchmark=benchmark).phases():
        accuracies.append(result.metrics["acc"])
        print(f"  imbcil {cfg.learner.name}: phase {result.phase} acc {accuracies[-1]:.2f}%", file=sys.stderr, flush=True)
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the src/ folder of a Long-Tailed-CIL checkout")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--milestones", type=int, nargs="+", default=[10, 15])
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sides", nargs="+", default=["reference", "imbcil"], choices=["reference", "imbcil"])
    parser.add_argument("--scenario", default="shuffled", choices=["shuffled", "ordered"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first = config(args, "lucir")
    benchmark = build_benchmark(first.data, first.protocol, first.seed)
    print(f"CIFAR-10-LT {args.scenario} LFS-5, seed {args.seed}, {args.epochs} epochs, milestones {args.milestones}, "
          f"train fraction {args.train_fraction}, memory 20 per class (herding)\n")
    print("| row | side | acc per phase % | avg incremental acc % | wall s |\n|---|---|---|---|---|", flush=True)
    for method in args.methods:
        cfg = config(args, method)
        for side in args.sides:
            start = time.perf_counter()
            accuracies = run_reference(method, cfg, benchmark, args) if side == "reference" else run_ours(cfg, benchmark)
            per_phase = ", ".join(f"{a:.1f}" for a in accuracies)
            print(f"| {method}-2stage | {side} | {per_phase} | {np.mean(accuracies):.2f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
