"""Scoring throughput of a phase's frozen model per evaluation batch, and whether outputs change.

    PYTHONPATH=. python benchmarks/eval_speed.py --data-root ../shared/data
    PYTHONPATH=. python benchmarks/eval_speed.py --data-root data_cache --device cuda --batches 1024 4096 256

Scores the CIFAR-10 test images (10,000) through the trainer's own path (`_scores` on
`eval_batches`, the BatchNorm-folded copy of the model) at each batch size, after one warm-up
pass, and prints images/s, the speed-up over the first size, and whether the scores are bitwise
equal to the first size's, with the largest difference. Then the same for the herding features
of one class, and whether herding picks the same exemplars. The model is ResNet-32 with every
head of the benchmark and BatchNorm statistics from a few training-mode passes: a trained
model's weights cost the same. Imports only torch, numpy, pyarrow and `method`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from method.backbones import IncrementalNet
from method.config import RunConfig
from method.memory import herding_order
from method.trainer import IncrementalTrainer, fastest_eval_batch, frozen_teacher, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 256, 128, 64, 32])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = RunConfig()
    cfg.data.dataset, cfg.data.scenario, cfg.data.root = "cifar10", "shuffled", args.data_root
    cfg.protocol.first_task_classes, cfg.protocol.incremental_tasks = 2, 4
    trainer = IncrementalTrainer(cfg, device=device)
    torch.manual_seed(0)
    model = IncrementalNet(trainer.cfg.model.backbone).to(device)
    for size in trainer.task_sizes:
        model.add_head(size)
    model.train()
    with torch.no_grad():  # BatchNorm statistics of real images, as after training
        for x, _ in trainer.test_images.eval_batches(torch.arange(512), 128):
            model(x)
    trainer.model, trainer.old_model = model, frozen_teacher(model)
    num_seen = sum(trainer.task_sizes)
    test = torch.arange(len(trainer.benchmark.test))
    print(f"device {device}, {torch.get_num_threads()} threads; the trainer's default batch here: {fastest_eval_batch(device)}")

    def scores(batch: int) -> torch.Tensor:
        trainer.eval_batch_size = batch
        with torch.no_grad():
            return torch.cat([trainer._scores(trainer.old_model, x, num_seen, None) for x, _ in trainer.test_images.eval_batches(test, batch)])

    def features(batch: int, indices: torch.Tensor) -> torch.Tensor:
        trainer.eval_batch_size = batch
        return trainer._features(indices, trainer.old_model)[0]

    model.eval()
    with torch.no_grad():  # the plain eval-mode model, unfolded, in one pass per 1024
        plain = torch.cat([model.logits(model.backbone(x)) for x, _ in trainer.test_images.eval_batches(test, 1024)])
    print("| pass | batch | images/s | speed-up | bitwise equal to first | max abs diff | argmax equal to plain eval model |")
    print("|---|---|---|---|---|---|---|")
    first_rate, first = None, None
    for batch in args.batches:
        rate, out = timed(lambda: scores(batch), len(test), device, args.repeats)
        first_rate, first = first_rate or rate, first if first is not None else out
        same_as_plain = bool(torch.equal(out.argmax(1), plain.argmax(1)))
        print(f"| test scores | {batch} | {rate:.0f} | {rate / first_rate:.2f}x | {torch.equal(out, first)} | {(out - first).abs().max():.2e} | {same_as_plain} |", flush=True)
    label = trainer.benchmark.task_classes[0][0]
    candidates = torch.as_tensor(np.flatnonzero(trainer.benchmark.train.labels == label))
    first_rate, first = None, None
    for batch in args.batches:
        rate, out = timed(lambda: features(batch, candidates), len(candidates), device, args.repeats)
        first_rate, first = first_rate or rate, first if first is not None else out
        picks = torch.equal(herding_order(out, 20), herding_order(first, 20))
        print(f"| herding features ({len(candidates)} images) | {batch} | {rate:.0f} | {rate / first_rate:.2f}x | {torch.equal(out, first)} | {(out - first).abs().max():.2e} | same 20 exemplars: {picks} |", flush=True)


def timed(run, images: int, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    out = run()  # warm-up: oneDNN's kernels for this shape
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images * repeats / (time.perf_counter() - start), out


if __name__ == "__main__":
    main()
