"""Losses of method.md §3: logit-adjusted cross-entropy, plain KD and DAKD."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log_prior(class_counts: torch.Tensor) -> torch.Tensor:
    """log(count_t(c) / sum count_t) over the seen classes, the logit adjustment."""
    counts = class_counts.to(torch.float32)
    return torch.log(counts / counts.sum())


def logit_adjusted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    # code: the reference adds log(prior) to every logit before the CE; test-time uses raw logits.
    return F.cross_entropy(logits + log_prior, targets)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-(1/B) sum_b sum_c softmax(teacher/T)_c log_softmax(student/T)_c (KD without the T^2)."""
    targets = F.softmax(teacher_logits / temperature, dim=1)
    return -(targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()


def dakd_sigma(removed_counts: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of the removed-sample distribution; 1 when data was lost evenly."""
    shifted = removed_counts.to(torch.float32) + 0.001
    p = shifted / shifted.sum()
    return -(p * torch.log(p)).sum() / math.log(len(removed_counts))


def dakd_prior(removed_counts: torch.Tensor, normalisation: str = "l2") -> torch.Tensor:
    """q_c = s_c / sum(s), then (code) divided by its L2 norm; 'sum' keeps the poster's ratio."""
    s = removed_counts.to(torch.float32)
    total = s.sum()
    # No sample removed at all (a budget above every class size): nothing to re-balance.
    q = torch.where(total > 0, s / total.clamp_min(1e-12), torch.zeros_like(s))
    if normalisation == "l2":
        q = q / torch.linalg.vector_norm(q).clamp_min(1e-12)
    return q


def dakd_loss(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    removed_counts: torch.Tensor,
    temperature: float,
    prior_normalisation: str = "l2",
) -> torch.Tensor:
    """Distribution-aware KD over the old classes (method.md §3, DAKD).

    logits, old_logits: (B, n_old); removed_counts: (n_old,) s_c = orig(c) - count_t(c).
    """
    sigma = dakd_sigma(removed_counts)
    q = dakd_prior(removed_counts, prior_normalisation)
    mixed = q * logits + (1 - q) * old_logits
    targets = F.softmax(old_logits / temperature, dim=1)
    log_student = sigma * F.log_softmax(logits / temperature, dim=1) + (1 - sigma) * F.log_softmax(
        mixed / temperature, dim=1
    )
    return -(targets * log_student).sum(dim=1).mean()
