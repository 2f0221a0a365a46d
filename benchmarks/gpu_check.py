"""The first thing to run on a lent GPU: every CUDA path once on a small slice, its agreement with eager fp32, and its speed.

    PYTHONPATH=. python benchmarks/gpu_check.py --data-root data_cache
    PYTHONPATH=. python benchmarks/gpu_check.py --data-root data_cache --concurrent 1 4 8 --steps 40

Needs torch, numpy and pyarrow only (the GPU machine's bare Python) and the CIFAR-10 Parquet file
under --data-root; prints the card's name first and takes a few minutes (well under 10) on an
H100. It checks, in this order:

  1. the DGR training step at task 1 (ResNet-32, batch 128, a teacher distilling): eager fp32,
     eager bf16, graphed fp32 and graphed bf16 (the backbone's forward and backward and the
     teacher's forward as CUDA graphs). Each trains the same batches from the same start; its
     parameters after --steps steps are set against eager fp32's (largest difference relative
     to the parameter's scale), with images/s of each;
  2. a phase stored on the GPU and reused: a tiny two-phase run with a phase store, then the
     same run taking both phases from it, whose metrics must be identical; and the frozen
     model's scoring at batch 1024 against batch 64 (share of equal argmaxes, largest score
     difference);
  3. K trials packed on the card (--concurrent): K processes each running the tiny run, with
     trials per minute.
Exits 1 when a check disagrees beyond its tolerance, 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from method.backbones import IncrementalNet
from method.config import LearnerConfig, RunConfig, resolve_dataset_defaults
from method.data import build_benchmark
from method.graphs import graph_inference, graph_training_forward
from method.learners import TaskContext, make_learner
from method.trainer import IncrementalTrainer, frozen_teacher, training_step
from pipeline.phase_store import FolderPhaseStore

BATCH = 128
# bf16 rounds each step's activations; after a few dozen steps its parameters sit about 1e-2
# from fp32's, relative to their scale. Graphs replay the same kernels: fp32 agrees to 1e-4.
TOLERANCE = {"eager bf16": 5e-2, "graphed fp32": 1e-3, "graphed bf16": 5e-2}


def task_one(device: torch.device) -> TaskContext:
    """Task 1 of a 3 + 2 split: exemplars of 3 old classes and two new ones."""
    original = torch.tensor([500, 200, 50, 400, 80], device=device)
    counts = torch.tensor([20, 20, 20, 400, 80], device=device)
    return TaskContext(task=1, num_old=3, num_seen=5, class_counts=counts, original_counts=original, n_seen=750, n_new=480)


def train_steps(mode: str, device: torch.device, steps: int) -> tuple[dict[str, torch.Tensor], float]:
    """`steps` DGR steps at task 1 from a fixed start on fixed batches: (final parameters, images/s)."""
    bf16, graphed = "bf16" in mode, mode.startswith("graphed")
    torch.manual_seed(0)
    model = IncrementalNet("resnet32").to(device)
    model.add_head(3)
    teacher = frozen_teacher(model)
    model.add_head(2)
    learner = make_learner(LearnerConfig(name="dgr"))
    learner.begin_task(task_one(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        (torch.randn(BATCH, 3, 32, 32, device=device, generator=generator), torch.randint(0, 5, (BATCH,), device=device, generator=generator))
        for _ in range(steps)
    ]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphed)

    model.train()
    backbone, old = model.backbone, teacher
    if graphed:
        backbone = graph_training_forward(model.backbone, batches[0][0], autocast)
        old = graph_inference(teacher, batches[0][0], autocast)
    training_step(model, old, learner, *batches[0], optimizer, autocast, backbone=backbone)  # warm-up, kept in the result
    torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in batches[1:]:
        training_step(model, old, learner, x, y, optimizer, autocast, backbone=backbone)
    torch.cuda.synchronize()
    rate = BATCH * (steps - 1) / (time.perf_counter() - start)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}, rate


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest |a - b| over a parameter, relative to that parameter's largest magnitude."""
    worst, name = 0.0, ""
    for key, value in b.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        scale = value.abs().max().item() or 1.0
        difference = (a[key] - value).abs().max().item() / scale
        if difference > worst or math.isnan(difference):
            worst, name = difference, key
    return worst, name


def tiny_config(data_root: str, name: str) -> RunConfig:
    cfg = RunConfig(name=name, device="cuda")
    cfg.data.dataset, cfg.data.root, cfg.data.train_fraction, cfg.data.test_fraction = "cifar10", data_root, 0.05, 0.1
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 1
    cfg.train.epochs, cfg.train.milestones = 2, [1]
    return resolve_dataset_defaults(cfg)


def check_scoring(trainer: IncrementalTrainer, device: torch.device) -> tuple[float, float]:
    """The frozen model's scores at batch 1024 against batch 64 on the test images: (equal argmax share, largest score difference)."""
    net = trainer.old_model
    indices = torch.arange(len(trainer.benchmark.test))
    scores = {}
    for batch in (64, 1024):
        parts = [trainer._scores(net, x, sum(net.head_sizes), None) for x, _ in trainer.test_images.eval_batches(indices, batch)]
        scores[batch] = torch.cat(parts)
    same = (scores[64].argmax(1) == scores[1024].argmax(1)).float().mean().item()
    return same, (scores[64] - scores[1024]).abs().max().item()


def packed_trials(data_root: str, k: int) -> tuple[float, int]:
    """K processes, each the tiny run, on the one card: (wall seconds, trials that finished)."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, '.'); from benchmarks.gpu_check import tiny_config; "
        "from method.data import build_benchmark; from method.trainer import IncrementalTrainer; "
        f"cfg = tiny_config({data_root!r}, 'packed'); "
        "list(IncrementalTrainer(cfg, benchmark=build_benchmark(cfg.data, cfg.protocol, cfg.seed)).phases())"
    )
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(k)]
    finished = sum(p.wait() == 0 for p in processes)
    return time.perf_counter() - start, finished


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="a folder holding cifar10-jpeg.parquet")
    parser.add_argument("--steps", type=int, default=30, help="DGR steps per mode in check 1 (default 30)")
    parser.add_argument("--concurrent", type=int, nargs="*", default=[1, 4], help="K for check 4 (default 1 4)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device: this check is for a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    failures = []

    print(f"\n1. DGR step at task 1, batch {BATCH}, {args.steps} steps from the same start")
    reference, rate = train_steps("eager fp32", device, args.steps)
    print(f"  eager fp32     {rate:9,.0f} images/s  (the reference)")
    for mode, tolerance in TOLERANCE.items():
        params, rate = train_steps(mode, device, args.steps)
        difference, where = relative_difference(params, reference)
        verdict = "ok" if difference <= tolerance else f"DIFFERS (tolerance {tolerance:g})"
        print(f"  {mode:14s} {rate:9,.0f} images/s  largest relative difference {difference:.2e} ({where}) {verdict}")
        if difference > tolerance:
            failures.append(mode)

    print("\n2. a phase stored on the GPU and reused, and the frozen model's scoring")
    with tempfile.TemporaryDirectory(prefix="imbcil-gpu-check-") as folder:
        cfg = tiny_config(args.data_root, "stored")
        benchmark = build_benchmark(cfg.data, cfg.protocol, cfg.seed)
        trained = IncrementalTrainer(cfg, benchmark=benchmark, phase_store=FolderPhaseStore(Path(folder), "first"))
        first = list(trained.phases())
        same, score_difference = check_scoring(trained, device)
        print(f"  scoring at batch 1024 vs 64: {same:.2%} equal argmax, largest score difference {score_difference:.2e}")
        if same < 0.999:
            failures.append("scoring at batch 1024")
        reused = list(IncrementalTrainer(copy.deepcopy(cfg), benchmark=benchmark, phase_store=FolderPhaseStore(Path(folder), "second")).phases())
        taken = [r.reused_from for r in reused]
        unshared = {"train_seconds", "phase_seconds", "train_images_per_s", "phase_reused"}
        equal = all(
            a.metrics[k] == b.metrics[k] or (math.isnan(a.metrics[k]) and math.isnan(b.metrics[k]))
            for a, b in zip(first, reused) for k in a.metrics.keys() - unshared
        )  # fmt: skip
        print(f"  phases taken from the store: {taken}; metrics identical to the run that stored them: {equal}")
        if not equal or None in taken:
            failures.append("stored phase")

    print("\n3. trials packed on the card (the tiny run: 2 phases, 2 epochs, 5% of the images)")
    for k in args.concurrent:
        wall, finished = packed_trials(args.data_root, k)
        print(f"  {k} at once: {wall:.1f} s wall, {finished}/{k} finished, {60 * finished / wall:.1f} trials per minute")
        if finished < k:
            failures.append(f"{k} packed trials")

    print(f"\n{'all checks agree' if not failures else 'DISAGREE: ' + ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
