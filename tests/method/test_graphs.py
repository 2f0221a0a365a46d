"""`train.cuda_graph`: the graphed step trains exactly as the eager one (CUDA only), and is refused elsewhere."""

import copy

import pytest
import torch

from method.backbones import IncrementalNet
from method.config import LearnerConfig, RunConfig
from method.graphs import graph_inference, graph_training_forward
from method.learners import TaskContext, make_learner
from method.trainer import IncrementalTrainer, frozen_teacher, training_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fp32():
    return torch.autocast("cuda", enabled=False)


def test_cuda_graph_is_refused_without_cuda():
    cfg = RunConfig(device="cpu")
    cfg.train.cuda_graph = True
    with pytest.raises(ValueError, match="train.cuda_graph needs a CUDA device"):
        IncrementalTrainer(cfg, benchmark=object())


def task_one():
    """Task 1 of a 3 + 2 split: exemplars of 3 old classes and two new ones, on CUDA."""
    original = torch.tensor([50, 20, 5, 40, 8], device="cuda")
    counts = torch.tensor([4, 4, 3, 40, 8], device="cuda")
    return TaskContext(task=1, num_old=3, num_seen=5, class_counts=counts, original_counts=original, n_seen=75, n_new=48)


def student_and_teacher():
    """A ResNet-32 at task 1 (3 old + 2 new classes) on CUDA, and its frozen task-0 teacher."""
    torch.manual_seed(0)
    model = IncrementalNet("resnet32").cuda()
    model.add_head(3)
    teacher = frozen_teacher(model)
    model.add_head(2)
    return model, teacher


def dgr_learner():
    learner = make_learner(LearnerConfig(name="dgr"))
    learner.begin_task(task_one())
    return learner


def batches(sizes, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for size in sizes:
        x = torch.randn(size, 3, 32, 32, device="cuda", generator=generator)
        yield x, torch.randint(0, 5, (size,), device="cuda", generator=generator)


@needs_cuda
def test_graphed_dgr_step_trains_as_the_eager_step():
    model, teacher = student_and_teacher()
    graphed_model = copy.deepcopy(model)
    sizes = [16, 16, 16, 10]  # the last, shorter batch runs eagerly
    results = []
    for net, graphed in ((model, False), (graphed_model, True)):
        learner = dgr_learner()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        net.train()
        backbone, old = net.backbone, teacher
        for i, (x, y) in enumerate(batches(sizes)):
            if graphed and i == 0:
                backbone = graph_training_forward(net.backbone, x, fp32)
                old = graph_inference(teacher, x, fp32)
            training_step(net, old, learner, x, y, optimizer, backbone=backbone)
        results.append(net.state_dict())
    eager, graphed = results
    for name in eager:
        assert torch.allclose(graphed[name].float(), eager[name].float(), rtol=1e-3, atol=1e-4), name


@needs_cuda
def test_graphed_step_runs_without_host_synchronisation():
    model, teacher = student_and_teacher()
    learner = dgr_learner()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    data = list(batches([32] * 4))
    backbone = graph_training_forward(model.backbone, data[0][0], fp32)
    old = graph_inference(teacher, data[0][0], fp32)
    training_step(model, old, learner, *data[0], optimizer, backbone=backbone)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data[1:]:
            training_step(model, old, learner, x, y, optimizer, backbone=backbone)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(model.head_weight).all()
