"""Learners: the few hooks where methods differ, over one shared training loop (trainer.py).

Logit-level learners (DGR and the baselines): each training step, the trainer computes the loss
terms a learner declares on the logits, the gradient of each term with respect to the logits
(B, C), and then asks the learner for the logit-gradient to apply to the heads. The backbone
always receives the plain gradient of the summed terms; only DGR changes the heads' gradient
(method.md §3).

Feature-level learners (LUCIR, PODNet) declare `needs_features`: their terms see the forward
pass's features, similarities and, with `needs_maps`, the stages' feature maps, of the model and
of the frozen old model, and the trainer runs a plain autograd step on their sum.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from method.config import LearnerConfig, TaskSchedule
from method.losses import (
    dakd_loss,
    head_wise_distillation,
    less_forget_loss,
    log_prior,
    logit_adjusted_cross_entropy,
    margin_ranking_loss,
    nca_loss,
    pod_spatial_loss,
    soft_cross_entropy,
)
from method.reweighting import (
    attenuation_gamma,
    balance_ratios,
    group_ratios,
    head_gradient_norms,
    kd_magnitude_ratio,
)


@dataclass
class TaskContext:
    """What a learner needs to know about the current task (method.md §2 "Counts")."""

    task: int
    num_old: int  # old classes: positions 0..num_old-1
    num_seen: int  # old + new classes
    class_counts: torch.Tensor  # (num_seen,) count_t(c): exemplars for old, all images for new
    original_counts: torch.Tensor  # (num_seen,) orig(c)
    n_seen: int  # sum of orig(c) over old classes
    n_new: int  # training images of the new task
    head_sizes: tuple[int, ...] = ()  # classes of each task's head, 0..task

    @property
    def removed_counts(self) -> torch.Tensor:
        """s_c = orig(c) - count_t(c) over the old classes."""
        return (self.original_counts - self.class_counts)[: self.num_old]


LEARNERS: dict[str, type["Learner"]] = {}


def register(name: str) -> Callable[[type["Learner"]], type["Learner"]]:
    def add(cls: type["Learner"]) -> type["Learner"]:
        cls.name = name
        LEARNERS[name] = cls
        return cls

    return add


def make_learner(cfg: LearnerConfig) -> "Learner":
    return LEARNERS[cfg.name](cfg)


def trains_task_as(cfg, task: int) -> str:
    """The phase key's `learner.name` for task `task` (RunConfig cfg): task 0 has no old model, so
    the learners that differ only in distillation train it alike (`first_task_as`)."""
    return LEARNERS[cfg.learner.name].first_task_as if task == 0 else cfg.learner.name


class Learner:
    """Replay with cross-entropy: the base every learner refines."""

    name = "base"
    uses_memory = True  # trains on the exemplar memory from task 1 on
    needs_memory = True  # refused with memory.budget none
    distills = False  # needs the frozen model of the previous task
    nearest_mean = False  # iCaRL's test-time classifier
    # The learner whose first task this one trains identically (no old model, no memory yet):
    # what the phase key holds for phase 0, so those learners share it (method/phases.py).
    first_task_as = "replay"
    head = "linear"  # the head type (method/heads.py)
    needs_features = False  # a plain autograd step over `feature_loss_terms`
    needs_maps = False  # ... whose outputs carry the stages' feature maps
    # The old heads' parameters stay out of the optimiser, as LUCIR and PODNet keep them.
    frozen_old_heads = False

    def __init__(self, cfg: LearnerConfig) -> None:
        self.cfg = cfg

    def begin_task(self, ctx: TaskContext) -> None:
        self.ctx = ctx

    def shape_backbone(self, backbone) -> None:
        """Hook once the backbone is built: a method's changes to the network."""

    def finetuning_schedule(self, schedule: TaskSchedule) -> Optional[TaskSchedule]:
        """EEIL: a later task's balanced fine-tuning, on the memory and as many new images."""
        return None

    def feature_loss_terms(self, outputs, old_outputs, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of a `needs_features` learner, from backbones.Outputs of the model and old model."""
        raise NotImplementedError

    def loss_terms(self, logits: torch.Tensor, old_logits: torch.Tensor | None, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"ce": F.cross_entropy(logits, targets)}
        if self.distills and old_logits is not None:
            terms["kd"] = soft_cross_entropy(logits[:, : self.ctx.num_old], old_logits, self.cfg.kd_temperature)
        return terms

    def head_logit_grad(self, term_grads: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """The (B, C) logit gradient whose G^T h is the heads' gradient; plain sum by default."""
        return sum(term_grads.values())

    def end_task(self, model) -> None:
        """Hook after a task's training, before the memory update and evaluation."""


@register("replay")
class Replay(Learner):
    pass


@register("finetune")
class Finetune(Learner):
    uses_memory = False
    needs_memory = False


@register("lwf")
class LwF(Learner):
    distills = True
    needs_memory = False  # distillation alone, or with replay when a budget is given


@register("icarl")
class ICaRL(Learner):
    distills = True
    nearest_mean = True


@register("wa")
class WeightAligning(Learner):
    distills = True

    def end_task(self, model) -> None:
        # Scale the new heads' weight rows so their mean norm equals the old rows' (WA).
        if self.ctx.num_old == 0:
            return
        with torch.no_grad():
            norms = torch.linalg.vector_norm(model.head_weight, dim=1)
            scale = norms[: self.ctx.num_old].mean() / norms[self.ctx.num_old :].mean()
            model.head_weight[self.ctx.num_old :] *= scale


@register("dgr")
class GradientReweighting(Learner):
    """DGR, in the order of method.md §3."""

    distills = True
    first_task_as = "dgr"  # logit adjustment and intra-phase reweighting act on task 0 too

    def __init__(self, cfg: LearnerConfig) -> None:
        super().__init__(cfg)
        self.dgr = cfg.dgr

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        device = ctx.class_counts.device
        # Phi_c, the accumulated CE head-gradient norms, reset at the start of every task.
        self.accumulated_grad_norms = torch.zeros(ctx.num_seen, device=device)
        self.old_mask = torch.arange(ctx.num_seen, device=device) < ctx.num_old
        self.log_prior = log_prior(ctx.class_counts)
        if ctx.num_old:
            self.gamma = attenuation_gamma(self.dgr.attenuation, ctx.n_seen, ctx.n_new)
            self.beta = self.dgr.lambda_b * self.beta_shape(ctx)
            self.removed = ctx.removed_counts.to(torch.float32)

    def beta_shape(self, ctx: TaskContext) -> float:
        if self.dgr.beta_schedule == "sqrt":
            return (ctx.n_seen / ctx.n_new) ** 0.5
        if self.dgr.beta_schedule == "linear":
            return float(ctx.task)
        return 1.0

    def loss_terms(self, logits, old_logits, targets):
        # code: logit-adjusted CE over all seen classes.
        if self.dgr.logit_adjustment:
            terms = {"ce": logit_adjusted_cross_entropy(logits, targets, self.log_prior)}
        else:
            terms = {"ce": F.cross_entropy(logits, targets)}
        if old_logits is not None and self.ctx.num_old:
            old_part = logits[:, : self.ctx.num_old]
            temperature = self.dgr.temperature
            if self.dgr.distillation == "dakd":
                kd = dakd_loss(old_part, old_logits, self.removed, temperature, self.dgr.dakd_prior)
            else:
                kd = soft_cross_entropy(old_part, old_logits, temperature)
            # code: the loss added is beta * T^2 * L_dakd.
            terms["kd"] = self.beta * temperature**2 * kd
        return terms

    def head_logit_grad(self, term_grads, features):
        ce_grad = term_grads["ce"]
        ce_norms = head_gradient_norms(ce_grad, features)  # g_c
        self.accumulated_grad_norms += ce_norms  # Phi_c += g_c
        if self.ctx.num_old == 0:
            # Task 0: intra-phase reweighting, alpha_c = min Phi / Phi_c.
            if not self.dgr.intra_phase_reweighting:
                return ce_grad
            return ce_grad * balance_ratios(self.accumulated_grad_norms)
        kd_grad = term_grads["kd"]
        if not self.dgr.inter_phase_reweighting:
            return ce_grad + kd_grad
        # Tasks t > 0: decoupled inter-phase reweighting, alpha per group times r_group.
        alpha = balance_ratios(self.accumulated_grad_norms, self.old_mask)
        class_weights = alpha * group_ratios(self.accumulated_grad_norms, self.old_mask, self.gamma)
        kd_norms = head_gradient_norms(kd_grad, features)[: self.ctx.num_old]  # k_c
        rho_kd = kd_magnitude_ratio(class_weights * ce_norms, kd_norms)
        # Old rows: w_c dLce + rho_kd dLkd; new rows: w_c dLce (KD has no gradient there).
        return ce_grad * class_weights + rho_kd * kd_grad


@register("lucir")
class LUCIR(Learner):
    """LUCIR: cosine heads, less-forget on the features, margin ranking on hard negatives.

    As the Long-Tailed-CIL reference (src/approach/lucir.py): the last block's final ReLU is
    removed, the old heads are frozen, one sigma is shared by all heads and trained. No
    weight imprinting: the reference leaves it out.
    """

    distills = True
    needs_features = True
    head = "cosine"
    frozen_old_heads = True
    first_task_as = "lucir"  # cosine heads and the missing ReLU shape phase 0 too

    def shape_backbone(self, backbone) -> None:
        backbone.remove_final_relu(every_block=False)

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        lucir = self.cfg.lucir
        if ctx.num_old:
            # Eq. 7, the adaptive weight: lambda_base * sqrt(old classes / new classes).
            self.less_forget_weight = lucir.lambda_base * math.sqrt(ctx.num_old / (ctx.num_seen - ctx.num_old))

    def feature_loss_terms(self, outputs, old_outputs, targets):
        terms = {"ce": F.cross_entropy(outputs.logits, targets)}
        if old_outputs is None or not self.ctx.num_old:
            return terms
        lucir = self.cfg.lucir
        terms["less_forget"] = self.less_forget_weight * less_forget_loss(outputs.features, old_outputs.features)
        # The reference's top-K over the new classes needs K of them; LFH tasks of one class have fewer.
        k = min(lucir.hard_negatives, self.ctx.num_seen - self.ctx.num_old)
        ranking = margin_ranking_loss(outputs.similarities, targets, self.ctx.num_old, k, lucir.margin)
        terms["margin_ranking"] = lucir.lambda_mr * ranking
        return terms


@register("podnet")
class PODNet(Learner):
    """PODNet: POD-spatial on the stages' maps, POD-flat on the features, NCA on an LSC head.

    As the Long-Tailed-CIL reference (src/approach/podnet.py, networks/resnet32_podnet.py): no
    block of the network ends in a ReLU, ResNet-32's shortcuts are zero-padded identities, ten
    proxies per class, old heads frozen, one shared
    sigma. Both distillation terms are scaled by sqrt(n_classes / task_size), the counts that
    the reference's main_incremental.py sets before each task: classes seen so far, new classes.
    """

    distills = True
    needs_features = True
    needs_maps = True
    head = "lsc"
    frozen_old_heads = True
    first_task_as = "podnet"

    def shape_backbone(self, backbone) -> None:
        backbone.remove_final_relu(every_block=True)
        if hasattr(backbone, "use_zero_pad_shortcuts"):  # ResNet-32; ImageNet's ResNet-18 keeps its own
            backbone.use_zero_pad_shortcuts()

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.class_factor = math.sqrt(ctx.num_seen / (ctx.num_seen - ctx.num_old))

    def feature_loss_terms(self, outputs, old_outputs, targets):
        pod = self.cfg.podnet
        terms = {"nca": nca_loss(outputs.logits, targets, pod.nca_margin)}
        if old_outputs is None or not self.ctx.num_old:
            return terms
        flat = less_forget_loss(outputs.features, old_outputs.features)
        terms["pod_flat"] = pod.flat_factor * self.class_factor * flat
        spatial = pod_spatial_loss(outputs.maps, old_outputs.maps)
        terms["pod_spatial"] = pod.spatial_factor * self.class_factor * spatial
        return terms


@register("eeil")
class EEIL(Learner):
    """EEIL: cross-entropy plus head-wise distillation, then balanced fine-tuning (eeil.py).

    The reference's distillation sums over old heads 0..t-2 during the task's training (the
    last old head is left out, so task 1 trains without distillation) and over every old head
    during the balanced fine-tuning; both are kept as it runs them.
    """

    distills = True
    finetuning = False  # set by the trainer around the fine-tuning stage

    def finetuning_schedule(self, schedule: TaskSchedule) -> Optional[TaskSchedule]:
        eeil = self.cfg.eeil
        if not eeil.finetune_epochs:
            return None
        # The reference's train loop again: the same milestones, a fresh optimiser.
        return TaskSchedule(schedule.lr * eeil.finetune_lr_factor, eeil.finetune_epochs, schedule.milestones)

    def loss_terms(self, logits, old_logits, targets):
        terms = {"ce": F.cross_entropy(logits, targets)}
        if old_logits is None or not self.ctx.num_old:
            return terms
        old_heads = len(self.ctx.head_sizes) - 1
        distilled = old_heads if self.finetuning else old_heads - 1
        bounds = [0, *itertools.accumulate(self.ctx.head_sizes)]
        heads = [(bounds[i], bounds[i + 1]) for i in range(distilled)]
        if heads:
            eeil = self.cfg.eeil
            terms["kd"] = eeil.lamb * head_wise_distillation(logits, old_logits, heads, eeil.temperature)
        return terms
