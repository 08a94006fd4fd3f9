"""Samplers as pure functions: how many copies of a training image an epoch emits.

Class-balanced sampling (official CBD code): class c has repeat factor r_c = (N / C) / n_c, and each
image of class c is emitted floor(r_c) times plus once more with probability frac(r_c); for r_c < 1
that is an acceptance test. In expectation every class then contributes N / C samples per epoch.
Instance sampling is r_c = 1: every image once.
"""
from __future__ import annotations

import math

import numpy as np

from cbd_cache.config import ALLOCATIONS, SAMPLINGS   # the names config offers


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


# ------------------------------------------------------------------------------ cached views
GOLDEN = 0.6180339887498949   # spreads each image's walk phase over [0, 1)


def view_counts(labels: np.ndarray, class_counts: list[int] | np.ndarray, views: int, allocation: str,
                min_views: int = 1) -> np.ndarray:
    """Stored views per training image, int64 (N,), for a budget of `views` per image on average.

    uniform: every image gets `views`. draws: image i gets max(min_views, round(views * r_c(i))),
    r_c the class-balanced repeat factor of its class: its expected draws d_i = E * r_c over a
    student's E epochs, over sum_i d_i = E * N, times the budget B = N * views. Views go where the
    student's draws are, with no cap, and the total stays about N * views. A smaller budget gives
    each image a prefix of a larger budget's views, as view a of an image never depends on the count.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if allocation == "uniform":
        return np.full(len(labels), views, dtype=np.int64)
    if allocation != "draws":
        raise ValueError(f"unknown allocation {allocation!r}; expected one of {ALLOCATIONS}")
    r = repeat_factors(class_counts, "class_balanced")[labels]
    return np.maximum(min_views, np.rint(views * r)).astype(np.int64)


class ViewWalk:
    """Which stored view each draw of an image takes: a seeded walk without replacement over its views.

    Draws k*count .. (k+1)*count - 1 of image `row` (its lap k) visit every one of its `count` views
    once, in the order of a permutation seeded by (seed, row, k). Drawing with replacement instead
    leaves A * (1 - 1/A)^k of A views unseen after k draws, and repeats some while others wait. The
    walk is a pure function of (seed, row, position, count); this object only keeps each image's
    latest lap, so a stream that walks an image lap after lap, epoch after epoch, draws each
    permutation once (seeding a generator costs ~15 us, as much as replaying a small view).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.orders: dict[int, tuple[int, int, np.ndarray]] = {}   # row -> (lap, count, its order)

    def view(self, row: int, position: int, count: int) -> int:
        """The view (0-based, among `count`) that the `position`-th draw of image `row` uses."""
        lap, step = divmod(int(position), int(count))
        kept = self.orders.get(int(row))
        if kept is None or kept[0] != lap or kept[1] != count:
            kept = self.orders[int(row)] = (lap, int(count), walk_order(self.seed, row, lap, count))
        return int(kept[2][step])


def walk_order(seed: int, row: int, lap: int, count: int) -> np.ndarray:
    """The order in which lap `lap` of image `row`'s walk visits its `count` views."""
    if count == 1:
        return np.zeros(1, dtype=np.int64)
    return np.random.default_rng([seed & 0xFFFFFFFF, int(row), int(lap)]).permutation(count)


def walk_start(epoch: int, factor: float, row: int) -> int:
    """Where image `row`'s walk stands at the start of `epoch`: its expected draws before it, e * r.

    The stream is stateless per epoch (it resumes by replaying one epoch's order), so it cannot
    count an image's draws in earlier epochs; it counts them within the epoch exactly and starts
    each epoch at the expected count. A view repeats early only by how far an image's draws in an
    epoch stray from r. The phase frac(row * golden ratio) staggers images drawn less than once an
    epoch, so that they do not all step to their next view in the same epoch.
    """
    return math.floor(epoch * factor + (row * GOLDEN) % 1.0)
