"""Training speed of a real trial against the bare network step, in one process.

    PYTHONPATH=. python benchmarks/speed.py --data-root ../shared/data            # CPU, short
    PYTHONPATH=. python benchmarks/speed.py --data-root data_cache --device cuda --epochs 20 \
        --modes fp32 bf16 bf16+graph --concurrent 1 4 8

Prints, per mode: the bare ResNet-32 step rate (forward, backward, SGD on inputs already on the
device), the trial's wall time and effective training images/s (from the phase results), their
ratio, and the per-learner epoch rate of finetune / replay / dgr with the cost of DGR's
reweighting over a plain cross-entropy step. Imports only torch, numpy, pyarrow and `method`,
so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from method.backbones import IncrementalNet
from method.config import RunConfig, resolve_dataset_defaults
from method.data import build_benchmark, load_raw
from method.graphs import graph_training_forward
from method.trainer import IncrementalTrainer, resolve_device


def bare_step_rate(device: torch.device, batch_size: int, bf16: bool, graph: bool, steps: int, warmup: int = 5) -> float:
    """Forward, backward and SGD of the plain network on one fixed batch already on the device."""
    torch.manual_seed(0)
    model = IncrementalNet("resnet32").to(device)
    model.add_head(10)
    # The trainer's own layout choice (trainer.py): channels_last on CPU and with bf16.
    memory_format = torch.channels_last if (bf16 or device.type == "cpu") else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graph)

    forward = graph_training_forward(model, x, autocast) if graph else model
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast():
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def parse_mode(mode: str) -> tuple[str, bool]:
    """'bf16+graph' -> ('bf16', True): the precision and whether the step is CUDA-graphed."""
    precision, _, graph = mode.partition("+")
    return precision, graph == "graph"


def trial_config(args, learner: str, mode: str, seed: int = 0) -> RunConfig:
    cfg = RunConfig(name=f"speed-{learner}", seed=seed, device=args.device)
    cfg.data.dataset, cfg.data.root, cfg.data.train_fraction = "cifar10", args.data_root, args.train_fraction
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    cfg.train.epochs = args.epochs
    cfg.train.milestones = sorted({max(1, args.epochs // 2), max(1, (3 * args.epochs) // 4)})  # 2 epochs: [1]
    cfg.train.precision, cfg.train.cuda_graph = parse_mode(mode)
    cfg.learner.name = learner
    cfg.memory.budget = "none" if learner == "finetune" else "per_class"
    return resolve_dataset_defaults(cfg)


def run_trial(cfg: RunConfig, benchmark) -> dict[str, float]:
    start = time.perf_counter()
    results = list(IncrementalTrainer(cfg, benchmark=benchmark).phases())
    wall = time.perf_counter() - start
    train_seconds = sum(r.metrics["train_seconds"] for r in results)
    images = sum(r.metrics["train_images_per_s"] * r.metrics["train_seconds"] for r in results)
    return {
        "wall_s": wall,
        "train_s": train_seconds,
        "images_per_s": images / train_seconds,
        "effective_images_per_s": images / wall,
        "avg_incremental_acc": results[-1].metrics["avg_incremental_acc"],
    }


def _trial_worker(args, mode: str, queue) -> None:
    cfg = trial_config(args, "dgr", mode)
    benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed)
    queue.put(run_trial(cfg, benchmark)["wall_s"])


def concurrent_trials(args, mode: str, k: int) -> tuple[float, float, list[float]]:
    """K DGR trials in K processes on the same device: (wall seconds, trials per minute, each trial's own wall seconds)."""
    import queue as queues

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    start = time.perf_counter()
    workers = [context.Process(target=_trial_worker, args=(args, mode, queue)) for _ in range(k)]
    for worker in workers:
        worker.start()
    trial_walls = []
    while len(trial_walls) < k and (any(w.is_alive() for w in workers) or not queue.empty()):
        try:  # read while they run: a worker cannot exit while its result sits unread in the pipe
            trial_walls.append(queue.get(timeout=1.0))
        except queues.Empty:
            pass
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - start
    return wall, 60.0 * len(trial_walls) / wall, trial_walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-fraction", type=float, default=0.25)
    parser.add_argument("--modes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp32+graph", "bf16+graph"])
    parser.add_argument("--learners", nargs="+", default=["finetune", "replay", "dgr"])
    parser.add_argument("--bare-steps", type=int, default=30)
    parser.add_argument("--concurrent", type=int, nargs="*", default=[],
                        help="also run K DGR trials at once on the device, for each K given (e.g. 1 4 8)")
    parser.add_argument("--accuracy-seeds", type=int, nargs="*", default=[],
                        help="also run DGR over these seeds in every mode: mean and spread of avg inc acc (e.g. 0 1 2)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    graphed = [mode for mode in args.modes if parse_mode(mode)[1]]
    if graphed and device.type != "cuda":
        parser.error(f"--modes {' '.join(graphed)}: CUDA graphs need a CUDA device; this run is on {device.type}")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), torch {torch.__version__}")
    raw_cfg = trial_config(args, "dgr", "fp32")
    raw = load_raw(raw_cfg.data)
    benchmark = build_benchmark(raw_cfg.data, raw_cfg.protocol, raw_cfg.seed, raw=raw)
    print(f"CIFAR-10-LT LFS-5, {args.epochs} epochs per task, {len(benchmark.train)} training images (fraction {args.train_fraction})")
    for mode in args.modes:
        precision, graph = parse_mode(mode)
        bare = bare_step_rate(device, 128, precision == "bf16", graph, args.bare_steps)
        print(f"\n[{mode}] bare ResNet-32 step, batch 128: {bare:,.0f} images/s")
        rates = {}
        for learner in args.learners:
            m = run_trial(trial_config(args, learner, mode), benchmark)
            rates[learner] = m["images_per_s"]
            print(
                f"  {learner:9s} wall {m['wall_s']:7.1f} s  train {m['train_s']:7.1f} s  "
                f"{m['images_per_s']:8,.0f} img/s in training ({m['images_per_s'] / bare:5.1%} of bare)  "
                f"{m['effective_images_per_s']:8,.0f} img/s over the wall time ({m['effective_images_per_s'] / bare:5.1%})  "
                f"avg inc acc {m['avg_incremental_acc']:.2f}%"
            )
        if "dgr" in rates and "replay" in rates:
            print(f"  DGR step cost over a plain CE replay step: {rates['replay'] / rates['dgr'] - 1:+.1%} time per image")
        for k in args.concurrent:
            wall, per_minute, trial_walls = concurrent_trials(args, mode, k)
            each = f"each {np.mean(trial_walls):.1f} s on average" if trial_walls else "none finished"
            print(f"  {k} DGR trials at once: {wall:.1f} s wall, {len(trial_walls)}/{k} finished ({each}), {per_minute:.1f} trials per minute")
        if args.accuracy_seeds:
            accuracies = []
            for seed in args.accuracy_seeds:
                cfg = trial_config(args, "dgr", mode, seed)
                accuracies.append(run_trial(cfg, build_benchmark(cfg.data, cfg.protocol, seed, raw=raw))["avg_incremental_acc"])
            spread = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else float("nan")
            listed = ", ".join(f"{a:.2f}" for a in accuracies)
            print(f"  DGR avg inc acc over seeds {args.accuracy_seeds}: {listed}; mean {np.mean(accuracies):.2f} +- {spread:.2f}")


if __name__ == "__main__":
    main()
