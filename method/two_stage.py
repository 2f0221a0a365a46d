"""Long-Tailed-CIL's two-stage (LWS, Liu et al. ECCV 2022): after a task's training, the backbone
frozen, the newest head and a learnable per-class weight scaling trained on class-balanced draws.

As the reference runs it (src/approach/*_2stage.py, LAS_utils.LearnableWeightScaling,
datasets/data_loader.ClassAwareSampler): the scaling starts at 1 for each new head's classes and
keeps what earlier tasks learnt; SGD with the main momentum and weight decay, the heads at the
task's lr and the scaling at that lr times the main schedule's decay, both on a cosine schedule
that the reference sets after each epoch (so its first epoch runs both groups at the task's lr);
images with the training augmentation, the backbone in eval mode.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from method.backbones import IncrementalNet


class _RandomCycle:
    """0..n-1 in a random order, reshuffled each time round (the reference's RandomCycleIter)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.position, self.order = n, []

    def next(self) -> int:
        if self.position == self.n:
            self.order = torch.randperm(self.n, generator=self.generator).tolist()
            self.position = 0
        self.position += 1
        return self.order[self.position - 1]


class ClassAwareSampler:
    """Class-balanced draws: a class from a random cycle over the classes, then its next
    `per_class_draw` images from its own random cycle; an epoch is as many draws as images."""

    def __init__(self, labels: torch.Tensor, generator: torch.Generator, per_class_draw: int = 4) -> None:
        labels = labels.cpu()
        self.members = [torch.nonzero(labels == c).flatten().tolist() for c in torch.unique(labels).tolist()]
        self.classes = _RandomCycle(len(self.members), generator)
        self.images = [_RandomCycle(len(m), generator) for m in self.members]
        self.size, self.per_class_draw = len(labels), per_class_draw

    def epoch(self) -> torch.Tensor:
        """Positions into `labels`, (N,)."""
        drawn: list[int] = []
        while len(drawn) < self.size:
            c = self.classes.next()
            drawn += [self.members[c][self.images[c].next()] for _ in range(self.per_class_draw)]
        return torch.as_tensor(drawn[: self.size], dtype=torch.long)


def learning_rates_after(epochs_done: int, epochs: int, lr: float, scaling_lr_factor: float) -> tuple[float, float]:
    """The heads' and the scaling's learning rates once `epochs_done` epochs have run (cosine to 0)."""
    heads = 0.5 * lr * (1.0 + math.cos(epochs_done / epochs * math.pi))
    return heads, heads * scaling_lr_factor


def learn_weight_scaling(
    model: IncrementalNet,
    batches: Callable[[torch.Tensor], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    labels: torch.Tensor,
    num_old: int,
    *,
    epochs: int,
    lr: float,
    scaling_lr_factor: float,
    momentum: float,
    weight_decay: float,
    generator: torch.Generator,
    autocast: Callable = torch.no_grad,
) -> None:
    """Train the newest head's rows (and bias, or the shared scale) and `model.class_scale`.

    `batches(order)` yields augmented (images, labels) in the order given; `labels` are those
    of the task's training images, whose positions the sampler draws.
    """
    kind = model.head_kind
    rows = model.head_rows(num_old)
    old_weight, old_bias = model.head_weight[: rows.start].detach(), model.head_bias[:num_old].detach()
    new_weight = model.head_weight[rows].detach().clone().requires_grad_()
    new_bias = model.head_bias[num_old:].detach().clone().requires_grad_(kind.has_bias)
    scale = model.head_scale.detach().clone().requires_grad_() if kind.scaled else None
    class_scale = model.class_scale.detach().clone().requires_grad_()
    head_params = [new_weight] + ([new_bias] if kind.has_bias else []) + ([scale] if scale is not None else [])
    optimizer = torch.optim.SGD(
        [{"params": head_params}, {"params": [class_scale]}], lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    sampler = ClassAwareSampler(labels, generator)
    model.backbone.eval()
    for epoch in range(epochs):
        for x, y in batches(sampler.epoch()):
            with torch.no_grad(), autocast():
                features = model.backbone(x).float()
            weight, bias = torch.cat([old_weight, new_weight]), torch.cat([old_bias, new_bias])
            loss = F.cross_entropy(kind.logits(features, weight, bias, scale) * class_scale, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates = learning_rates_after(epoch + 1, epochs, lr, scaling_lr_factor)
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
    with torch.no_grad():
        model.head_weight[rows] = new_weight
        model.head_bias[num_old:] = new_bias
        if scale is not None:
            model.head_scale.copy_(scale)
        model.class_scale.copy_(class_scale)
