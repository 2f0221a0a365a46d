"""`train.cuda_graph`: the graphed step trains exactly as the eager one (CUDA only), and is refused elsewhere."""

import contextlib
import copy
import gc
import weakref
from types import SimpleNamespace

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


# ---------------------------------------------------------------------------------------------
# The capture calls, stubbed, so that these run without CUDA


def stub_make_graphed_callables(calls, modules=None):
    """Records each capture's keywords (and a weak reference to the module), and patches the
    module's forward as torch does: with a closure that refers back to the module."""

    def capture(module, sample_args, **options):
        calls.append(options)
        if modules is not None:
            modules.append(weakref.ref(module))
        original = module.forward

        def new_forward(*args):
            return original(*args) if module.training else None

        module.forward = new_forward
        return module

    return capture


def test_both_captures_are_thread_local(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stub_make_graphed_callables(calls))
    graph_training_forward(torch.nn.Linear(2, 2), torch.zeros(1, 2), contextlib.nullcontext)
    assert calls == [{"num_warmup_iters": 3, "capture_error_mode": "thread_local"}]

    captures = []

    @contextlib.contextmanager
    def graph(cuda_graph, **options):
        captures.append(options)
        yield

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "Stream", lambda: SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(wait_stream=lambda other: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    graph_inference(torch.nn.Linear(2, 2), torch.zeros(1, 2), contextlib.nullcontext)
    assert captures == [{"capture_error_mode": "thread_local"}]


def test_a_graphed_module_is_freed_with_its_forward_without_a_garbage_collection(monkeypatch):
    graphed_modules = []
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stub_make_graphed_callables([], graphed_modules))
    backbone = torch.nn.Linear(2, 2)
    forward = graph_training_forward(backbone, torch.zeros(1, 2), contextlib.nullcontext)
    x = torch.ones(1, 2)
    assert torch.equal(forward(x), backbone(x))  # through the captured module's forward
    (graphed,) = graphed_modules
    gc.disable()  # what frees it must be reference counting alone
    try:
        assert graphed() is not None
        del forward
        assert graphed() is None
    finally:
        gc.enable()
