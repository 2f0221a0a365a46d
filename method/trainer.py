"""The one training loop every learner shares, run task after task (method.md §2-4).

`IncrementalTrainer(cfg).phases()` yields a `PhaseResult` after each task. Its `state` restarts
the run at the next task (`phases(resume_state=...)`) with the same results as an
uninterrupted run on the same device, because it carries every RNG state along with the model
and the memory.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse as fuse_conv_bn

from method.backbones import IncrementalNet
from method.batches import image_source
from method.config import RunConfig, TaskSchedule, resolve_dataset_defaults
from method.data import Benchmark, build_benchmark
from method.events import BatchDone, EpochDone, PhaseDone, PhaseStarted, ProgressCallback
from method.graphs import graph_inference, graph_training_forward
from method.learners import TaskContext, make_learner
from method.memory import ExemplarMemory, budget_per_class, herding_order, random_order
from method.phases import PhaseStore, StoredPhase, phase_keys
from method.two_stage import learn_weight_scaling
from method.metrics import (
    accuracy_rows,
    average_accuracy,
    class_balanced_task_accuracy,
    average_incremental_accuracy,
    class_weighted_accuracy,
    forgetting,
    mean_of_present,
    new_matrix,
    shot_accuracies,
    shot_groups,
    validation_accuracy,
    validation_average_incremental_accuracy,
    validation_class_weighted_accuracy,
)
from method.results import PhaseResult

STATE_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot go on."""


class _NoSlot:
    """A run without a phase store: nothing stored, nothing to save."""

    entry = None
    wants_entry = False

    def save(self, phase: StoredPhase) -> None:  # pragma: no cover - wants_entry is False
        raise AssertionError("a run without a phase store saves no phase")


_NO_SLOT = _NoSlot()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def training_step(
    model: IncrementalNet,
    old_model: Optional[Callable[[torch.Tensor], torch.Tensor]],
    learner,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], Any] = nullcontext,
    backbone: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """One SGD step of any learner; returns the loss as a device tensor, with no host sync.

    The heads' gradient is assembled from the per-term logit gradients (reweighting.py) and the
    backbone receives the plain gradient of the summed loss in a single backward pass.
    `backbone` and `old_model` may be CUDA-graphed stand-ins for the model's own (graphs.py).
    """
    with autocast():
        features = (backbone or model.backbone)(x)
    head_features = features.detach().float()  # (B, D)
    weight, bias = model.head_weight, model.head_bias
    logits = F.linear(head_features, weight.detach(), bias.detach()).requires_grad_()  # (B, C)
    old_logits = None
    if learner.distills and old_model is not None:
        with torch.no_grad(), autocast():
            old_logits = old_model(x)[:, : learner.ctx.num_old].float()
    terms = learner.loss_terms(logits, old_logits, y)
    names = list(terms)
    logit_grads = {
        name: torch.autograd.grad(terms[name], logits, retain_graph=i < len(names) - 1)[0]
        for i, name in enumerate(names)
    }
    head_grad = learner.head_logit_grad(logit_grads, head_features)
    optimizer.zero_grad(set_to_none=True)
    weight.grad = head_grad.t() @ head_features
    bias.grad = head_grad.sum(dim=0)
    backbone_grad = sum(logit_grads.values()) @ weight.detach()  # (B, D) = dL/dfeatures
    features.backward(backbone_grad.to(features.dtype))
    # Weight decay is applied inside the step, after the reweighting (method.md §2).
    optimizer.step()
    return sum(term.detach() for term in terms.values())


def autograd_step(
    model: IncrementalNet,
    old_model: Optional[IncrementalNet],
    learner,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], Any] = nullcontext,
) -> torch.Tensor:
    """One plain SGD step of a feature-level learner (LUCIR, PODNet): backward of the summed terms.

    With `frozen_old_heads`, the old classes' rows are put back after the step: the reference
    keeps them out of its optimiser, and SGD's weight decay and momentum would move rows whose
    gradient is zero.
    """
    with autocast():
        outputs = model.outputs(x, maps=learner.needs_maps)
    old_outputs = None
    if learner.distills and old_model is not None:
        with torch.no_grad(), autocast():
            old_outputs = old_model.outputs(x, maps=learner.needs_maps)
    terms = learner.feature_loss_terms(outputs, old_outputs, y)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    old_rows = model.head_rows(learner.ctx.num_old)
    frozen = model.head_weight[: old_rows.start].detach().clone() if learner.frozen_old_heads else None
    optimizer.step()
    if frozen is not None and len(frozen):
        with torch.no_grad():
            model.head_weight[: old_rows.start] = frozen
    return loss.detach()


def fastest_eval_batch(device: torch.device) -> int:
    """The batch at which a frozen model scores fastest on `device`, with the same outputs.

    On CPU, oneDNN's fp32 convolutions give each image the same result at any batch size, and
    small batches stay in cache: ResNet-32 scores about 1.7x faster at 64 than at 1024 on two
    cores (benchmarks/eval_speed.py). A GPU wants large batches.
    """
    return 1024 if device.type == "cuda" else 64


def frozen_teacher(model: IncrementalNet, fold: bool = True) -> IncrementalNet:
    """A frozen, eval-mode copy of `model`, with each BatchNorm of its backbone folded.

    It evaluates the phase just trained and distils into the next one. Folding a BatchNorm into
    the convolution before it is exact up to float rounding and makes the forward, which every
    distilling step pays, about a quarter cheaper on CPU. A backbone that torch.fx cannot trace
    is kept unfolded, and so is one whose stage maps a learner distils (`fold=False`): the
    folded copy is a traced graph of `forward` alone.
    """
    frozen = copy.deepcopy(model).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    if not fold:
        return frozen
    try:
        frozen.backbone = fuse_conv_bn(frozen.backbone)
    except Exception:  # noqa: BLE001 -- whatever stops the tracer, the plain copy still works
        pass
    return frozen


def refit_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-stage classifier pass: SGD on class-balanced draws of fixed features, from (weight, bias).

    It is a logistic regression, solved on standardised features and folded back into the heads
    exactly (logits = W (x - mu) / s + b = (W / s) x + (b - W mu / s)), so the result does not
    depend on the scale of the features. Eval-mode features can be of any scale -- a backbone
    whose BatchNorm statistics come from a few batches gives features of 1e8 -- and plain SGD at
    a fixed learning rate on those blows the heads up, and the next phase's training with them.
    Class-balanced: each draw picks a class uniformly among those present, then an image of it.
    """
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp_min(1e-6)
    standardised = (features - mean) / scale
    counts = torch.bincount(labels.cpu(), minlength=weight.shape[0]).clamp_min(1)
    sample_weights = (1.0 / counts[labels.cpu()]).to(torch.float64)
    with torch.no_grad():  # the current heads in standardised coordinates: the warm start
        w = (weight * scale).requires_grad_()
        b = (bias + weight @ mean).requires_grad_()
    optimizer = torch.optim.SGD([w, b], lr=lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.multinomial(sample_weights, len(labels), replacement=True, generator=generator).to(features.device)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(F.linear(standardised[batch], w, b), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        folded = w / scale
        return folded, b - folded @ mean


class IncrementalTrainer:
    def __init__(
        self,
        cfg: RunConfig,
        benchmark: Optional[Benchmark] = None,
        progress: Optional[ProgressCallback] = None,
        device: Optional[torch.device] = None,
        phase_store: Optional[PhaseStore] = None,
    ) -> None:
        # A copy: the caller's config is never changed (an unresolved one, from a test, is resolved here).
        self.cfg = resolve_dataset_defaults(copy.deepcopy(cfg))
        cfg = self.cfg
        self.device = device or resolve_device(cfg.device)
        self.benchmark = benchmark or build_benchmark(cfg.data, cfg.protocol, cfg.seed)
        self.progress = progress or (lambda event: None)
        self.learner = make_learner(cfg.learner)
        # Phases that another run trained with the same key are taken from the store, not retrained.
        self.phase_store = phase_store
        self.phase_keys = phase_keys(cfg, self.benchmark, self.device) if phase_store is not None else None
        self._graphed_model: Optional[IncrementalNet] = None  # the model whose backbone is captured
        on_cuda = self.device.type == "cuda"
        if cfg.train.cuda_graph and not on_cuda:
            raise ValueError(f"train.cuda_graph needs a CUDA device; this run is on {self.device.type}")
        # bf16 autocast on CUDA, and on CPUs with AMX / AVX512-BF16, where oneDNN runs it
        # about 1.8x faster than fp32 (a step) and 3x (the teacher's forward).
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
        # channels_last where measured faster: oneDNN's CPU convolutions (about 20% a step on
        # ResNet-32) and bf16 on CUDA.
        channels_last = not on_cuda or self.autocast_dtype is not None
        self.eval_batch_size = cfg.train.eval_batch_size or fastest_eval_batch(self.device)
        workers = cfg.data.num_workers
        self.train_images = image_source(self.benchmark.train, self.benchmark, self.device, workers, channels_last)
        self.test_images = image_source(self.benchmark.test, self.benchmark, self.device, workers, channels_last)
        # Held-out images score every phase (selection) and, if asked, every epoch (a print).
        self.val_images = image_source(self.benchmark.val, self.benchmark, self.device, workers, channels_last)
        self.train_labels = torch.as_tensor(self.benchmark.train.labels)
        self.test_labels = torch.as_tensor(self.benchmark.test.labels)
        self.val_labels = torch.as_tensor(self.benchmark.val.labels)
        self.task_sizes = [len(c) for c in self.benchmark.task_classes]
        self.task_of_class = torch.as_tensor(
            np.repeat(np.arange(len(self.task_sizes)), self.task_sizes), dtype=torch.long
        )

    # ------------------------------------------------------------------ run and state

    def phases(self, resume_state: Optional[dict[str, Any]] = None) -> Iterator[PhaseResult]:
        start = self._restore(resume_state) if resume_state else self._initialise()
        for task in range(start, self.benchmark.num_tasks):
            yield self._run_phase(task)

    def _initialise(self) -> int:
        torch.manual_seed(self.cfg.seed)  # model and head initialisation
        self.generator = torch.Generator().manual_seed(self.cfg.seed)  # batches, augmentation, sampling
        lws = self.cfg.learner.two_stage == "lws"
        self.model = IncrementalNet(self.cfg.model.backbone, self.learner.head, class_scaling=lws)
        self.learner.shape_backbone(self.model.backbone)
        self.model.to(self.device)
        self.memory = ExemplarMemory()
        # The frozen model of the last finished phase: it evaluates that phase, teaches the next.
        self.old_model: Optional[IncrementalNet] = None
        self.acc_matrix = new_matrix(self.benchmark.num_tasks)
        self.task_aware_matrix = new_matrix(self.benchmark.num_tasks)
        self.val_matrix = new_matrix(self.benchmark.num_tasks)
        return 0

    def _state(self, task: int) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "phase": task,
            "class_order": list(self.benchmark.class_order),
            "task_sizes": list(self.task_sizes),
            "head_sizes": list(self.model.head_sizes),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "memory": self.memory.state_dict(),
            "acc_matrix": self.acc_matrix.copy(),
            "task_aware_matrix": self.task_aware_matrix.copy(),
            "val_matrix": self.val_matrix.copy(),
            **self._rng_states(),
        }

    def _rng_states(self) -> dict[str, Any]:
        """Every random state the next phase draws from: a checkpoint's and a stored phase's."""
        return {
            "torch_rng": torch.get_rng_state(),
            # The run's own device alone: a process that restores it may see fewer GPUs.
            "cuda_rng": [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else None,
            "generator": self.generator.get_state(),
        }

    def _set_rng_states(self, torch_rng: torch.Tensor, cuda_rng: Optional[list], generator: torch.Tensor) -> None:
        torch.set_rng_state(torch_rng)
        if cuda_rng and self.device.type == "cuda":
            # The saving run's device comes first (states of before listed every visible device).
            torch.cuda.set_rng_state(cuda_rng[0], self.device)
        self.generator.set_state(generator)

    def _frozen(self, model: IncrementalNet) -> IncrementalNet:
        return frozen_teacher(model, fold=not self.learner.needs_maps)

    def _restore(self, state: dict[str, Any]) -> int:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("checkpoint was written by an incompatible version of imbcil")
        if state["class_order"] != list(self.benchmark.class_order) or state["task_sizes"] != self.task_sizes:
            raise ValueError("checkpoint belongs to another dataset order or task split than this config")
        self._initialise()
        self.model.set_head_sizes(state["head_sizes"])
        self.model.load_state_dict(state["model"])
        self.model.to(self.device)
        self.memory.load_state_dict(state["memory"])
        self.acc_matrix = np.array(state["acc_matrix"], dtype=float)
        self.task_aware_matrix = np.array(state["task_aware_matrix"], dtype=float)
        if state.get("val_matrix") is not None:  # absent from checkpoints of before validation metrics
            self.val_matrix = np.array(state["val_matrix"], dtype=float)
        self._set_rng_states(state["torch_rng"], state.get("cuda_rng"), state["generator"])
        self.old_model = self._frozen(self.model)
        return int(state["phase"]) + 1

    # ------------------------------------------------------------------ one phase

    def _run_phase(self, task: int) -> PhaseResult:
        phase_start = time.perf_counter()
        bench, cfg = self.benchmark, self.cfg
        num_old = sum(self.task_sizes[:task])
        num_seen = num_old + self.task_sizes[task]
        self.progress(PhaseStarted(task, bench.num_tasks))
        self.model.add_head(self.task_sizes[task])

        new_indices = torch.as_tensor(bench.task_indices(bench.train, [task]))
        memory_indices = self.memory.indices() if self.learner.uses_memory else torch.empty(0, dtype=torch.long)
        train_indices = torch.cat([memory_indices, new_indices])
        ctx = self._task_context(task, num_old, num_seen, memory_indices, len(new_indices))
        self.learner.begin_task(ctx)

        with self._phase_slot(task) as slot:
            stored = slot.entry
            if stored is not None:
                self._take_trained(stored)
                loss, images_seen, train_seconds = stored.loss, stored.images_seen, stored.train_seconds
            else:
                train_start = time.perf_counter()
                loss, images_seen = self._train(task, train_indices, ctx)
                finetuning = self.learner.finetuning_schedule(cfg.train.for_task(task)) if task > 0 else None
                if finetuning is not None:
                    loss, finetuned = self._balanced_finetuning(task, finetuning, memory_indices, new_indices, ctx)
                    images_seen += finetuned
                self._synchronise()
                train_seconds = time.perf_counter() - train_start
                self.learner.end_task(self.model)
                if cfg.learner.two_stage == "refit":
                    self._retrain_classifier(train_indices, num_seen)
                elif cfg.learner.two_stage == "lws":
                    self._learn_weight_scaling(task, train_indices, num_old)
                trained = self._trained_state(task, loss, train_seconds, images_seen)
            self.old_model = self._frozen(self.model)  # this phase's final model, from here on
            herding_features = stored.herding_features if stored is not None else None
            if self.learner.uses_memory:
                herding_features = self._update_memory(task, num_seen, herding_features)
            class_means = self._class_means(num_seen, herding_features) if self.learner.nearest_mean else None
            # Scores by nearest mean depend on the memory, which the phase key does not cover.
            evaluation = stored.evaluation if stored is not None and class_means is None else None
            if evaluation is None:
                evaluation = self._score_phase(task, num_seen, class_means)
            if stored is None and slot.wants_entry:
                trained.herding_features = herding_features
                trained.evaluation = evaluation if class_means is None else None
                slot.save(trained)
        result = self._evaluate(task, num_seen, evaluation)
        result.metrics.update(
            loss=loss,
            train_images=float(images_seen),
            train_images_per_s=images_seen / max(train_seconds, 1e-9),
            train_seconds=train_seconds,
            phase_seconds=time.perf_counter() - phase_start,
            phase_reused=float(stored is not None),
        )
        result.state = self._state(task)
        result.reused_from = stored.trained_by if stored is not None else None
        self.progress(PhaseDone(task, bench.num_tasks, dict(result.metrics)))
        return result

    def _phase_slot(self, task: int):
        if self.phase_store is None:
            return nullcontext(_NO_SLOT)
        return self.phase_store.slot(self.phase_keys[task], task)

    def _trained_state(self, task: int, loss: float, train_seconds: float, images_seen: int) -> StoredPhase:
        """The phase as trained, before the memory update draws from the generator."""
        return StoredPhase(
            phase=task,
            model={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            head_sizes=list(self.model.head_sizes),
            **self._rng_states(),
            loss=loss,
            train_seconds=train_seconds,
            images_seen=images_seen,
        )

    def _take_trained(self, stored: StoredPhase) -> None:
        if stored.head_sizes != list(self.model.head_sizes):
            raise ValueError(f"stored phase {stored.phase} has heads {stored.head_sizes}, this run {self.model.head_sizes}")
        self.model.load_state_dict(stored.model)
        self._set_rng_states(stored.torch_rng, stored.cuda_rng, stored.generator)

    def _task_context(self, task: int, num_old: int, num_seen: int, memory_indices: torch.Tensor, n_new: int) -> TaskContext:
        original = torch.as_tensor(self.benchmark.train_counts[:num_seen], dtype=torch.long)
        counts = original.clone()
        # Old classes count their exemplars actually in memory (method.md §2, fixed-total note).
        counts[:num_old] = torch.bincount(self.train_labels[memory_indices], minlength=num_seen)[:num_old]
        return TaskContext(
            task=task,
            num_old=num_old,
            num_seen=num_seen,
            class_counts=counts.to(self.device),
            original_counts=original.to(self.device),
            n_seen=int(original[:num_old].sum()),
            n_new=n_new,
            head_sizes=tuple(self.task_sizes[: task + 1]),
        )

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        # CUDA-graph capture refuses autocast's weight cache.
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.cfg.train.cuda_graph)

    def _synchronise(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ training

    def _train(self, task: int, indices: torch.Tensor, ctx: TaskContext, schedule: Optional[TaskSchedule] = None) -> tuple[float, int]:
        train = self.cfg.train
        lr, epochs, milestones = schedule or train.for_task(task)
        optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=train.lr_decay)
        batches_per_epoch = math.ceil(len(indices) / train.batch_size)
        epoch_loss = math.nan
        backbone, teacher = self.model.backbone, self.old_model
        captured = False  # graphs are captured on this task's first full batch
        for epoch in range(epochs):
            self.model.train()
            loss_sum = torch.zeros((), device=self.device)
            for batch, (x, y) in enumerate(self.train_images.train_batches(indices, train.batch_size, self.generator)):
                if train.cuda_graph and not captured and len(x) == train.batch_size:
                    backbone, teacher = self._graphed_forwards(x)
                    captured = True
                if self.learner.needs_features:
                    loss_sum += autograd_step(self.model, teacher, self.learner, x, y, optimizer, self._autocast)
                else:
                    loss_sum += training_step(
                        self.model, teacher, self.learner, x, y, optimizer, self._autocast, backbone=backbone
                    )
                self.progress(BatchDone(task, epoch + 1, batch + 1, batches_per_epoch))
            schedule.step()
            epoch_loss = float(loss_sum) / batches_per_epoch  # one host read per epoch
            if not math.isfinite(epoch_loss):
                raise NonFiniteLossError(f"training loss became {epoch_loss} in phase {task}, epoch {epoch}")
            val_acc = None
            if train.validate_every_epoch and len(self.benchmark.val):
                val_acc = self._validation_accuracy(task, ctx.num_seen)
            self.progress(EpochDone(task, epoch + 1, epochs, epoch_loss, optimizer.param_groups[0]["lr"], val_acc))
        return epoch_loss, epochs * len(indices)

    def _graphed_forwards(self, sample: torch.Tensor) -> tuple[Callable, Optional[Callable]]:
        """CUDA-graphed backbone (captured once per model) and teacher (once per task)."""
        if self._graphed_model is not self.model:
            self._graphed_backbone = graph_training_forward(self.model.backbone, sample, self._autocast)
            self._graphed_model = self.model
        teacher = None
        if self.old_model is not None and self.learner.distills:
            teacher = graph_inference(self.old_model, sample, self._autocast)
        return self._graphed_backbone, teacher

    def _balanced_finetuning(
        self, task: int, schedule: TaskSchedule, memory_indices: torch.Tensor, new_indices: torch.Tensor, ctx: TaskContext
    ) -> tuple[float, int]:
        """EEIL's balanced fine-tuning: the memory and as many new images, drawn at random over the
        new task (the reference's subset, not per class), with the learner's own schedule."""
        drawn = new_indices[torch.randperm(len(new_indices), generator=self.generator)[: len(memory_indices)]]
        self.learner.finetuning = True
        try:
            return self._train(task, torch.cat([memory_indices, drawn]), ctx, schedule)
        finally:
            self.learner.finetuning = False

    def _learn_weight_scaling(self, task: int, indices: torch.Tensor, num_old: int) -> None:
        """Two-stage LWS (method/two_stage.py) on the task's training images."""
        train = self.cfg.train
        learn_weight_scaling(
            self.model,
            lambda order: self.train_images.ordered_batches(indices[order], train.batch_size, self.generator),
            self.train_labels[indices], num_old, epochs=self.cfg.learner.two_stage_epochs,
            lr=train.for_task(task).lr, scaling_lr_factor=train.lr_decay, momentum=train.momentum,
            weight_decay=train.weight_decay, generator=self.generator, autocast=self._autocast,
        )  # fmt: skip

    def _retrain_classifier(self, indices: torch.Tensor, num_seen: int) -> None:
        """Two-stage: refit the heads on class-balanced samples of frozen-backbone features."""
        features, labels = self._features(indices, self.model)
        learner = self.cfg.learner
        weight, bias = refit_heads(
            features, labels, self.model.head_weight, self.model.head_bias, epochs=learner.two_stage_epochs,
            lr=learner.two_stage_lr, batch_size=self.cfg.train.batch_size, generator=self.generator,
        )  # fmt: skip
        with torch.no_grad():
            self.model.head_weight.copy_(weight)
            self.model.head_bias.copy_(bias)

    # ------------------------------------------------------------------ memory

    @torch.no_grad()
    def _features(self, indices: torch.Tensor, net: IncrementalNet) -> tuple[torch.Tensor, torch.Tensor]:
        """`net`'s backbone features (eval transform) of `indices`, in large batches; (N, D), (N,)."""
        net.eval()
        features, labels = [], []
        for x, y in self.train_images.eval_batches(indices, self.eval_batch_size):
            with self._autocast():
                features.append(net.backbone(x).float())
            labels.append(y)
        if not features:
            return torch.empty(0, self.model.head_weight.shape[1], device=self.device), torch.empty(0, dtype=torch.long)
        return torch.cat(features), torch.cat(labels)

    def _update_memory(self, task: int, num_seen: int, herding_features: Optional[dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Select the new classes' exemplars; returns each class's herding features for the store.

        `herding_features` are a stored phase's: the same features of the same frozen model, so
        the selection is the one that run would make for this run's budget.
        """
        mem = self.cfg.memory
        per_class = budget_per_class(mem.budget, mem.per_class, mem.total, num_seen)
        if mem.budget == "total":
            self.memory.shrink(per_class)  # a fixed total: old classes give up their last-ranked exemplars
        computed = dict(herding_features or {})
        for label in self.benchmark.task_classes[task]:
            candidates = torch.as_tensor(np.flatnonzero(self.benchmark.train.labels == label))
            if mem.selection == "herding":
                if label not in computed:
                    computed[label] = self._features(candidates, self.old_model)[0].cpu()
                ranked = herding_order(computed[label].to(self.device), per_class)
            else:
                ranked = random_order(len(candidates), per_class, self.generator)
            self.memory.update(label, candidates[ranked.cpu()])
        return computed

    def _class_means(self, num_seen: int, herding_features: Optional[dict[int, torch.Tensor]]) -> torch.Tensor:
        """iCaRL: mean of L2-normalised exemplar features per class, renormalised; (C, D).

        The new classes' exemplars were just scored for herding by the same frozen model: their
        rows are taken from those features; only the old classes' exemplars are run again.
        """
        known = herding_features or {}
        in_memory = self.memory.counts()
        rerun = [c for c in in_memory if c not in known]
        rerun_features, rerun_labels = self._features(self.memory.indices(rerun), self.old_model)
        parts, part_labels = [rerun_features], [rerun_labels.to(self.device)]
        for label in (c for c in in_memory if c in known):
            candidates = torch.as_tensor(np.flatnonzero(self.benchmark.train.labels == label))
            rows = torch.searchsorted(candidates, self.memory.indices([label]))
            parts.append(known[label][rows].to(self.device))
            part_labels.append(torch.full((len(rows),), label, dtype=torch.long, device=self.device))
        features, labels = torch.cat(parts), torch.cat(part_labels)
        features = F.normalize(features, dim=1)
        sums = torch.zeros(num_seen, features.shape[1], device=self.device).index_add_(0, labels, features)
        return F.normalize(sums, dim=1)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _scores(self, net: IncrementalNet, x: torch.Tensor, num_seen: int, class_means: Optional[torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            features = net.backbone(x).float()
        if class_means is not None:
            # Nearest mean of exemplars: the negative distance is the score.
            return -torch.cdist(F.normalize(features, dim=1), class_means)
        return net.scores(features)[:, :num_seen]

    @torch.no_grad()
    def _validation_accuracy(self, task: int, num_seen: int) -> float:
        """The training model's val_acc, for the per-epoch print: the phase's own class-balanced measure."""
        self.model.eval()
        bench = self.benchmark
        indices = torch.as_tensor(bench.task_indices(bench.val, range(task + 1)), dtype=torch.long)
        batches = [
            self._scores(self.model, x, num_seen, None).argmax(1)
            for x, _ in self.val_images.eval_batches(indices, self.eval_batch_size)
        ]
        self.model.train()
        predictions = torch.cat(batches).cpu() if batches else torch.empty(0, dtype=torch.long)
        rows = accuracy_rows(predictions, predictions, self.val_labels[indices], bench.task_classes, task)
        return mean_of_present(class_balanced_task_accuracy(rows.class_acc, rows.class_labels, bench.task_classes, task))

    @torch.no_grad()
    def _score_split(self, images, split_labels: torch.Tensor, split, task: int, num_seen: int, class_means: Optional[torch.Tensor]):
        """The phase's final model on a split's images of tasks 0..task: (accuracy rows, image count)."""
        bench = self.benchmark
        indices = torch.as_tensor(bench.task_indices(split, range(task + 1)), dtype=torch.long)
        task_of_class = self.task_of_class[:num_seen].to(self.device)
        predictions = torch.empty(0, dtype=torch.long, device=self.device)
        aware_predictions = predictions
        if len(indices):
            batches, aware_batches = [], []
            for x, y in images.eval_batches(indices, self.eval_batch_size):
                scores = self._scores(self.old_model, x, num_seen, class_means)
                batches.append(scores.argmax(1))
                # Task-aware: argmax within the head of the image's own task.
                in_own_task = task_of_class[None, :] == task_of_class[y][:, None]
                aware_batches.append(scores.masked_fill(~in_own_task, -math.inf).argmax(1))
            predictions, aware_predictions = torch.cat(batches), torch.cat(aware_batches)
        rows = accuracy_rows(predictions.cpu(), aware_predictions.cpu(), split_labels[indices], bench.task_classes, task)
        return rows, len(indices)

    @torch.no_grad()
    def _score_phase(self, task: int, num_seen: int, class_means: Optional[torch.Tensor]) -> dict[str, Any]:
        """The phase's final model on the test images and, in the same pass, the held-out ones."""
        bench = self.benchmark
        test_rows, _ = self._score_split(self.test_images, self.test_labels, bench.test, task, num_seen, class_means)
        val_rows, val_images = self._score_split(self.val_images, self.val_labels, bench.val, task, num_seen, class_means)
        return {"test": test_rows, "val": val_rows, "val_images": val_images}

    @torch.no_grad()
    def _evaluate(self, task: int, num_seen: int, evaluation: dict[str, Any]) -> PhaseResult:
        bench = self.benchmark
        rows, val_rows, val_images = evaluation["test"], evaluation["val"], evaluation["val_images"]
        self.acc_matrix[task, : task + 1] = rows.acc
        self.task_aware_matrix[task, : task + 1] = rows.task_aware
        # Class-balanced, as the test set is; a task without held-out images stays NaN (method.md §4).
        self.val_matrix[task, : task + 1] = class_balanced_task_accuracy(
            val_rows.class_acc, val_rows.class_labels, bench.task_classes, task
        )

        train_counts = bench.train_counts[:num_seen]
        memory_counts = self.memory.counts()
        weight_norms = self.model.class_weight_norms().cpu().numpy()
        order = np.asarray(rows.class_labels)
        metrics = {
            "acc": average_accuracy(self.acc_matrix, task),
            "acc_class_weighted": class_weighted_accuracy(self.acc_matrix, task, bench.task_classes),
            "avg_incremental_acc": average_incremental_accuracy(self.acc_matrix, task),
            "task_aware_acc": float(np.mean(self.task_aware_matrix[task, : task + 1])),
            "forgetting": forgetting(self.acc_matrix, task),
            "val_acc": validation_accuracy(self.val_matrix, task),
            "val_acc_class_weighted": validation_class_weighted_accuracy(self.val_matrix, task, bench.task_classes),
            "val_avg_incremental_acc": validation_average_incremental_accuracy(self.val_matrix, task),
            "val_images": float(val_images),
        }
        metrics.update(shot_accuracies(rows.class_correct, rows.class_total, train_counts[order]))
        per_class = {
            "position": order.tolist(),
            "original_label": [bench.class_order[c] for c in order],
            "name": [bench.class_names[c] for c in order],
            "train_count": train_counts[order].astype(int).tolist(),
            "memory_count": [int(memory_counts.get(int(c), 0)) for c in order],
            "test_count": np.asarray(rows.class_total).astype(int).tolist(),
            "accuracy": np.asarray(rows.class_acc, dtype=float).tolist(),
            # Where validation is thin: a class's held-out images and its accuracy on them (NaN: none).
            "val_count": np.asarray(val_rows.class_total).astype(int).tolist(),
            "val_accuracy": np.asarray(val_rows.class_acc, dtype=float).tolist(),
            "head_weight_norm": weight_norms[order].astype(float).tolist(),
            "shot": shot_groups(train_counts[order]).tolist(),
        }
        return PhaseResult(
            phase=task,
            num_phases=bench.num_tasks,
            task_classes=[list(c) for c in bench.task_classes],
            acc_matrix=self.acc_matrix.copy(),
            task_aware_matrix=self.task_aware_matrix.copy(),
            metrics=metrics,
            per_class=per_class,
            val_matrix=self.val_matrix.copy(),
        )
