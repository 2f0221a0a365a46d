"""CUDA-graph replay of the fixed-shape parts of a training step (`train.cuda_graph`).

A ResNet-32 step on 128 CIFAR images is bound by kernel launches on a large GPU: the backbone's
forward and backward are a few hundred small kernels. Captured once as CUDA graphs, they are
replayed with one launch each. The rest of the step (heads, losses, DGR's reweighting, SGD) stays
eager: it is a few dozen kernels and its shapes change with the number of classes.

Only batches of the captured shape replay; the shorter last batch of an epoch runs eagerly on
the same parameters and buffers, so it is trained exactly as without graphs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Forward = Callable[[torch.Tensor], torch.Tensor]
WARMUP_STEPS = 3


class _Calls(nn.Module):
    """Calls the backbone; graphing this wrapper leaves the backbone's own forward untouched,
    so evaluation, copies and the state dict never meet the graphs."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def graph_training_forward(backbone: nn.Module, sample: torch.Tensor, autocast: Callable) -> Forward:
    """`backbone`'s training-mode forward, whose backward is replayed from a CUDA graph too.

    `torch.cuda.make_graphed_callables` warms up and captures on the sample; the BatchNorm
    running statistics those passes update are put back afterwards, in place, so the capture
    leaves no trace in the model. `autocast` must be built with cache_enabled=False.
    """
    saved = [buffer.clone() for buffer in backbone.buffers()]
    calls = _Calls(backbone).train()
    with autocast():
        # thread_local: CUDA work of other threads (a DataLoader's pin-memory thread) cannot
        # break the capture, as it would under the default "global" mode.
        torch.cuda.make_graphed_callables(calls, (sample.clone(),), num_warmup_iters=WARMUP_STEPS, capture_error_mode="thread_local")
    # The capture sets calls.forward to a closure that refers back to `calls`: a cycle that only
    # the garbage collector frees, with the graph's memory pool. Holding the closure here instead
    # leaves no cycle, so the pool goes with the trainer that holds this forward.
    graphed = calls.__dict__.pop("forward")
    with torch.no_grad():
        for buffer, value in zip(backbone.buffers(), saved):
            buffer.copy_(value)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return graphed(x) if x.shape == sample.shape else backbone(x)

    return forward


def graph_inference(module: nn.Module, sample: torch.Tensor, autocast: Callable) -> Forward:
    """`module`'s no-grad forward for inputs shaped like `sample`, replayed from a CUDA graph."""
    static_input = sample.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), autocast():
        for _ in range(WARMUP_STEPS):  # lets cuDNN pick its kernels outside the capture
            module(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), autocast(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_output = module(static_input)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape != static_input.shape:
            with torch.no_grad():
                return module(x)
        static_input.copy_(x)
        graph.replay()
        return static_output.clone()  # the next replay overwrites static_output

    return forward
