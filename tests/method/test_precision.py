"""bf16 autocast on CPU: the same step as fp32 up to bf16 rounding, with fp32 head gradients."""

import copy

import torch

from method.backbones import IncrementalNet
from method.config import LearnerConfig
from method.learners import TaskContext, make_learner
from method.trainer import frozen_teacher, training_step


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_dgr_step_follows_the_fp32_step():
    torch.manual_seed(0)
    model = IncrementalNet("resnet32")
    model.add_head(3)
    teacher = frozen_teacher(model)
    model.add_head(2)
    ctx = TaskContext(task=1, num_old=3, num_seen=5, class_counts=torch.tensor([4, 4, 3, 40, 8]),
                      original_counts=torch.tensor([50, 20, 5, 40, 8]), n_seen=75, n_new=48)  # fmt: skip
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (32,))
    runs = []
    for autocast in (None, bf16):
        net = copy.deepcopy(model).train()
        before = [p.detach().clone() for p in net.parameters()]
        learner = make_learner(LearnerConfig(name="dgr"))
        learner.begin_task(ctx)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = training_step(net, teacher, learner, x, y, optimizer, **({"autocast": autocast} if autocast else {}))
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert net.head_weight.grad.dtype == torch.float32  # the reweighting runs in fp32
        update = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])
        runs.append((loss, net.head_weight.grad.flatten(), update))
    (loss32, head32, update32), (loss16, head16, update16) = runs
    assert not torch.equal(update32, update16)  # autocast really ran in bf16
    assert abs(loss16 - loss32) < 0.01 * loss32
    # Heads see bf16-rounded features only; the backbone's gradient passes 30 bf16 layers, and
    # at initialisation a 32-layer network's gradient is small against that rounding (even
    # fp32 differs from fp64 by about 1%), so the whole update agrees only in direction.
    assert torch.nn.functional.cosine_similarity(head16, head32, dim=0) > 0.99
    assert torch.nn.functional.cosine_similarity(update16, update32, dim=0) > 0.8
