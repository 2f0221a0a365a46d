"""The two-stage classifier refit (`refit_heads`): exact warm start, scale-free, class-balanced."""

import torch

from method.trainer import refit_heads


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
