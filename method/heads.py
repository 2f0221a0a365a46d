"""Head types: how a (num_rows, feature_dim) weight matrix turns features into class scores.

The heads of every task live in one matrix (backbones.IncrementalNet), so a head type is a
small set of functions over that matrix, registered by name like the learners. Linear is the
default and the only one DGR's fused step works with; LUCIR's cosine head and PODNet's local
similarity classifier (LSC) normalise features and rows and carry one learned scale.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

HEADS: dict[str, type["LinearHead"]] = {}


def register_head(name: str) -> Callable[[type["LinearHead"]], type["LinearHead"]]:
    def add(cls: type["LinearHead"]) -> type["LinearHead"]:
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


@register_head("linear")
class LinearHead:
    """nn.Linear rows and biases; the concatenated per-task heads of the reference."""

    name = "linear"
    proxies = 1  # weight rows per class
    scaled = False  # has a learned scale (sigma)
    has_bias = True
    scaled_at_test = True  # test-time scores are the logits (else the unscaled similarities)

    @staticmethod
    def new_rows(feature_dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Drawn exactly as nn.Linear(feature_dim, num_classes) draws them.
        fresh = nn.Linear(feature_dim, num_classes)
        return fresh.weight.detach(), fresh.bias.detach()

    @classmethod
    def similarities(cls, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(features, weight, bias)

    @classmethod
    def logits(cls, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        return cls.similarities(features, weight, bias)

    @classmethod
    def class_norms(cls, weight: torch.Tensor) -> torch.Tensor:
        """One weight norm per class, (C,): the weight-norm plot's bars."""
        return torch.linalg.vector_norm(weight, dim=1).reshape(-1, cls.proxies).mean(dim=1)


@register_head("cosine")
class CosineHead(LinearHead):
    """LUCIR's cosine normalisation: sigma * cos(f, w_c), no bias (Hou et al. 2019, Eq. 4)."""

    scaled = True
    has_bias = False

    @classmethod
    def new_rows(cls, feature_dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The reference's CosineLinear: uniform(-1/sqrt(D), 1/sqrt(D)) rows, sigma starts at 1.
        bound = 1.0 / math.sqrt(feature_dim)
        weight = torch.empty(num_classes * cls.proxies, feature_dim).uniform_(-bound, bound)
        return weight, torch.zeros(num_classes)  # the bias stays 0 and is never used

    @classmethod
    def similarities(cls, features, weight, bias=None):
        """Cosine similarities before the scale, (B, C): LUCIR's margin ranking reads these."""
        return reduce_proxies(F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1)), cls.proxies)

    @classmethod
    def logits(cls, features, weight, bias, scale):
        return scale * cls.similarities(features, weight)


@register_head("lsc")
class LocalSimilarityHead(CosineHead):
    """PODNet's local similarity classifier: ten cosine proxies per class (Douillard et al. 2020).

    The reference applies sigma in training mode only, so it scores test images by the
    similarities themselves (the same argmax while sigma is positive).
    """

    proxies = 10
    scaled_at_test = False


def reduce_proxies(similarities: torch.Tensor, proxies: int) -> torch.Tensor:
    """(B, C * K) proxy similarities -> (B, C): each class's proxies weighted by their softmax."""
    if proxies == 1:
        return similarities
    per_class = similarities.reshape(similarities.shape[0], -1, proxies)  # (B, C, K)
    return (F.softmax(per_class, dim=-1) * per_class).sum(dim=-1)
