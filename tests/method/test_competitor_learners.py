"""LUCIR, PODNet and EEIL steps against the reference's losses, written here with torch.nn's modules
as src/approach/{lucir,podnet,eeil}.py write them, and the parameters it trains."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from method.backbones import IncrementalNet, ResNet32
from method.config import LearnerConfig
from method.learners import TaskContext, make_learner
from method.trainer import autograd_step, frozen_teacher, training_step

LR, WEIGHT_DECAY = 0.1, 5e-4


def lucir():
    cfg = LearnerConfig(name="lucir")
    cfg.lucir.lambda_base = 5.0  # CIFAR's, as resolve_dataset_defaults sets it
    return make_learner(cfg)


def two_task_model(learner, seed=0):
    """The learner's net after a first task of 3 classes, with a second head of 2; its frozen copy."""
    torch.manual_seed(seed)
    model = IncrementalNet(ResNet32(blocks_per_stage=1), learner.head)
    learner.shape_backbone(model.backbone)
    model.add_head(3)
    with torch.no_grad():
        if learner.head != "linear":
            model.head_scale.fill_(3.0)  # a trained sigma, not the initial 1
    old = frozen_teacher(model, fold=not learner.needs_maps)
    model.add_head(2)
    counts = torch.tensor([9, 7, 5, 8, 2])
    learner.begin_task(
        TaskContext(task=1, num_old=3, num_seen=5, class_counts=counts, original_counts=counts, n_seen=21, n_new=10, head_sizes=(3, 2))
    )
    return model, old


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 4, 0, 3, 1])


def sgd_by_hand(model, loss, trained, first_row=0):
    """One step of the reference's SGD (momentum's first step is the gradient) over `trained` names;
    of head_weight, only the rows from `first_row` (the newest head's, where the old are frozen)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in trained], allow_unused=True)
    with torch.no_grad():
        for name, grad in zip(trained, grads):
            if grad is None:
                continue
            rows = slice(first_row, None) if name == "head_weight" else slice(None)
            params[name][rows] -= LR * (grad[rows] + WEIGHT_DECAY * params[name][rows])
    return model


def compare_with_our_step(learner, model, old, x, y, reference_loss, trained, step=autograd_step, first_row=0):
    ours = copy.deepcopy(model)
    theirs = copy.deepcopy(model)
    ours.train(), theirs.train()
    optimizer = torch.optim.SGD(ours.parameters(), lr=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    step(ours, old, learner, x, y, optimizer)
    sgd_by_hand(theirs, reference_loss(theirs), trained, first_row)
    for (name, mine), (_, expected) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.allclose(mine, expected, atol=1e-6), name
    return ours


def test_lucir_step_is_the_reference_loss_with_old_heads_frozen():
    learner = lucir()
    model, old = two_task_model(learner)
    x, y = batch()
    # Eq. 7: lambda = 5 * sqrt(3 old / 2 new).
    assert learner.less_forget_weight == pytest.approx(5 * math.sqrt(3 / 2))

    def reference_loss(net):
        features = net.backbone(x)
        cosines = F.linear(F.normalize(features), F.normalize(net.head_weight))
        loss = nn.CrossEntropyLoss()(net.head_scale * cosines, y)
        old_features = old.backbone(x)
        loss = loss + nn.CosineEmbeddingLoss()(features, old_features, torch.ones(8)) * 5 * math.sqrt(3 / 2)
        hard = y < 3
        gt = cosines.gather(1, y[:, None])[hard].repeat(1, 2)
        top = cosines[hard, 3:].topk(2, dim=1)[0]
        return loss + nn.MarginRankingLoss(margin=0.5)(gt.reshape(-1), top.reshape(-1), torch.ones(int(hard.sum()) * 2))

    # The reference's optimiser: the backbone and the newest head (its rows and the shared sigma).
    trained = [n for n, _ in model.named_parameters() if n.startswith("backbone.")] + ["head_weight", "head_scale"]
    before = model.head_weight.detach().clone()
    ours = compare_with_our_step(learner, model, old, x, y, reference_loss, trained, first_row=3)
    # The reference leaves the old heads out of its optimiser: their rows are bitwise unchanged.
    assert torch.equal(ours.head_weight[:3], before[:3]) and not torch.equal(ours.head_weight[3:], before[3:])
    assert ours.head_scale.item() != 3.0


def test_lucir_removes_only_the_last_relu():
    learner = lucir()
    model, _ = two_task_model(learner)
    blocks = [b for s in (model.backbone.stage1, model.backbone.stage2, model.backbone.stage3) for b in s]
    assert [b.final_relu for b in blocks] == [True, True, False]
    assert (model.outputs(batch()[0]).features < 0).any()  # features take both signs


def test_podnet_step_is_the_reference_loss():
    learner = make_learner(LearnerConfig(name="podnet"))
    model, old = two_task_model(learner)
    x, y = batch()
    factor = math.sqrt(5 / 2)  # classes seen / new classes
    assert learner.class_factor == pytest.approx(factor)

    def reference_loss(net):
        maps = net.backbone.stage_maps(x)
        features = net.backbone.pool(maps[-1])
        proxies = F.linear(F.normalize(features), F.normalize(net.head_weight)).view(8, 5, 10)
        reduced = (F.softmax(proxies, dim=-1) * proxies).sum(-1)
        loss = F.cross_entropy(1.0 * (net.head_scale * reduced - 0.6), y)
        old_maps = old.backbone.stage_maps(x)
        old_features = old.backbone.pool(old_maps[-1])
        loss = loss + F.cosine_embedding_loss(features, old_features, torch.ones(8)) * 1.0 * factor
        spatial = 0.0
        for a, b in zip(old_maps, maps):
            a, b = a.pow(2), b.pow(2)
            a = torch.cat([a.sum(dim=3).view(8, -1), a.sum(dim=2).view(8, -1)], dim=-1)
            b = torch.cat([b.sum(dim=3).view(8, -1), b.sum(dim=2).view(8, -1)], dim=-1)
            spatial = spatial + torch.mean(torch.linalg.norm(F.normalize(a, dim=1) - F.normalize(b, dim=1), dim=-1))
        return loss + spatial / 3 * 3.0 * factor

    trained = [n for n, _ in model.named_parameters() if n.startswith("backbone.")] + ["head_weight", "head_scale"]
    before = model.head_weight.detach().clone()
    ours = compare_with_our_step(learner, model, old, x, y, reference_loss, trained, first_row=30)
    assert torch.equal(ours.head_weight[:30], before[:30])  # three old classes, ten proxies each
    assert all(not b.final_relu for s in (ours.backbone.stage1, ours.backbone.stage2, ours.backbone.stage3) for b in s)


@pytest.mark.parametrize("finetuning, distilled", [(False, []), (True, [(0, 3)])])
def test_eeil_fused_step_is_the_reference_loss(finetuning, distilled):
    # At the second task the reference distils heads 0..t-2 (none) while training, 0..t-1 (head 0)
    # while fine-tuning; the fused step's gradients are the plain ones of that loss, on every parameter.
    learner = make_learner(LearnerConfig(name="eeil"))
    model, old = two_task_model(learner)
    learner.finetuning = finetuning
    x, y = batch()

    def reference_loss(net):
        outputs = net(x)
        loss = F.cross_entropy(outputs, y)
        old_outputs = old(x)
        for start, end in distilled:
            loss = loss + 1.0 * F.binary_cross_entropy(
                F.softmax(outputs[:, start:end] / 2, dim=1), F.softmax(old_outputs[:, start:end] / 2, dim=1)
            )
        return loss

    trained = [n for n, _ in model.named_parameters()]  # the reference trains every parameter
    compare_with_our_step(learner, model, old, x, y, reference_loss, trained, step=training_step)
    terms = learner.loss_terms(model(x), old(x)[:, :3], y)
    assert ("kd" in terms) == finetuning


def test_eeil_later_tasks_distil_all_but_the_last_old_head():
    learner = make_learner(LearnerConfig(name="eeil"))
    counts = torch.full((6,), 4)
    learner.begin_task(TaskContext(task=2, num_old=4, num_seen=6, class_counts=counts, original_counts=counts, n_seen=16, n_new=8, head_sizes=(2, 2, 2)))
    logits, old = torch.zeros(1, 6), torch.tensor([[0.0, math.log(3.0), 0.0, math.log(3.0)]])
    # Head (0, 2) only, ln 2 by hand (test_competitor_losses); the fine-tuning adds head (2, 4).
    assert learner.loss_terms(logits, old, torch.tensor([5]))["kd"].item() == pytest.approx(math.log(2))
    learner.finetuning = True
    assert learner.loss_terms(logits, old, torch.tensor([5]))["kd"].item() == pytest.approx(2 * math.log(2))


def test_podnet_shapes_resnet32_as_the_references_resnet32_podnet():
    # No ReLU after any block, zero-padded identity shortcuts: 463,504 backbone parameters, the count
    # the reference prints for resnet32_podnet less its first linear head (64 x 2 + 2).
    backbone = ResNet32()
    make_learner(LearnerConfig(name="podnet")).shape_backbone(backbone)
    assert sum(p.numel() for p in backbone.parameters()) == 463_504
    x = torch.randn(2, 3, 32, 32)
    shortcut = backbone.stage2[0].shortcut(backbone.stage1(F.relu(backbone.bn1(backbone.conv1(x)))))
    assert shortcut.shape == (2, 32, 16, 16) and torch.equal(shortcut[:, 16:], torch.zeros(2, 16, 16, 16))
