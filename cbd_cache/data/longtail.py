"""The long-tail facts in one place: the exponential profile and the many / medium / few-shot groups."""
from __future__ import annotations

import math

import numpy as np

# Shot groups by training-image count (paper, after Liu et al. 2019): many > 100, medium 20..100, few < 20.
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20
SHOT_GROUPS = ("many", "medium", "few")
# data.profile: "exponential" cuts a balanced source to `exponential_profile`; "cifar_lt" is the community's
# CIFAR-LT cut (`cifar_lt_subset`); "none" keeps a long-tailed source as it is
PROFILES = ("exponential", "cifar_lt", "none")


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


def longtail_subset(labels: np.ndarray, num_classes: int, n_max: int, imbalance_factor: float, seed: int) -> np.ndarray:
    """Indices of a long-tailed subset of a (roughly balanced) labelled set.

    Class ranks are a seeded permutation, so which class is the head is a choice of `seed`, and each
    class keeps a seeded random sample of its images. Returns sorted indices into `labels`.
    """
    rng = np.random.default_rng([seed, 0x10E7A11])
    ranked_classes = rng.permutation(num_classes)
    counts = exponential_profile(n_max, imbalance_factor, num_classes)
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
