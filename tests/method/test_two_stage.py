"""The second stages: the classifier refit (`refit_heads`: exact warm start, scale-free,
class-balanced) and Long-Tailed-CIL's LWS (method/two_stage.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from method.backbones import IncrementalNet
from method.trainer import refit_heads
from method.two_stage import ClassAwareSampler, learn_weight_scaling, learning_rates_after


def blobs(counts, spread=1.0, seed=0):
    """Gaussian blobs in 8 dimensions, one per class, `counts[c]` points each."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), 8, generator=g) * 3
    x = torch.cat([centres[c] + spread * torch.randn(n, 8, generator=g) for c, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return x, y


def refit(x, y, weight, bias, epochs=10, seed=0):
    return refit_heads(x, y, weight, bias, epochs=epochs, lr=0.01, batch_size=32, generator=torch.Generator().manual_seed(seed))


def test_zero_epochs_give_back_the_heads_exactly_folded():
    x, y = blobs([50, 30, 10])
    weight, bias = torch.randn(3, 8), torch.randn(3)
    new_weight, new_bias = refit(x, y, weight, bias, epochs=0)
    torch.testing.assert_close(new_weight, weight)
    torch.testing.assert_close(new_bias, bias, atol=1e-5, rtol=1e-5)


def test_the_refit_does_not_depend_on_the_feature_scale():
    # Features of 1e8 (a backbone with BatchNorm statistics from a few batches) gave NaN heads
    # with plain SGD; here the logits are the same as at unit scale.
    x, y = blobs([200, 20, 5])
    zero_w, zero_b = torch.zeros(3, 8), torch.zeros(3)
    w1, b1 = refit(x, y, zero_w, zero_b)
    big = x * 1e8
    w2, b2 = refit(big, y, zero_w, zero_b)
    assert torch.isfinite(w2).all() and torch.isfinite(b2).all()
    logits_small, logits_big = x @ w1.T + b1, big @ w2.T + b2
    torch.testing.assert_close(logits_big, logits_small, atol=1e-2, rtol=1e-3)


def test_balanced_draws_undo_a_head_biased_to_the_majority_class():
    x, y = blobs([400, 20, 8], spread=1.5)
    weight = torch.zeros(3, 8)
    bias = torch.tensor([20.0, 0.0, 0.0])  # everything predicted as class 0
    assert ((x @ weight.T + bias).argmax(1) == 0).all()
    new_weight, new_bias = refit(x, y, weight, bias, epochs=30)
    predicted = (x @ new_weight.T + new_bias).argmax(1)
    recall = [(predicted[y == c] == c).float().mean().item() for c in range(3)]
    assert min(recall) > 0.8, recall


# ------------------------------------------------------------------ LWS (method/two_stage.py)


def test_class_aware_draws_come_four_of_a_class_and_balance_the_classes():
    # 96 images: 24 runs of 4 an epoch, 8 cycles over the 3 classes, so 32 draws of each class.
    labels = torch.tensor([0] * 80 + [1] * 12 + [2] * 4)
    sampler = ClassAwareSampler(labels, torch.Generator().manual_seed(0))
    epochs = [sampler.epoch() for _ in range(3)]  # the cycles carry on from epoch to epoch
    for drawn in epochs:
        assert len(drawn) == 96
        runs = labels[drawn].reshape(-1, 4)
        assert (runs == runs[:, :1]).all()
        assert torch.bincount(labels[drawn]).tolist() == [32, 32, 32]
        # Each class's images come in cycles: class 2's four images 8 times each.
        assert torch.bincount(drawn[labels[drawn] == 2] - 92).tolist() == [8, 8, 8, 8]
    # Class 1's twelve: 96 draws over three epochs are 8 whole cycles.
    drawn = torch.cat(epochs)
    assert torch.bincount(drawn[labels[drawn] == 1] - 80).tolist() == [8] * 12
    assert not torch.equal(epochs[0], epochs[1])


def test_the_cosine_schedule_by_hand():
    assert learning_rates_after(15, 30, 0.1, 0.1) == pytest.approx((0.05, 0.005))
    assert learning_rates_after(30, 30, 0.1, 0.1) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert learning_rates_after(10, 30, 0.1, 0.1)[0] == pytest.approx(0.05 * (1 + math.cos(math.pi / 3)))


class Flat(torch.nn.Module):
    feature_dim = 2

    def forward(self, x):
        return x


def test_one_lws_step_by_hand_trains_the_newest_head_and_every_scale():
    torch.manual_seed(0)
    net = IncrementalNet(Flat(), class_scaling=True)
    net.add_head(2)
    net.add_head(1)
    with torch.no_grad():
        net.class_scale.copy_(torch.tensor([1.0, 0.5, 2.0]))  # scales that earlier tasks learnt
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 2, 2])

    # The reference: CE of (W x + b) * s on the sampler's draws (one class, four images, one batch);
    # SGD's first step is lr (grad + wd p) in both groups.
    order = ClassAwareSampler(y, torch.Generator().manual_seed(0)).epoch()
    w, b, s = (before[k].clone().requires_grad_() for k in ("head_weight", "head_bias", "class_scale"))
    loss = F.cross_entropy(F.linear(x[order], w, b) * s, y[order])
    gw, gb, gs = torch.autograd.grad(loss, [w, b, s])
    lr, wd = 0.1, 5e-4
    expected_w = before["head_weight"].clone()
    expected_w[2:] -= lr * (gw[2:] + wd * expected_w[2:])
    expected_b = before["head_bias"].clone()
    expected_b[2:] -= lr * (gb[2:] + wd * expected_b[2:])
    expected_s = before["class_scale"] - lr * (gs + wd * before["class_scale"])

    def batches(order):
        yield x[order], y[order]

    learn_weight_scaling(
        net, batches, y, num_old=2, epochs=1, lr=lr, scaling_lr_factor=0.1, momentum=0.9, weight_decay=wd,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.allclose(net.head_weight, expected_w, atol=1e-6)
    assert torch.equal(net.head_weight[:2], before["head_weight"][:2])  # the old head: untouched
    assert torch.allclose(net.head_bias, expected_b, atol=1e-6) and torch.equal(net.head_bias[:2], before["head_bias"][:2])
    assert torch.allclose(net.class_scale, expected_s, atol=1e-6)
