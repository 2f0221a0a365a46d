"""DGR's gradient reweighting: hand numbers, and the fused step against a per-row reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method.backbones import IncrementalNet
from method.config import LearnerConfig
from method.learners import TaskContext, make_learner
from method.losses import dakd_loss
from method.reweighting import (
    attenuation_gamma,
    balance_ratios,
    group_ratios,
    head_gradient_norms,
    kd_magnitude_ratio,
)
from method.trainer import training_step


def test_balance_ratio_by_hand():
    phi = torch.tensor([2.0, 4.0, 1.0, 3.0])
    assert torch.allclose(balance_ratios(phi), torch.tensor([0.5, 0.25, 1.0, 1 / 3]))
    old = torch.tensor([True, True, False, False])
    # old group min 2: [2/2, 2/4]; new group min 1: [1/1, 1/3]
    assert torch.allclose(balance_ratios(phi, old), torch.tensor([1.0, 0.5, 1.0, 1 / 3]))


def test_group_ratios_and_gamma_by_hand():
    gamma = attenuation_gamma(1.0, n_seen=300, n_new=100)
    assert gamma == pytest.approx(math.exp(-0.75))
    phi = torch.tensor([2.0, 4.0, 1.0, 3.0])
    old = torch.tensor([True, True, False, False])
    # m_old = 3, m_new = 2: r_old = min(1, 2/3), r_new = min(1, gamma * 2/3)
    r = group_ratios(phi, old, gamma)
    assert torch.allclose(r, torch.tensor([2 / 3, 2 / 3, gamma * 2 / 3, gamma * 2 / 3]))
    # new classes with the larger accumulated norms: r_old clips at 1
    r = group_ratios(torch.tensor([1.0, 1.0, 4.0, 4.0]), old, 0.5)
    assert torch.allclose(r, torch.tensor([1.0, 1.0, 1.0, 1.0]))


def test_kd_magnitude_ratio_by_hand():
    rho = kd_magnitude_ratio(torch.tensor([3.0, 4.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert rho.item() == pytest.approx(5.0)
    assert kd_magnitude_ratio(torch.tensor([3.0]), torch.tensor([0.0, 0.0])).item() == 0.0


def test_head_gradient_norms_equal_autograd_rows():
    torch.manual_seed(0)
    features = torch.randn(6, 4)
    weight = torch.randn(3, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = features @ weight.t()
    loss = F.cross_entropy(logits, targets)
    (weight_grad,) = torch.autograd.grad(loss, weight, retain_graph=True)
    (logit_grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(head_gradient_norms(logit_grad, features), weight_grad.norm(dim=1), atol=1e-6)


# ---------------------------------------------------------------- the fused step vs a reference


class TinyBackbone(nn.Module):
    feature_dim = 5

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(7, 5)

    def forward(self, x):
        return torch.tanh(self.layer(x))


def tiny_model(head_sizes, seed=0):
    torch.manual_seed(seed)
    model = IncrementalNet(TinyBackbone())
    for size in head_sizes:
        model.add_head(size)
    return model


def context(task, head_sizes, class_counts, original_counts):
    num_old = sum(head_sizes[:-1])
    original = torch.tensor(original_counts)
    return TaskContext(
        task=task,
        num_old=num_old,
        num_seen=sum(head_sizes),
        class_counts=torch.tensor(class_counts),
        original_counts=original,
        n_seen=int(original[:num_old].sum()),
        n_new=int(original[num_old:].sum()),
    )


def case(task):
    """Task 0: three classes of 50/20/5 images. Task 1: those three as exemplars (4/4/3) + two new."""
    head_sizes = [3] if task == 0 else [3, 2]
    original = [50, 20, 5] + ([40, 8] if task else [])
    counts = original if task == 0 else [4, 4, 3, 40, 8]
    return head_sizes, context(task, head_sizes, counts, original)


def reference_dgr_step(model, old_model, ctx, x, y, steps, lr=0.1, wd=5e-4, lambda_b=0.7, a=1.0, T=2.0):
    """method.md §3 written row by row with Python floats, using autograd on the full model."""
    params = list(model.parameters())
    momentum_buffers = [None] * len(params)
    phi = [0.0] * ctx.num_seen
    counts = ctx.class_counts.double()
    log_prior = torch.log(counts / counts.sum()).float()
    old = list(range(ctx.num_old))
    new = list(range(ctx.num_old, ctx.num_seen))
    for _ in range(steps):
        logits = model(x)
        l_ce = F.cross_entropy(logits + log_prior, y)
        ce_w, ce_b = torch.autograd.grad(l_ce, [model.head_weight, model.head_bias], retain_graph=True)
        total = l_ce
        if ctx.num_old:
            with torch.no_grad():
                old_logits = old_model(x)[:, : ctx.num_old]
            removed = (ctx.original_counts - ctx.class_counts)[: ctx.num_old].float()
            beta = lambda_b * math.sqrt(ctx.n_seen / ctx.n_new)
            l_kd = beta * T**2 * dakd_loss(logits[:, : ctx.num_old], old_logits, removed, T)
            kd_w, kd_b = torch.autograd.grad(l_kd, [model.head_weight, model.head_bias], retain_graph=True)
            total = l_ce + l_kd
        backbone_params = list(model.backbone.parameters())
        backbone_grads = torch.autograd.grad(total, backbone_params)
        g = [ce_w[c].norm().item() for c in range(ctx.num_seen)]
        for c in range(ctx.num_seen):
            phi[c] += g[c]
        head_w = torch.zeros_like(model.head_weight)
        head_b = torch.zeros_like(model.head_bias)
        if not ctx.num_old:
            for c in range(ctx.num_seen):
                alpha = min(phi) / phi[c]
                head_w[c] = alpha * ce_w[c]
                head_b[c] = alpha * ce_b[c]
        else:
            gamma = math.exp(-a * ctx.n_seen / (ctx.n_seen + ctx.n_new))
            m_old = sum(phi[c] for c in old) / len(old)
            m_new = sum(phi[c] for c in new) / len(new)
            r_old, r_new = min(1.0, m_new / m_old), min(1.0, gamma * m_new / m_old)
            w = {}
            for c in old:
                w[c] = min(phi[m] for m in old) / phi[c] * r_old
            for c in new:
                w[c] = min(phi[m] for m in new) / phi[c] * r_new
            k = [kd_w[c].norm().item() for c in old]
            rho = math.sqrt(sum((w[c] * g[c]) ** 2 for c in range(ctx.num_seen))) / math.sqrt(sum(v * v for v in k))
            for c in old:
                head_w[c] = w[c] * ce_w[c] + rho * kd_w[c]
                head_b[c] = w[c] * ce_b[c] + rho * kd_b[c]
            for c in new:
                head_w[c] = w[c] * ce_w[c]
                head_b[c] = w[c] * ce_b[c]
        grads = dict(zip(map(id, backbone_params), backbone_grads))
        grads[id(model.head_weight)] = head_w
        grads[id(model.head_bias)] = head_b
        with torch.no_grad():  # plain SGD with momentum; decay added after the reweighting
            for i, p in enumerate(params):
                d = grads[id(p)] + wd * p
                momentum_buffers[i] = d.clone() if momentum_buffers[i] is None else 0.9 * momentum_buffers[i] + d
                p -= lr * momentum_buffers[i]
    return head_w, head_b


@pytest.mark.parametrize("task", [0, 1])
def test_fused_dgr_step_matches_per_row_reference(task):
    head_sizes, ctx = case(task)
    torch.manual_seed(1)
    x = torch.randn(16, 7)
    y = torch.randint(0, sum(head_sizes), (16,))
    fused, reference = tiny_model(head_sizes), tiny_model(head_sizes)
    old_model = None
    if task:
        old_model = tiny_model(head_sizes[:-1], seed=3)
        old_model.add_head(2)
        old_model.eval()
    learner = make_learner(LearnerConfig(name="dgr"))
    learner.begin_task(ctx)
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):  # several steps so the accumulated norms Phi matter
        training_step(fused, old_model, learner, x, y, optimizer)
    ref_w, ref_b = reference_dgr_step(reference, old_model, ctx, x, y, steps=3)
    assert torch.allclose(fused.head_weight.grad, ref_w, atol=1e-5)
    assert torch.allclose(fused.head_bias.grad, ref_b, atol=1e-5)
    for (name, p_fused), p_ref in zip(fused.named_parameters(), reference.parameters()):
        assert torch.allclose(p_fused, p_ref, atol=1e-5), name


def test_reweighting_leaves_backbone_gradient_untouched():
    """The backbone gets the plain gradient of L_ce + L_kd, whatever the heads receive."""
    head_sizes, ctx = case(1)
    torch.manual_seed(2)
    x, y = torch.randn(8, 7), torch.randint(0, 5, (8,))
    model = tiny_model(head_sizes)
    old_model = tiny_model([3, 2], seed=5).eval()
    learner = make_learner(LearnerConfig(name="dgr"))
    learner.begin_task(ctx)
    logits = model(x)
    terms = learner.loss_terms(logits, old_model(x)[:, :3].detach(), y)
    expected = torch.autograd.grad(sum(terms.values()), list(model.backbone.parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the parameters
    training_step(model, old_model, learner, x, y, optimizer)
    for p, g in zip(model.backbone.parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6)
    # and the heads' gradient really was reweighted (differs from the plain one)
    plain_w = torch.autograd.grad(sum(learner.loss_terms(model(x), old_model(x)[:, :3].detach(), y).values()), model.head_weight)[0]
    assert not torch.allclose(model.head_weight.grad, plain_w, atol=1e-4)


@pytest.mark.parametrize("switch", ["intra_phase_reweighting", "inter_phase_reweighting"])
def test_ablation_switches_give_the_plain_head_gradient(switch):
    task = 0 if switch == "intra_phase_reweighting" else 1
    head_sizes, ctx = case(task)
    cfg = LearnerConfig(name="dgr")
    setattr(cfg.dgr, switch, False)
    learner = make_learner(cfg)
    learner.begin_task(ctx)
    torch.manual_seed(4)
    x, y = torch.randn(8, 7), torch.randint(0, sum(head_sizes), (8,))
    model = tiny_model(head_sizes)
    old_model = tiny_model(head_sizes, seed=6).eval() if task else None
    old_logits = old_model(x)[:, :3].detach() if task else None
    plain = torch.autograd.grad(sum(learner.loss_terms(model(x), old_logits, y).values()), model.head_weight)[0]
    training_step(model, old_model, learner, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    assert torch.allclose(model.head_weight.grad, plain, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task", [0, 1])
def test_step_runs_on_cuda_without_host_synchronisation(task):
    head_sizes, ctx = case(task)
    ctx.class_counts, ctx.original_counts = ctx.class_counts.cuda(), ctx.original_counts.cuda()
    model = tiny_model(head_sizes).cuda()
    old_model = tiny_model(head_sizes, seed=3).cuda().eval() if task else None
    learner = make_learner(LearnerConfig(name="dgr"))
    learner.begin_task(ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(16, 7, device="cuda")
    y = torch.randint(0, sum(head_sizes), (16,), device="cuda")
    training_step(model, old_model, learner, x, y, optimizer)  # first step allocates buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            training_step(model, old_model, learner, x, y, optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(model.head_weight).all()


@pytest.mark.parametrize("name", ["finetune", "replay", "lwf", "icarl", "wa"])
def test_baseline_steps_equal_plain_autograd(name):
    """Without reweighting, the fused step is ordinary backpropagation of the summed loss."""
    head_sizes, ctx = case(1)
    learner = make_learner(LearnerConfig(name=name))
    learner.begin_task(ctx)
    torch.manual_seed(7)
    x, y = torch.randn(12, 7), torch.randint(0, 5, (12,))
    model, reference = tiny_model(head_sizes), tiny_model(head_sizes)
    old_model = tiny_model(head_sizes, seed=8).eval()
    old_logits = old_model(x)[:, :3].detach() if learner.distills else None
    expected = torch.autograd.grad(sum(learner.loss_terms(reference(x), old_logits, y).values()), list(reference.parameters()))
    training_step(model, old_model, learner, x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    for (param_name, p), g in zip(model.named_parameters(), expected):
        assert torch.allclose(p.grad, g, atol=1e-6), param_name
