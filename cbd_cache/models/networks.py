"""Networks: a ResNet feature extractor f, an optional projection h, and a cosine classifier.

    v = f(x)                      global-average-pooled descriptor, R^d (what teachers export)
    e = h(v)                      student with K > 1 teachers: Linear(d, sum d_k) + ReLU (official code); else e = v
    z = gamma * <normalize(W), normalize(e)>      cosine classifier, no bias (official: gamma = 20)

Architectures by name (`teacher.arch`, `student.arch`): small-image ResNets (CIFAR-style, 3 stages of
width 16/32/64) for inputs up to 64 px; torchvision's ResNet family (resnet*, resnext*, wide_resnet*)
for 224 px; and `timm:<name>`, any timm model (the optional extra `cbd-cache[timm]`). No weights are
ever downloaded: torchvision models are built with `weights=None`, timm ones with `pretrained=False`;
trained weights come from this tool's runs or from a local file (`cbd-cache import-teacher`).

Each network normalises its own input: the replayed view arrives with pixels in [0, 1], and
`features` first applies the network's mean / std (timm: the model's own config; otherwise none,
i.e. mean 0, std 1). The values live in the checkpoint's network spec, so export, `cache verify` and
the online student normalise a teacher's view the same way without knowing about it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from cbd_cache.config.archs import SMALL_DEPTHS, TIMM, TORCHVISION, _timm, arch_error

HEADS = ("cosine", "linear")   # cosine: this tool's classifier; linear: W e + b (an imported model's own fc, or a student's)


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


class TimmBackbone(nn.Module):
    """A timm model without its classifier: `forward` returns the pooled pre-logits feature."""

    def __init__(self, name: str, in_channels: int):
        super().__init__()
        self.model = _timm().create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
        self.dim = getattr(self.model, "head_hidden_size", None) or self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def build_backbone(arch: str, in_channels: int) -> tuple[nn.Module, int]:
    """(f, d): a feature extractor returning the pooled descriptor, and its size. Never downloads weights."""
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
    if arch.startswith(TIMM) and arch_error(arch) is None:
        net = TimmBackbone(arch[len(TIMM):], in_channels)
        return net, net.dim
    raise ValueError(f"unknown arch {arch!r}: {arch_error(arch)}")


def descriptor_dim(arch: str) -> int:
    """d, the size of an architecture's pooled descriptor (built on the meta device: no memory, no init)."""
    try:
        with torch.device("meta"):
            return build_backbone(arch, 3)[1]
    except (RuntimeError, NotImplementedError):   # a model whose constructor reads tensor values: build it for real
        return build_backbone(arch, 3)[1]


def classifier_prefix(arch: str) -> str:
    """The state-dict prefix of the classifier in the architecture's own (torchvision / timm) model."""
    if arch.startswith(TIMM):
        return _timm().models.get_pretrained_cfg_value(arch[len(TIMM):], "classifier") or "fc"
    return "fc"


def input_normalization(arch: str, in_channels: int) -> tuple[list[float], list[float]]:
    """(mean, std) the architecture expects on [0, 1] pixels: timm's model config, else none (0, 1).

    A grey (1-channel) input takes the mean of the RGB values.
    """
    if arch.startswith(TIMM):
        cfg = _timm().models.get_pretrained_cfg(arch[len(TIMM):])
        mean, std = list(getattr(cfg, "mean", None) or ()), list(getattr(cfg, "std", None) or ())
        if len(mean) == 3 and len(std) == 3:
            if in_channels == 3:
                return mean, std
            return [sum(mean) / 3] * in_channels, [sum(std) / 3] * in_channels
    return [0.0] * in_channels, [1.0] * in_channels


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, num_classes: int, gamma: float):
        super().__init__()
        # unit-norm rows: the gradient of a cosine head scales as gamma / norm(W), so tiny rows blow up
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / dim ** 0.5)
        self.gamma = gamma

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.gamma * F.linear(F.normalize(e, dim=1), F.normalize(self.weight, dim=1))


class PerClassHead(nn.Module):
    """z_j = scale_j * base(e)_j + bias_j on a classifier `base`: LWS learns `scale` (Kang et al.) with `base`
    frozen; post-hoc logit adjustment sets `bias` = -tau * log prior (Menon et al.)."""

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.register_buffer("bias", torch.zeros(num_classes))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.scale * self.base(e) + self.bias


class Network(nn.Module):
    """Input normalisation, f, optional h, classifier. `forward` returns (logits, e): e is what distillation compares.

    `head` is "cosine" (this tool's models) or "linear" (W e + b: an imported model's own fc, or a student's
    `student.head = "linear"`); `per_class` wraps it in a `PerClassHead` (LWS, logit adjustment).
    `mean` / `std` (per channel, on [0, 1] pixels) default to the architecture's (`input_normalization`).
    They are buffers outside the state dict: the checkpoint's network spec records them.
    """

    def __init__(self, arch: str, in_channels: int, num_classes: int, gamma: float, projection_dim: int = 0,
                 head: str = "cosine", mean: list[float] | None = None, std: list[float] | None = None,
                 per_class: bool = False):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r}: must be one of {HEADS}")
        default_mean, default_std = input_normalization(arch, in_channels)
        self.register_buffer("mean", torch.tensor(mean or default_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or default_std).view(1, -1, 1, 1), persistent=False)
        self.backbone, self.dim = build_backbone(arch, in_channels)
        self.projection = (nn.Sequential(nn.Linear(self.dim, projection_dim), nn.ReLU())
                           if projection_dim else nn.Identity())
        out = projection_dim or self.dim
        self.classifier = CosineClassifier(out, num_classes, gamma) if head == "cosine" else nn.Linear(out, num_classes)
        if per_class:
            self.classifier = PerClassHead(self.classifier, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The descriptor v = f((x - mean) / std): what a teacher exports, and what NCM and cRT use."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.projection(self.features(x))
        return self.classifier(e), e


def projection_dim(student_dim: int, teacher_dims: list[int]) -> int:
    """h's output size: none (0) for one teacher of the student's size (Eq. 2), else sum of teacher sizes (Eq. 4)."""
    if not teacher_dims or (len(teacher_dims) == 1 and teacher_dims[0] == student_dim):
        return 0
    return sum(teacher_dims)


def head_of(classifier: nn.Module) -> tuple[str, bool]:
    """(head, per_class) of a classifier module, as the network spec records them."""
    per_class = isinstance(classifier, PerClassHead)
    base = classifier.base if per_class else classifier
    return ("linear" if isinstance(base, nn.Linear) else "cosine"), per_class
