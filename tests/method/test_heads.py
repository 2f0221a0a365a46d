"""Head types (method/heads.py) by hand, and how the incremental net grows, scores and reloads them."""

import math

import pytest
import torch
import torch.nn.functional as F

from method.backbones import IncrementalNet
from method.heads import HEADS, reduce_proxies
from method.losses import nca_loss


class Flat(torch.nn.Module):
    feature_dim = 2

    def forward(self, x):
        return x


def test_the_registry_lists_the_head_types():
    assert set(HEADS) == {"linear", "cosine", "lsc"}
    assert (HEADS["linear"].proxies, HEADS["cosine"].proxies, HEADS["lsc"].proxies) == (1, 1, 10)


def test_cosine_logits_by_hand():
    net = IncrementalNet(Flat(), "cosine")
    net.add_head(2)
    with torch.no_grad():
        net.head_weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        net.head_scale.fill_(4.0)
    features = torch.tensor([[3.0, 0.0]])
    # cos to (1, 0) is 1, to (1, 1)/sqrt 2 is 1/sqrt 2; sigma 4 scales the logits, not the similarities.
    outputs = net.outputs(features)
    assert outputs.similarities[0].tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert outputs.logits[0].tolist() == pytest.approx([4.0, 4 / math.sqrt(2)])
    assert torch.equal(net(features), outputs.logits)


def test_two_proxies_reduce_by_their_softmax_and_feed_nca():
    # One class with proxy similarities (0, ln 3): softmax weights (1/4, 3/4) -> 3/4 ln 3.
    # Another class with (1, 1): weights (1/2, 1/2) -> 1.
    similarities = torch.tensor([[0.0, math.log(3.0), 1.0, 1.0]])
    reduced = reduce_proxies(similarities, 2)
    assert reduced[0].tolist() == pytest.approx([0.75 * math.log(3.0), 1.0])
    # NCA on the reduced similarities, target 1: -log softmax_1 of (s0, s1), the margin shifting both.
    s0, s1 = 0.75 * math.log(3.0), 1.0
    expected = -(s1 - math.log(math.exp(s0) + math.exp(s1)))
    assert nca_loss(reduced, torch.tensor([1]), margin=0.6).item() == pytest.approx(expected, rel=1e-6)


def test_lsc_rows_grow_by_ten_per_class_and_reload():
    torch.manual_seed(0)
    net = IncrementalNet(Flat(), "lsc", class_scaling=True)
    net.add_head(2)
    net.add_head(3)
    assert net.head_weight.shape == (50, 2) and net.num_classes == 5
    assert net.class_scale.tolist() == [1.0] * 5
    assert net.head_rows(2) == slice(20, None)
    assert net.class_weight_norms().shape == (5,)
    # A saved state loads into heads rebuilt from the sizes, and scores the same.
    with torch.no_grad():
        net.class_scale.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0]))
    again = IncrementalNet(Flat(), "lsc", class_scaling=True)
    again.set_head_sizes([2, 3])
    again.load_state_dict(net.state_dict())
    x = torch.randn(4, 2)
    assert torch.equal(again.scores(x), net.scores(x))
    # The scaling is for test-time scores only: forward (a teacher's logits) leaves it out. PODNet's
    # reference scores test images without sigma: sigma -2 would flip the argmax, and does not here.
    with torch.no_grad():
        net.head_scale.fill_(-2.0)
    assert torch.allclose(net.scores(x), net.outputs(x).similarities * net.class_scale)
    assert torch.allclose(net(x), -2.0 * net.outputs(x).similarities)


def test_linear_heads_are_drawn_as_nn_linear():
    torch.manual_seed(3)
    net = IncrementalNet(Flat())
    net.add_head(3)
    torch.manual_seed(3)
    reference = torch.nn.Linear(2, 3)
    assert torch.equal(net.head_weight, reference.weight) and torch.equal(net.head_bias, reference.bias)
    assert not hasattr(net, "head_scale") and not hasattr(net, "class_scale")
    x = torch.randn(2, 2)
    assert torch.equal(net.scores(x), F.linear(x, reference.weight, reference.bias))
