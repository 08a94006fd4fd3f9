"""Networks: a ResNet feature extractor f, an optional projection h, and a cosine classifier.

    v = f(x)                      global-average-pooled descriptor, R^d (what teachers export)
    e = h(v)                      student with K > 1 teachers: Linear(d, sum d_k) + ReLU (official code); else e = v
    z = gamma * <normalize(W), normalize(e)>      cosine classifier, no bias (official: gamma = 20)

Small-image ResNets (CIFAR-style, 3 stages of width 16/32/64) serve inputs up to 64 px; the
torchvision ResNets serve 224 px (trained from scratch, no downloaded weights).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

SMALL_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet56": 56}
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = tuple(SMALL_DEPTHS) + TORCHVISION


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): 3x3 stem, three stages of n blocks, global average pool."""

    def __init__(self, depth: int, in_channels: int, width: int = 16):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(n):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def descriptor_dim(arch: str) -> int:
    """d, the size of an architecture's pooled descriptor."""
    if arch in SMALL_DEPTHS:
        return 64
    return 512 if arch in ("resnet18", "resnet34") else 2048


def build_backbone(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    """(f, d): a feature extractor returning the pooled descriptor, and its size."""
    if arch in SMALL_DEPTHS:
        net = SmallResNet(SMALL_DEPTHS[arch], in_channels)
        return net, net.dim
    if arch in TORCHVISION:
        net = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, gamma: float):
        super().__init__()
        # unit-norm rows: the gradient of a cosine head scales as gamma / norm(W), so tiny rows blow up
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / dim ** 0.5)
        self.gamma = gamma

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.gamma * F.linear(F.normalize(e, dim=1), F.normalize(self.weight, dim=1))


class Network(nn.Module):
    """f, optional h, cosine classifier. `forward` returns (logits, e): e is what distillation compares."""

    def __init__(self, arch: str, in_channels: int, num_classes: int, gamma: float, projection_dim: int = 0):
        super().__init__()
        self.backbone, self.dim = build_backbone(arch, in_channels)
        self.projection = (nn.Sequential(nn.Linear(self.dim, projection_dim), nn.ReLU())
                           if projection_dim else nn.Identity())
        self.classifier = CosineClassifier(projection_dim or self.dim, num_classes, gamma)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The descriptor v = f(x): what a teacher exports, and what NCM and cRT use."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.projection(self.backbone(x))
        return self.classifier(e), e


def projection_dim(student_dim: int, teacher_dims: list[int]) -> int:
    """h's output size: none (0) for one teacher of the student's size (Eq. 2), else sum of teacher sizes (Eq. 4)."""
    if not teacher_dims or (len(teacher_dims) == 1 and teacher_dims[0] == student_dim):
        return 0
    return sum(teacher_dims)
