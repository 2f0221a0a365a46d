"""Exemplar selection and bookkeeping (method.md §2), apart from the model so it can be tested alone."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

BUDGETS = ("per_class", "total", "none")


def herding_order(features: torch.Tensor, k: int) -> torch.LongTensor:
    """The reference's herding: picks the samples whose running mean best tracks the class mean.

    Features are L2-normalised first (the class mean is of the normalised features and is not
    renormalised), ties go to the lower index, and the result is in pick order on the CPU, so a
    prefix is always the best smaller selection.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (n, D), got shape {tuple(features.shape)}")
    n = features.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.detach().to(dtype)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mean = feats.mean(dim=0)
    running_sum = torch.zeros_like(mean)
    taken = torch.zeros(n, dtype=torch.bool, device=feats.device)
    picks = torch.empty(k, dtype=torch.long, device=feats.device)
    for i in range(k):
        dist = ((running_sum + feats) / (i + 1) - mean).norm(dim=1)
        dist = dist.masked_fill(taken, float("inf"))
        j = torch.argmin(dist)
        picks[i] = j
        taken[j] = True
        running_sum = running_sum + feats[j]
    return picks.cpu()


def random_order(n: int, k: int, generator: torch.Generator) -> torch.LongTensor:
    """The random-selection baseline; the explicit generator keeps it reproducible per run seed."""
    return torch.randperm(n, generator=generator)[: max(0, min(int(k), n))]


def budget_per_class(budget: str, per_class: int, total: int, num_seen_classes: int) -> int:
    """Exemplars to keep per class; a fixed total never drops a class entirely."""
    if budget == "per_class":
        return int(per_class)
    if budget == "total":
        if num_seen_classes < 1:
            raise ValueError("a fixed total budget needs at least one seen class")
        return max(1, int(total) // int(num_seen_classes))
    if budget == "none":
        return 0
    raise ValueError(f"unknown memory budget {budget!r}; expected one of {BUDGETS}")


class ExemplarMemory:
    """Per-class exemplar indices into the training set, kept in selection rank.

    Rank order is what lets a fixed total budget shrink by truncation without reselecting.
    """

    def __init__(self) -> None:
        self._by_class: dict[int, torch.Tensor] = {}

    def update(self, class_label: int, ranked_indices) -> None:
        """Replaces the class's exemplars; callers pass the selection already ranked."""
        idx = torch.as_tensor(ranked_indices, dtype=torch.long).detach().cpu().reshape(-1).clone()
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"duplicate exemplar indices for class {class_label}")
        self._by_class[int(class_label)] = idx

    def shrink(self, per_class: int) -> None:
        """Keeps each class's best-ranked prefix, as a fixed total budget requires when classes arrive."""
        per_class = max(0, int(per_class))
        for label in self._by_class:
            self._by_class[label] = self._by_class[label][:per_class].clone()

    def indices(self, classes: Optional[Iterable[int]] = None) -> torch.LongTensor:
        """The exemplars of `classes` (all by default) in class order, so the replay set is the same on every run."""
        chosen = sorted(self._by_class if classes is None else set(classes))
        if not chosen:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([self._by_class[c] for c in chosen])

    def counts(self) -> dict[int, int]:
        """The per-class counts that the logit adjustment and DAKD need (method.md §2, count_t)."""
        return {c: int(self._by_class[c].numel()) for c in sorted(self._by_class)}

    def state_dict(self) -> dict[str, Any]:
        """CPU-only copies, so a checkpoint does not alias the live memory."""
        return {"by_class": {c: self._by_class[c].clone() for c in sorted(self._by_class)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._by_class = {}
        for label, idx in state["by_class"].items():
            self.update(int(label), idx)

    def __len__(self) -> int:
        return sum(int(v.numel()) for v in self._by_class.values())
