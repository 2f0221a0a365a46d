"""Gradient reweighting of the classifier heads (method.md §3), as tensor operations.

A linear head's weight gradient for a loss is `G^T h`, with G = dL/dlogits (B, C) and h the
features (B, D); its bias gradient is `G.sum(0)`. Reweighting class c's row by w_c is therefore
scaling column c of G, so the reweighted head gradient costs one small matmul and never a loop
over classes, and nothing here reads a value back to the host.
"""

from __future__ import annotations

import math

import torch


def head_gradient_norms(logit_grad: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """||dL/dW_c|| for every class: the row norms of G^T h.  (B, C), (B, D) -> (C,)."""
    return torch.linalg.vector_norm(logit_grad.t() @ features, dim=1)


def balance_ratios(accumulated: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
    """alpha_c = min_{m in group(c)} Phi_m / Phi_c; group is a bool mask (True = old) or None."""
    safe = accumulated.clamp_min(torch.finfo(accumulated.dtype).tiny)
    if group is None:
        return safe.min() / safe
    inf = torch.full_like(safe, math.inf)
    min_old = torch.where(group, safe, inf).min()
    min_new = torch.where(group, inf, safe).min()
    return torch.where(group, min_old, min_new) / safe


def attenuation_gamma(attenuation: float, n_seen: int, n_new: int) -> float:
    """gamma = exp(-a * n_seen / (n_seen + n_new)) (method.md §3 step 4)."""
    return math.exp(-attenuation * n_seen / (n_seen + n_new))


def group_ratios(accumulated: torch.Tensor, old: torch.Tensor, gamma: float) -> torch.Tensor:
    """r_old = min(1, m_new / m_old), r_new = min(1, gamma * m_new / m_old), per class."""
    old_f = old.to(accumulated.dtype)
    m_old = (accumulated * old_f).sum() / old_f.sum()
    m_new = (accumulated * (1 - old_f)).sum() / (1 - old_f).sum()
    ratio = m_new / m_old
    r_old = ratio.clamp(max=1.0)
    r_new = (gamma * ratio).clamp(max=1.0)
    return torch.where(old, r_old, r_new)


def kd_magnitude_ratio(weighted_ce_norms: torch.Tensor, kd_norms: torch.Tensor) -> torch.Tensor:
    """rho_kd = ||(w_c g_c) over seen classes|| / ||(k_c) over old classes||; 0 if KD has no gradient."""
    kd = torch.linalg.vector_norm(kd_norms)
    return torch.where(kd > 0, torch.linalg.vector_norm(weighted_ce_norms) / kd.clamp_min(1e-30), torch.zeros_like(kd))
