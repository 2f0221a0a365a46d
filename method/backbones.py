"""Feature extractors and the growing classifier (method.md §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut on the first block of stages 2 and 3.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place: BatchNorm's backward needs its input, not its output, so overwriting the
        # output is safe and saves an allocation per call.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu(out, inplace=True)  # post-activation


class ResNet32(nn.Module):
    """CIFAR ResNet-32: 3x3 stem, 3 stages of 5 blocks (16/32/64), global pooling -> 64-d."""

    feature_dim = 64

    def __init__(self, blocks_per_stage: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for out_channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(in_channels, out_channels, stride)]
            blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = out_channels
        self.stage1, self.stage2, self.stage3 = stages
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = self.stage3(self.stage2(self.stage1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ResNet18Features(nn.Module):
    """torchvision's ResNet-18 (random init) without its classifier: 512-d features."""

    feature_dim = 512

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BACKBONES = {"resnet32": ResNet32, "resnet18": ResNet18Features}


class IncrementalNet(nn.Module):
    """A backbone and one weight matrix and bias that grow by a head per task.

    Each new head is drawn exactly as `nn.Linear(feature_dim, n_new)` would be, so the model
    equals the reference's list of per-task linear heads whose outputs are concatenated, while
    the DGR step can treat all head rows as one (num_seen_classes, feature_dim) matrix.
    """

    def __init__(self, backbone: str | nn.Module) -> None:
        super().__init__()
        # A module (with a `feature_dim`) is accepted too, for small test models.
        self.backbone = BACKBONES[backbone]() if isinstance(backbone, str) else backbone
        dim = self.backbone.feature_dim
        self.head_weight = nn.Parameter(torch.empty(0, dim))
        self.head_bias = nn.Parameter(torch.empty(0))
        self.head_sizes: list[int] = []

    @property
    def num_classes(self) -> int:
        return self.head_weight.shape[0]

    def add_head(self, num_new_classes: int) -> None:
        fresh = nn.Linear(self.backbone.feature_dim, num_new_classes)
        device = self.head_weight.device
        with torch.no_grad():
            weight = torch.cat([self.head_weight.detach(), fresh.weight.to(device)])
            bias = torch.cat([self.head_bias.detach(), fresh.bias.to(device)])
        self.head_weight = nn.Parameter(weight)
        self.head_bias = nn.Parameter(bias)
        self.head_sizes.append(num_new_classes)

    def set_head_sizes(self, sizes: list[int]) -> None:
        """Rebuild empty heads of the right shapes so a saved state_dict loads into them."""
        dim = self.backbone.feature_dim
        total = sum(sizes)
        self.head_weight = nn.Parameter(torch.zeros(total, dim, device=self.head_weight.device))
        self.head_bias = nn.Parameter(torch.zeros(total, device=self.head_bias.device))
        self.head_sizes = list(sizes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.head_weight, self.head_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The heads always run in fp32, also under bf16 autocast: a teacher's logits are soft
        # targets, and rounding logits of 10-20 to bf16 (steps of 0.06-0.125) would blur them.
        features = self.backbone(x)
        with torch.autocast(features.device.type, enabled=False):
            return self.logits(features.float())
