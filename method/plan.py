"""What a run will do, phase by phase, and how long it should take, without training it.

The plan follows the trainer's own rules (which images a phase trains on, how the memory grows
or shrinks, what is scored and ranked after it), so its image counts are the ones a real run
reports as `train_images`. The time estimate multiplies those counts by rates measured on the
run's own device, network, batch size and precision (`measure_rates`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from method.backbones import IncrementalNet
from method.config import RunConfig, resolve_dataset_defaults
from method.data import Benchmark
from method.learners import TaskContext, make_learner
from method.memory import budget_per_class

# Per phase, on top of training and the frozen model's passes: logging, the frozen copy, set-up
# (benchmarks/run_breakdown.py measures about 0.6 s on CPU).
PHASE_OVERHEAD_S = 0.7


@dataclass(frozen=True)
class PhasePlan:
    phase: int
    new_classes: int
    new_images: int
    memory_images: int  # exemplars of the old classes that this phase trains on
    epochs: int
    steps: int
    train_images: int  # images the phase's training sees: epochs x (new + memory)
    scored_images: int  # test and held-out images of the seen tasks, after the phase
    # herding candidates, iCaRL's exemplars and the second stage's frozen-backbone passes
    feature_images: int


@dataclass(frozen=True)
class Rates:
    """Seconds per training step (without and with a teacher) and per scored image."""

    step_s: float
    teacher_step_s: float
    score_s: float
    device: str
    # The steps were timed eagerly although the run captures CUDA graphs (the capture itself is
    # not part of a few timed steps): graphed training is faster than the estimate.
    eager_for_graphs: bool = False


def plan_phases(cfg: RunConfig, benchmark: Benchmark) -> list[PhasePlan]:
    cfg = resolve_dataset_defaults(copy.deepcopy(cfg))  # the epochs a dataset default leaves unset
    learner = make_learner(cfg.learner)
    mem = cfg.memory
    train_labels = np.asarray(benchmark.train.labels)
    kept: dict[int, int] = {}  # class position -> exemplars in memory
    plans, num_seen = [], 0
    for task, classes in enumerate(benchmark.task_classes):
        num_seen += len(classes)
        schedule = cfg.train.for_task(task)
        new_images = int(np.isin(train_labels, classes).sum())
        memory_images = sum(kept.values()) if learner.uses_memory else 0
        seen = new_images + memory_images
        tasks = range(task + 1)
        scored = len(benchmark.task_indices(benchmark.test, tasks)) + len(benchmark.task_indices(benchmark.val, tasks))
        features = 0
        if learner.uses_memory:  # the memory update after the phase (trainer._update_memory)
            per_class = budget_per_class(mem.budget, mem.per_class, mem.total, num_seen)
            if mem.budget == "total":
                kept = {c: min(n, per_class) for c, n in kept.items()}
            for c in classes:
                kept[c] = min(per_class, int(benchmark.train_counts[c]))
            herding = mem.selection == "herding"
            features += new_images if herding else 0
            if learner.nearest_mean:  # iCaRL's means: the new classes' rows come from the herding pass
                features += sum(n for c, n in kept.items() if c not in classes or not herding)
        if cfg.learner.two_stage != "none":  # refit: one pass for its fixed features; lws: every epoch
            features += seen * (cfg.learner.two_stage_epochs if cfg.learner.two_stage == "lws" else 1)
        steps = schedule.epochs * math.ceil(seen / cfg.train.batch_size)
        train_images = schedule.epochs * seen
        finetuning = learner.finetuning_schedule(schedule) if task > 0 else None
        if finetuning is not None:  # EEIL: the memory and as many new images (trainer._balanced_finetuning)
            finetuned = memory_images + min(new_images, memory_images)
            steps += finetuning.epochs * math.ceil(finetuned / cfg.train.batch_size)
            train_images += finetuning.epochs * finetuned
        plans.append(
            PhasePlan(
                phase=task, new_classes=len(classes), new_images=new_images, memory_images=memory_images,
                epochs=schedule.epochs, steps=steps, train_images=train_images, scored_images=scored,
                feature_images=features,
            )
        )  # fmt: skip
    return plans


def measure_rates(cfg: RunConfig, benchmark: Benchmark, device: torch.device, steps: int = 6, warmup: int = 2) -> Rates:
    """Time a few real training steps of the run's network, learner, batch and precision, and a few scoring batches.

    The plain steps are the first task's; the teacher steps the second task's (heads for two
    tasks, the first task's frozen model as the teacher). Without distillation they are alike.
    """
    from method.trainer import IncrementalTrainer, autograd_step, frozen_teacher, training_step

    trainer = IncrementalTrainer(cfg, benchmark=benchmark, device=device)
    cfg = trainer.cfg
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    learner = make_learner(cfg.learner)
    model = IncrementalNet(cfg.model.backbone, learner.head)
    learner.shape_backbone(model.backbone)
    model.to(device)
    step = autograd_step if learner.needs_features else training_step

    def begin(task: int) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        """Heads up to `task`, the learner told so; the task's training images and a fresh optimiser."""
        model.add_head(trainer.task_sizes[task])
        num_old, num_seen = sum(trainer.task_sizes[:task]), sum(trainer.task_sizes[: task + 1])
        original = torch.as_tensor(benchmark.train_counts[:num_seen], dtype=torch.long, device=device)
        counts = original.clone()
        counts[:num_old] = counts[:num_old].clamp(max=cfg.memory.per_class)  # old classes: as many as exemplars
        learner.begin_task(
            TaskContext(
                task=task, num_old=num_old, num_seen=num_seen, class_counts=counts, original_counts=original,
                n_seen=int(original[:num_old].sum()), n_new=int(original[num_old:].sum()),
                head_sizes=tuple(trainer.task_sizes[: task + 1]),
            )
        )  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
        return torch.as_tensor(benchmark.task_indices(benchmark.train, range(task + 1))), optimizer

    def step_seconds(indices: torch.Tensor, optimizer, old_model) -> float:
        model.train()
        full_only = len(indices) >= cfg.train.batch_size
        done, start = 0, 0.0
        while done < warmup + steps:
            for x, y in trainer.train_images.train_batches(indices, cfg.train.batch_size, generator):
                if full_only and len(x) < cfg.train.batch_size:
                    continue  # the short last batch would flatter the rate
                if done == warmup:
                    trainer._synchronise()
                    start = time.perf_counter()
                step(model, old_model, learner, x, y, optimizer, trainer._autocast)
                done += 1
                if done == warmup + steps:
                    break
        trainer._synchronise()
        return (time.perf_counter() - start) / steps

    plain = step_seconds(*begin(0), None)
    task, num_seen = 0, trainer.task_sizes[0]
    with_teacher = plain
    if len(trainer.task_sizes) > 1:
        teacher = frozen_teacher(model, fold=not learner.needs_maps)
        task, num_seen = 1, sum(trainer.task_sizes[:2])
        indices, optimizer = begin(1)
        with_teacher = step_seconds(indices, optimizer, teacher if learner.distills else None)
    frozen = frozen_teacher(model)
    sample = max(2048, trainer.eval_batch_size * (warmup + steps))  # a second's worth: small batches vary
    test = torch.as_tensor(benchmark.task_indices(benchmark.test, range(task + 1)))[:sample]
    with torch.no_grad():
        batches = list(trainer.test_images.eval_batches(test, trainer.eval_batch_size))
        for x, _ in batches[:warmup]:
            trainer._scores(frozen, x, num_seen, None)
        trainer._synchronise()
        start = time.perf_counter()
        scored = 0
        for x, _ in batches[warmup:] or batches:
            trainer._scores(frozen, x, num_seen, None)
            scored += len(x)
        trainer._synchronise()
    return Rates(plain, with_teacher, (time.perf_counter() - start) / max(scored, 1), str(device), cfg.train.cuda_graph)


def training_seconds(plan: PhasePlan, rates: Rates) -> float:
    """A phase's training steps at the measured rate: the first task has no teacher."""
    return plan.steps * (rates.step_s if plan.phase == 0 else rates.teacher_step_s)


def estimate_seconds(plans: list[PhasePlan], rates: Rates) -> float:
    """The phases' training, scoring and feature passes at the measured rates, with a fixed overhead each."""
    return sum(
        training_seconds(plan, rates) + (plan.scored_images + plan.feature_images) * rates.score_s + PHASE_OVERHEAD_S
        for plan in plans
    )
