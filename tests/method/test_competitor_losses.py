"""The competitors' loss terms (method/losses.py: LUCIR, PODNet, EEIL) by hand on tiny cases."""

import math

import pytest
import torch

from method.losses import head_wise_distillation, less_forget_loss, margin_ranking_loss, nca_loss, pod_spatial_loss


def test_less_forget_is_one_minus_cosine_averaged():
    # cos((1, 0), (1, 0)) = 1 -> 0; cos((1, 0), (0, 2)) = 0 -> 1; cos((1, 1), (-1, -1)) = -1 -> 2.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    old = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    assert less_forget_loss(features, old).item() == pytest.approx((0 + 1 + 2) / 3)


def test_margin_ranking_by_hand():
    # Classes 0, 1 old; 2, 3, 4 new. Margin 0.5, K = 2 hardest new classes per old-class image.
    similarities = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.5, 0.3],  # old class 0: own 0.9 vs 0.5, 0.3 -> max(0, .5-.4), max(0, .5-.6) = .1, 0
            [0.0, 0.2, 0.6, 0.1, 0.4],  # old class 1: own 0.2 vs 0.6, 0.4 -> .5+.4 = .9, .5+.2 = .7
            [0.0, 0.0, 0.9, 0.0, 0.0],  # a new-class image: not ranked
        ]
    )
    targets = torch.tensor([0, 1, 2])
    loss = margin_ranking_loss(similarities, targets, num_old=2, hard_negatives=2, margin=0.5)
    assert loss.item() == pytest.approx((0.1 + 0.0 + 0.9 + 0.7) / 4, abs=1e-6)
    # No old-class image in the batch: zero, and still part of the graph.
    none = margin_ranking_loss(similarities.requires_grad_(), torch.tensor([2, 3, 4]), 2, 2, 0.5)
    assert none.item() == 0.0 and none.requires_grad


def test_nca_as_the_reference_applies_its_margin():
    # Two classes, logits (2, 1), target 0: the scalar margin shifts both logits alike, so the loss is
    # log(1 + e^{1 - 2}) whatever the margin; the scale multiplies the difference: log(1 + e^{-3}) at 3.
    logits, target = torch.tensor([[2.0, 1.0]]), torch.tensor([0])
    assert nca_loss(logits, target, margin=0.6).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert nca_loss(logits, target, margin=0.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert nca_loss(logits, target, margin=0.6, scale=3.0).item() == pytest.approx(math.log(1 + math.exp(-3)))


def test_pod_spatial_by_hand():
    # One stage, one image, one channel, 2x2 maps. New: [[1, 0], [0, 0]] -> squared row sums (1, 0),
    # column sums (1, 0): (1, 0, 1, 0) / sqrt 2. Old: all ones -> (2, 2, 2, 2) / 4 = (.5, .5, .5, .5).
    new = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    old = torch.ones(1, 1, 2, 2)
    a = torch.tensor([1.0, 0.0, 1.0, 0.0]) / math.sqrt(2)
    expected = torch.linalg.vector_norm(a - 0.5).item()
    assert pod_spatial_loss([new], [old]).item() == pytest.approx(expected, rel=1e-6)
    # Two stages average; identical maps add nothing. Signs do not matter (squared activations).
    assert pod_spatial_loss([new, old], [old, old]).item() == pytest.approx(expected / 2, rel=1e-6)
    assert pod_spatial_loss([-new], [new]).item() == pytest.approx(0.0, abs=1e-7)


def test_head_wise_distillation_by_hand():
    # Head (0, 2): student logits (0, 0) -> p = (.5, .5); teacher (0, ln 3) at T = 1 -> q = (.25, .75).
    # BCE mean over the two elements: -(q log p + (1 - q) log(1 - p)) = -log .5 = ln 2 each.
    logits = torch.tensor([[0.0, 0.0, 5.0]])
    old = torch.tensor([[0.0, math.log(3.0), -5.0]])
    assert head_wise_distillation(logits, old, [(0, 2)], temperature=1.0).item() == pytest.approx(math.log(2))
    # Head (2, 3) alone has one class: both softmaxes are 1, BCE 0. Heads add up.
    assert head_wise_distillation(logits, old, [(2, 3)], 1.0).item() == pytest.approx(0.0, abs=1e-6)
    both = head_wise_distillation(logits, old, [(0, 2), (2, 3)], 1.0).item()
    assert both == pytest.approx(math.log(2))
    # Student p = (.25, .75) against q = (.5, .5): -(.5 ln .25 + .5 ln .75) per element, the same for both.
    student = torch.tensor([[0.0, math.log(3.0)]])
    value = head_wise_distillation(student, torch.zeros(1, 2), [(0, 2)], 1.0).item()
    assert value == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)))


def test_pod_spatial_on_bf16_maps_is_the_fp32_computation_of_the_same_maps():
    generator = torch.Generator().manual_seed(0)
    maps = [torch.randn(4, 8, 6, 6, generator=generator).bfloat16() for _ in range(2)]
    old_maps = [(m.float() + 0.05 * torch.randn(m.shape, generator=generator)).bfloat16() for m in maps]
    in_bf16 = pod_spatial_loss(maps, old_maps)
    in_fp32 = pod_spatial_loss([m.float() for m in maps], [m.float() for m in old_maps])
    assert in_bf16.dtype == torch.float32
    assert in_bf16.item() == pytest.approx(in_fp32.item(), rel=1e-6)
