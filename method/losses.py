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


# ------------------------------------------------------------------ the competitors' losses
# As the Long-Tailed-CIL reference computes them (src/approach/lucir.py, podnet.py, eeil.py).


def less_forget_loss(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """LUCIR Eq. 6: mean over the batch of 1 - cos(f, f_old) (CosineEmbeddingLoss with targets 1).

    PODNet's POD-flat is the same term on its un-ReLU'd features.
    """
    return (1.0 - F.cosine_similarity(features, old_features, dim=1, eps=1e-8)).mean()


def margin_ranking_loss(similarities: torch.Tensor, targets: torch.Tensor, num_old: int, hard_negatives: int, margin: float) -> torch.Tensor:
    """LUCIR Eq. 8 on the unscaled cosine similarities (B, C), over the batch's old-class images.

    Each old-class image's similarity to its own class should beat its K highest new-class
    similarities by `margin`: mean over those images and K of max(0, margin - (s_gt - s_k)).
    No old-class image in the batch: 0.
    """
    old_images = targets < num_old
    if not bool(old_images.any()):
        return similarities.sum() * 0.0
    own = similarities[old_images].gather(1, targets[old_images, None])  # (H, 1)
    hardest_new = similarities[old_images, num_old:].topk(hard_negatives, dim=1).values  # (H, K)
    return F.relu(margin - (own - hardest_new)).mean()


def nca_loss(logits: torch.Tensor, targets: torch.Tensor, margin: float = 0.6, scale: float = 1.0) -> torch.Tensor:
    """PODNet's NCA loss as the reference calls it: cross-entropy of scale * (logits - margin).

    The reference builds a margin matrix for the targets but then subtracts the scalar margin
    from every logit, which leaves the softmax unchanged: the loss it trains with equals the
    cross-entropy of the scaled logits. Kept as it is, since its numbers come from it.
    """
    return F.cross_entropy(scale * (logits - margin), targets)


def pod_spatial_loss(maps: list[torch.Tensor], old_maps: list[torch.Tensor]) -> torch.Tensor:
    """POD-spatial: per stage, squared activations summed over height and over width, each
    (B, C*W) and (B, C*H) concatenated and L2-normalised; the mean over the batch of the
    distance between new and old; averaged over the stages.

    In fp32 whatever the maps' dtype: squaring and summing bf16 maps over a whole row loses the
    small differences the distance measures."""
    total = maps[0].new_zeros((), dtype=torch.float32)
    for new, old in zip(maps, old_maps):
        pooled = []
        for a in (new.float().pow(2), old.float().pow(2)):
            b = a.shape[0]
            pooled.append(F.normalize(torch.cat([a.sum(dim=3).reshape(b, -1), a.sum(dim=2).reshape(b, -1)], dim=1), dim=1))
        total = total + torch.linalg.vector_norm(pooled[0] - pooled[1], dim=1).mean()
    return total / len(maps)


def head_wise_distillation(logits: torch.Tensor, old_logits: torch.Tensor, heads: list[tuple[int, int]], temperature: float) -> torch.Tensor:
    """EEIL's distillation: per old head, the binary cross-entropy between the student's and the
    teacher's softmax at temperature T over that head's classes (mean over its elements), summed."""
    total = logits.new_zeros(())
    for start, end in heads:
        student = F.softmax(logits[:, start:end] / temperature, dim=1)
        teacher = F.softmax(old_logits[:, start:end] / temperature, dim=1)
        total = total + F.binary_cross_entropy(student, teacher)
    return total
