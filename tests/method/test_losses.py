import math

import pytest
import torch
import torch.nn.functional as F

from method.losses import (
    dakd_loss,
    dakd_prior,
    dakd_sigma,
    log_prior,
    logit_adjusted_cross_entropy,
    soft_cross_entropy,
)


def test_logit_adjusted_ce_by_hand():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    counts = torch.tensor([6, 3, 1])
    prior = log_prior(counts)
    assert torch.allclose(prior, torch.log(torch.tensor([0.6, 0.3, 0.1])))
    # adjusted logits: 1 + ln .6, ln .3, -1 + ln .1; CE for target 1 = -log softmax_1
    adjusted = [1 + math.log(0.6), math.log(0.3), -1 + math.log(0.1)]
    expected = -(adjusted[1] - math.log(sum(math.exp(v) for v in adjusted)))
    loss = logit_adjusted_cross_entropy(logits, torch.tensor([1]), prior)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits + prior, torch.tensor([1])).item())


def test_sigma_and_prior_by_hand():
    removed = torch.tensor([30.0, 10.0])
    # p = (30.001, 10.001) / 40.002; sigma = H(p) / ln 2
    p = [30.001 / 40.002, 10.001 / 40.002]
    sigma = -(p[0] * math.log(p[0]) + p[1] * math.log(p[1])) / math.log(2)
    assert dakd_sigma(removed).item() == pytest.approx(sigma, rel=1e-5)
    # q = (0.75, 0.25) then divided by its L2 norm sqrt(0.625)
    norm = math.sqrt(0.75**2 + 0.25**2)
    assert torch.allclose(dakd_prior(removed), torch.tensor([0.75 / norm, 0.25 / norm]))
    assert torch.allclose(dakd_prior(removed, "sum"), torch.tensor([0.75, 0.25]))
    assert dakd_sigma(torch.tensor([7.0, 7.0, 7.0])).item() == pytest.approx(1.0, abs=1e-6)


def test_dakd_equals_plain_kd_when_loss_is_even():
    torch.manual_seed(0)
    z, zh = torch.randn(5, 4), torch.randn(5, 4)
    even = torch.full((4,), 12.0)
    assert dakd_loss(z, zh, even, 2.0).item() == pytest.approx(soft_cross_entropy(z, zh, 2.0).item(), rel=1e-5)


def test_dakd_by_hand_on_one_sample():
    z, zh = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    removed = torch.tensor([3.0, 1.0])
    T = 2.0
    sigma = dakd_sigma(removed).item()
    q = dakd_prior(removed).tolist()
    mixed = [q[0] * 2.0 + (1 - q[0]) * 0.0, q[1] * 0.0 + (1 - q[1]) * 1.0]

    def log_softmax(v):
        m = math.log(sum(math.exp(a / T) for a in v))
        return [a / T - m for a in v]

    target = [math.exp(a / T) / sum(math.exp(b / T) for b in [0.0, 1.0]) for a in [0.0, 1.0]]
    student, mix = log_softmax([2.0, 0.0]), log_softmax(mixed)
    expected = -sum(target[c] * (sigma * student[c] + (1 - sigma) * mix[c]) for c in range(2))
    assert dakd_loss(z, zh, removed, T).item() == pytest.approx(expected, rel=1e-5)


def test_dakd_gradient_finite_with_a_class_that_lost_nothing():
    z = torch.randn(6, 3, requires_grad=True)
    zh = torch.randn(6, 3)
    loss = dakd_loss(z, zh, torch.tensor([40.0, 0.0, 12.0]), 2.0)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # nothing removed anywhere: still finite (q = 0, the mixed logits are the teacher's)
    loss = dakd_loss(z, zh, torch.zeros(3), 2.0)
    assert torch.isfinite(torch.autograd.grad(loss, z)[0]).all()
