"""Checks of exemplar selection on features whose answer is known, and of memory bookkeeping."""

import pytest
import torch

from method.memory import ExemplarMemory, budget_per_class, herding_order, random_order


def naive_herding(features, k):
    """A slow, loop-over-everything version of the reference's herding, to compare against."""
    f = features / features.norm(dim=1, keepdim=True)
    mu = f.mean(0)
    chosen, total = [], torch.zeros_like(mu)
    for i in range(min(k, len(f))):
        best, best_d = None, None
        for j in range(len(f)):
            if j in chosen:
                continue
            d = float(((total + f[j]) / (i + 1) - mu).norm())
            if best_d is None or d < best_d:
                best, best_d = j, d
        chosen.append(best)
        total = total + f[best]
    return chosen


def test_herding_first_pick_is_nearest_the_normalised_mean():
    # Normalised: (1,0), (0,1), (1,1)/sqrt2. Mean = ((1+0.707)/3, (1+0.707)/3) = (0.569, 0.569);
    # distance of (0.707, 0.707) is 0.195, of the axes 0.714, so the diagonal goes first.
    # Without normalisation the mean is (2.33, 1.5) and index 0 (distance 1.64) would go first
    # instead of index 2 (distance 3.0), so this also checks the normalisation.
    feats = torch.tensor([[3.0, 0.0], [0.0, 0.5], [4.0, 4.0]])
    order = herding_order(feats, 3)
    assert order.dtype == torch.long
    assert order[0].item() == 2
    assert sorted(order.tolist()) == [0, 1, 2]


def test_herding_uses_normalised_features():
    # After normalisation the picks are invariant to positive per-row scaling.
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 8, generator=g)
    scales = torch.rand(30, 1, generator=g) * 10 + 0.1
    assert herding_order(feats, 10).tolist() == herding_order(feats * scales, 10).tolist()


def test_herding_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 16, generator=g, dtype=torch.float64)
    assert herding_order(feats, 15).tolist() == naive_herding(feats, 15)


def test_herding_never_repeats_even_with_identical_features():
    feats = torch.ones(5, 3)  # every sample is the class mean
    order = herding_order(feats, 5)
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]


def test_herding_k_larger_than_n_returns_all():
    feats = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    order = herding_order(feats, 20)
    assert len(order) == 4 and sorted(order.tolist()) == [0, 1, 2, 3]
    assert herding_order(feats, 0).numel() == 0


def test_herding_prefix_is_smaller_selection():
    feats = torch.randn(25, 5, generator=torch.Generator().manual_seed(3))
    assert herding_order(feats, 5).tolist() == herding_order(feats, 12)[:5].tolist()


def test_random_order_respects_k_and_seed():
    a = random_order(10, 4, torch.Generator().manual_seed(7))
    b = random_order(10, 4, torch.Generator().manual_seed(7))
    c = random_order(10, 4, torch.Generator().manual_seed(8))
    assert a.tolist() == b.tolist()
    assert len(a) == 4 and len(set(a.tolist())) == 4 and all(0 <= i < 10 for i in a.tolist())
    assert a.tolist() != c.tolist()  # different seed, different draw (fixed seeds: checked)
    full = random_order(3, 10, torch.Generator().manual_seed(7))
    assert sorted(full.tolist()) == [0, 1, 2]


def test_budget_per_class():
    assert budget_per_class("per_class", 20, 2000, 50) == 20
    assert budget_per_class("total", 20, 2000, 30) == 66  # 2000 // 30 = 66
    assert budget_per_class("total", 20, 2000, 100) == 20
    assert budget_per_class("total", 20, 10, 30) == 1  # 10 // 30 = 0, floored at 1
    assert budget_per_class("none", 20, 2000, 30) == 0
    with pytest.raises(ValueError):
        budget_per_class("bogus", 20, 2000, 30)


def test_memory_update_shrink_keeps_prefixes():
    mem = ExemplarMemory()
    mem.update(3, torch.tensor([30, 31, 32, 33]))
    mem.update(1, [10, 11, 12])
    assert len(mem) == 7
    assert mem.counts() == {1: 3, 3: 4}
    assert mem.indices().tolist() == [10, 11, 12, 30, 31, 32, 33]  # class order
    mem.shrink(2)
    assert mem.counts() == {1: 2, 3: 2}
    assert mem.indices().tolist() == [10, 11, 30, 31]
    mem.shrink(5)  # growing the cap does not invent exemplars
    assert len(mem) == 4
    mem.update(1, [19])  # replaces, not appends
    assert mem.indices().tolist() == [19, 30, 31]


def test_memory_empty():
    mem = ExemplarMemory()
    assert len(mem) == 0 and mem.counts() == {}
    assert mem.indices().dtype == torch.long and mem.indices().numel() == 0


def test_memory_rejects_duplicates():
    with pytest.raises(ValueError):
        ExemplarMemory().update(0, [1, 1])


def test_memory_state_dict_round_trip(tmp_path):
    mem = ExemplarMemory()
    mem.update(0, [5, 2, 9])
    mem.update(2, [7])
    state = mem.state_dict()
    mem.update(0, [1])  # the saved state must not alias the live memory
    path = tmp_path / "mem.pt"
    torch.save(state, path)
    restored = ExemplarMemory()
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.counts() == {0: 3, 2: 1}
    assert restored.indices().tolist() == [5, 2, 9, 7]
