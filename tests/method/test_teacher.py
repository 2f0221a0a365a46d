"""The distillation teacher: a frozen copy with BatchNorm folded, giving the model's own logits."""

import torch
from torch import nn

from method.backbones import IncrementalNet
from method.trainer import frozen_teacher


def trained_statistics_model(backbone="resnet32", head_sizes=(3, 2)) -> IncrementalNet:
    """A model whose BatchNorm running statistics and affine terms are far from the identity."""
    torch.manual_seed(0)
    model = IncrementalNet(backbone)
    for size in head_sizes:
        model.add_head(size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(32, 3, 32, 32) * 3 + 1)
    return model


def test_folded_teacher_gives_the_eval_models_logits():
    model = trained_statistics_model()
    teacher = frozen_teacher(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())  # really folded
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
        folded = teacher(x)
        folded_channels_last = teacher(x.contiguous(memory_format=torch.channels_last))
    scale = expected.abs().max()
    assert torch.allclose(folded, expected, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(folded_channels_last, expected, atol=1e-5 * scale, rtol=0)


def test_teacher_is_a_copy_that_training_does_not_move():
    model = trained_statistics_model()
    teacher = frozen_teacher(model)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = teacher(x)
        for parameter in model.parameters():
            parameter.add_(1.0)
        after = teacher(x)
    assert torch.equal(before, after)
    assert model.training  # the student's mode is left alone


class DataDependentBackbone(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    feature_dim = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if out.sum() > 0:
            out = out * 2
        return out.mean(dim=(2, 3))


def test_an_untraceable_backbone_is_kept_unfolded():
    torch.manual_seed(0)
    model = IncrementalNet(DataDependentBackbone())
    model.add_head(2)
    teacher = frozen_teacher(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher(x), model.eval()(x))
