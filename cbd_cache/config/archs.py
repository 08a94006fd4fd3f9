"""Architectures by name, without importing torch: what a pipeline file may name as `teacher.arch` / `student.arch`.

Small-image ResNets (CIFAR-style, 3 stages of width 16/32/64) for inputs up to 64 px; torchvision's
ResNet family (resnet*, resnext*, wide_resnet*) for 224 px; and `timm:<name>`, any timm model (the
optional extra `cbd-cache[timm]`). `models/networks.py` builds them; loading a config checks the
names here, so it imports no torch unless the name is a timm model's.
"""
from __future__ import annotations

SMALL_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet56": 56}
# torchvision's ResNet family (tests/test_imported.py checks the list against torchvision's own)
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
               "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
ARCHS = tuple(SMALL_DEPTHS) + TORCHVISION   # plus "timm:<name>" for any timm model
TIMM = "timm:"


def arch_error(arch: str) -> str | None:
    """Why `arch` names no architecture this tool can build (None when it does)."""
    if not arch.startswith(TIMM):
        return None if arch in ARCHS else f"must be one of {', '.join(ARCHS)}, or timm:<name>"
    name = arch[len(TIMM):]
    if ":" in name:
        return (f"{name.split(':')[0]}: names fetch weights or configs at run time; use a timm model name "
                "and bring the weights as a local file (cbd-cache import-teacher)")
    try:
        timm = _timm()
    except ImportError as e:
        return str(e)
    return None if timm.is_model(name) else f"timm has no model {name!r} (see timm.list_models())"


def _timm():
    """The timm module, or ImportError with the one line that says how to get it."""
    try:
        import timm  # optional dependency: only `timm:<name>` architectures need it
    except ImportError:
        raise ImportError("timm is not installed: pip install 'cbd-cache[timm]'") from None
    return timm
