"""The long-tail facts in one place: the cutting profiles and the many / medium / few-shot groups."""
from __future__ import annotations

import math

import numpy as np

from cbd_cache.config import FEW_SHOT_BELOW, MANY_SHOT_ABOVE

# the shot groups' thresholds and the profile names (PROFILES) are config's (config/schema.py): its checks use them
SHOT_GROUPS = ("many", "medium", "few")
# ImageNet-LT's classes per shot group (many / medium / few), as the long-tail literature reports them: the
# curve is steep at both ends and flat in the middle, where an exponential profile puts ln 5 / ln IF of the
# classes in the medium group whatever n_max is (35 % at IF 100) and most of them in the few-shot one.
IMAGENET_LT_GROUPS = (385, 479, 136)


def shot_group(train_count: int) -> str:
    if train_count > MANY_SHOT_ABOVE:
        return "many"
    if train_count < FEW_SHOT_BELOW:
        return "few"
    return "medium"


def exponential_profile(n_max: int, imbalance_factor: float, num_classes: int) -> list[int]:
    """n_i = floor(n_max * IF^(-i/(C-1))) for class rank i = 0..C-1 (CIFAR-LT, ImageNet-LT's 1280 -> 5)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, math.floor(n_max * imbalance_factor ** (-i / (num_classes - 1)) + 1e-9)) for i in range(num_classes)]


def imagenet_lt_shape_profile(n_max: int, imbalance_factor: float, num_classes: int) -> list[int]:
    """n_max down to n_max / IF, with ImageNet-LT's shares of many / medium / few-shot classes.

    Log-linear in the class rank between four knots: (0, n_max), (the many-shot share, 101), (1 - the
    few-shot share, 20), (1, n_max / IF), so the classes fall into the groups in ImageNet-LT's proportions
    (`IMAGENET_LT_GROUPS`) while the ends are the data's own. Needs n_max > 101 and n_max / IF < 20.
    """
    total = sum(IMAGENET_LT_GROUPS)
    knots = ((0.0, float(n_max)), (IMAGENET_LT_GROUPS[0] / total, MANY_SHOT_ABOVE + 1.0),
             (1 - IMAGENET_LT_GROUPS[2] / total, float(FEW_SHOT_BELOW)), (1.0, n_max / imbalance_factor))
    counts = []
    for i in range(num_classes):
        x = i / (num_classes - 1) if num_classes > 1 else 0.0
        (x0, y0), (x1, y1) = next((a, b) for a, b in zip(knots, knots[1:]) if x <= b[0])
        log_n = math.log(y0) + (x - x0) / (x1 - x0) * (math.log(y1) - math.log(y0))
        counts.append(max(1, math.floor(math.exp(log_n) + 1e-9)))
    return counts


def profile_counts(profile: str, n_max: int, imbalance_factor: float, num_classes: int) -> list[int]:
    """Training images per class rank (0 = the head) of a cutting profile."""
    make = {"exponential": exponential_profile, "imagenet_lt_shape": imagenet_lt_shape_profile}[profile]
    return make(n_max, imbalance_factor, num_classes)


def longtail_subset(labels: np.ndarray, num_classes: int, counts: list[int], seed: int) -> np.ndarray:
    """Indices of a long-tailed subset of a (roughly balanced) labelled set: class rank r keeps counts[r] images.

    Class ranks are a seeded permutation, so which class is the head is a choice of `seed`, and each
    class keeps a seeded random sample of its images. Returns sorted indices into `labels`.
    """
    rng = np.random.default_rng([seed, 0x10E7A11])
    ranked_classes = rng.permutation(num_classes)
    keep = []
    for rank, c in enumerate(ranked_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < counts[rank]:
            raise ValueError(f"class {c} has {len(members)} images, the profile asks for {counts[rank]} (lower data.n_max)")
        keep.append(rng.choice(members, size=counts[rank], replace=False))
    return np.sort(np.concatenate(keep))


def cifar_lt_counts(n_per_class: int, imbalance_factor: float, num_classes: int) -> list[int]:
    """Cao et al. 2019 (LDAM-DRW, `imbalance_cifar.py`): int(n_max * IF^(-i/(C-1))) for class i in label order.

    CIFAR-100 at IF 100 gives 500 ... 5 and 10,847 images; CIFAR-10 at IF 100, 5,000 ... 50 and 12,406.
    """
    return [int(n_per_class * (1 / imbalance_factor) ** (i / (num_classes - 1))) for i in range(num_classes)]


def cifar_lt_subset(labels: np.ndarray, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """The training images of the community's CIFAR-LT: class c keeps `cifar_lt_counts`[c] of its images,
    chosen as that code chooses them (NumPy's legacy generator seeded 0, one shuffle per class in order),
    so results compare with published CIFAR-LT numbers image for image. Returns sorted indices."""
    per_class = np.bincount(labels, minlength=num_classes)
    if per_class.min() != per_class.max():
        raise ValueError(f"the source is not balanced ({per_class.min()}..{per_class.max()} images per class)")
    legacy = np.random.RandomState(0)
    keep = []
    for c, n in enumerate(cifar_lt_counts(int(per_class[0]), imbalance_factor, num_classes)):
        members = np.flatnonzero(labels == c)
        legacy.shuffle(members)
        keep.append(members[:n])
    return np.sort(np.concatenate(keep))
