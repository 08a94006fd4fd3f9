"""Samplers as pure functions: how many copies of a training image an epoch emits.

Class-balanced sampling (official CBD code): class c has repeat factor r_c = (N / C) / n_c, and each
image of class c is emitted floor(r_c) times plus once more with probability frac(r_c); for r_c < 1
that is an acceptance test. In expectation every class then contributes N / C samples per epoch.
Instance sampling is r_c = 1: every image once.
"""
from __future__ import annotations

import math

import numpy as np

SAMPLINGS = ("class_balanced", "instance")


def repeat_factors(class_counts: list[int] | np.ndarray, sampling: str) -> np.ndarray:
    """Per-class repeat factor r_c (0 for a class with no training images)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    if sampling == "instance":
        return (counts > 0).astype(np.float64)
    if sampling != "class_balanced":
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
    present = counts > 0
    per_class = counts.sum() / present.sum()
    return np.where(present, per_class / np.maximum(counts, 1), 0.0)


def copies(factor: float, u: float) -> int:
    """floor(r) copies, plus one more when the uniform draw u in [0, 1) falls below frac(r)."""
    whole = math.floor(factor)
    return whole + int(u < factor - whole)
