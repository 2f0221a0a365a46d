"""Feature extractors and the growing classifier (method.md §2)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from method.heads import HEADS


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # LUCIR drops the last block's final ReLU, PODNet every block's (learners.shape_backbone).
        self.final_relu = True
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
        return F.relu(out, inplace=True) if self.final_relu else out  # post-activation


class ZeroPadShortcut(nn.Module):
    """The option-A shortcut of PODNet's ResNet-32: subsample by the stride, then zero channels
    for the rest (channels double where the stride is 2), with no parameters."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return torch.cat([x, torch.zeros_like(x)], dim=1)


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

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The three stages' output maps, (B, 16, 32, 32), (B, 32, 16, 16), (B, 64, 8, 8): POD's inputs."""
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        maps = []
        for stage in (self.stage1, self.stage2, self.stage3):
            x = stage(x)
            maps.append(x)
        return maps

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(last_map, 1), 1)

    def remove_final_relu(self, every_block: bool) -> None:
        """Features of either sign (LUCIR: the last block; PODNet's ResNet-32: every block)."""
        blocks = [b for stage in (self.stage1, self.stage2, self.stage3) for b in stage]
        for block in blocks if every_block else blocks[-1:]:
            block.final_relu = False

    def use_zero_pad_shortcuts(self) -> None:
        """PODNet's ResNet-32 (the reference's resnet32_podnet): identity shortcuts padded with zeros
        where the stages change size, instead of the 1x1 projections."""
        for stage in (self.stage2, self.stage3):
            stage[0].shortcut = ZeroPadShortcut(stride=2)


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

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        maps = []
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = stage(x)
            maps.append(x)
        return maps

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(last_map), 1)

    def remove_final_relu(self, every_block: bool) -> None:
        blocks = [b for stage in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4) for b in stage]
        for block in blocks if every_block else blocks[-1:]:
            block.__class__ = _torchvision_block_without_final_relu()


@functools.cache
def _torchvision_block_without_final_relu():
    from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

    class BasicBlockWithoutFinalReLU(TorchvisionBasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return out + (x if self.downsample is None else self.downsample(x))

    return BasicBlockWithoutFinalReLU


BACKBONES = {"resnet32": ResNet32, "resnet18": ResNet18Features}


@dataclass
class Outputs:
    """What a plain autograd step of a feature-level learner sees of one forward pass."""

    features: torch.Tensor  # (B, D)
    similarities: torch.Tensor  # (B, C): cosine heads' before their scale; the logits of a linear head
    logits: torch.Tensor  # (B, C)
    maps: Optional[list[torch.Tensor]] = None  # the stages' output maps, where asked


class IncrementalNet(nn.Module):
    """A backbone and one weight matrix and bias that grow by a head per task.

    Each new linear head is drawn exactly as `nn.Linear(feature_dim, n_new)` would be, so the model
    equals the reference's list of per-task linear heads whose outputs are concatenated, while
    the DGR step can treat all head rows as one (num_seen_classes, feature_dim) matrix. Other head
    types (method/heads.py) keep the same matrix, with `head_scale` for their learned scale.

    `class_scale` (only with `class_scaling`) is the two-stage LWS's per-class factor on the
    scores: applied at test time (`scores`), never in `forward`, so a teacher distils unscaled
    logits, as the reference's separate scaling modules do.
    """

    def __init__(self, backbone: str | nn.Module, head: str = "linear", class_scaling: bool = False) -> None:
        super().__init__()
        # A module (with a `feature_dim`) is accepted too, for small test models.
        self.backbone = BACKBONES[backbone]() if isinstance(backbone, str) else backbone
        self.head_kind = HEADS[head]
        dim = self.backbone.feature_dim
        self.head_weight = nn.Parameter(torch.empty(0, dim))
        self.head_bias = nn.Parameter(torch.empty(0))
        if self.head_kind.scaled:
            self.head_scale = nn.Parameter(torch.ones(1))  # sigma, one for all heads (LUCIR, PODNet)
        if class_scaling:
            self.register_buffer("class_scale", torch.empty(0))
        self.head_sizes: list[int] = []

    @property
    def num_classes(self) -> int:
        return self.head_bias.shape[0]

    @property
    def scale(self) -> Optional[torch.Tensor]:
        return self.head_scale if self.head_kind.scaled else None

    def add_head(self, num_new_classes: int) -> None:
        weight, bias = self.head_kind.new_rows(self.backbone.feature_dim, num_new_classes)
        device = self.head_weight.device
        with torch.no_grad():
            weight = torch.cat([self.head_weight.detach(), weight.to(device)])
            bias = torch.cat([self.head_bias.detach(), bias.to(device)])
        self.head_weight = nn.Parameter(weight)
        self.head_bias = nn.Parameter(bias)
        if hasattr(self, "class_scale"):
            self.class_scale = torch.cat([self.class_scale, torch.ones(num_new_classes, device=device)])
        self.head_sizes.append(num_new_classes)

    def set_head_sizes(self, sizes: list[int]) -> None:
        """Rebuild empty heads of the right shapes so a saved state_dict loads into them."""
        dim = self.backbone.feature_dim
        total = sum(sizes)
        device = self.head_weight.device
        self.head_weight = nn.Parameter(torch.zeros(total * self.head_kind.proxies, dim, device=device))
        self.head_bias = nn.Parameter(torch.zeros(total, device=device))
        if hasattr(self, "class_scale"):
            self.class_scale = torch.ones(total, device=device)
        self.head_sizes = list(sizes)

    def head_rows(self, first_class: int) -> slice:
        """The weight rows of classes first_class.. (a class has `proxies` rows)."""
        return slice(first_class * self.head_kind.proxies, None)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head_kind.logits(features, self.head_weight, self.head_bias, self.scale)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Test-time class scores: the logits (PODNet: the similarities), times the LWS scaling where there is one."""
        kind = self.head_kind
        if kind.scaled_at_test:
            scores = self.logits(features)
        else:
            scores = kind.similarities(features, self.head_weight, self.head_bias)
        return scores * self.class_scale if hasattr(self, "class_scale") else scores

    def class_weight_norms(self) -> torch.Tensor:
        return self.head_kind.class_norms(self.head_weight.detach())

    def outputs(self, x: torch.Tensor, maps: bool = False) -> Outputs:
        """Features, similarities, logits and, where asked, the stages' maps of one forward pass."""
        if maps:
            stage_maps = self.backbone.stage_maps(x)
            features = self.backbone.pool(stage_maps[-1])
        else:
            stage_maps, features = None, self.backbone(x)
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            similarities = self.head_kind.similarities(features, self.head_weight, self.head_bias)
            logits = similarities * self.scale if self.head_kind.scaled else similarities
        return Outputs(features, similarities, logits, stage_maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The heads always run in fp32, also under bf16 autocast: a teacher's logits are soft
        # targets, and rounding logits of 10-20 to bf16 (steps of 0.06-0.125) would blur them.
        features = self.backbone(x)
        with torch.autocast(features.device.type, enabled=False):
            return self.logits(features.float())
