"""Calibration: expected calibration error over 15 equal-width confidence bins, and the reliability diagram.

ECE = sum_b (n_b / n) * |acc_b - conf_b| over the top-1 softmax confidence (Guo et al. 2017; MiSLAS reports
it beside top-1), in percent like the accuracies. `reliability` keeps each bin's count, mean confidence
and accuracy, so that bins of several seeds pool (`pool`) into one diagram.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure  # drawn straight to a file: no pyplot, no GUI backend

BINS = 15


def reliability(confidences: np.ndarray, correct: np.ndarray, bins: int = BINS) -> dict[str, Any]:
    """Per bin (0, 1/B], (1/B, 2/B], ... (a confidence of 0 goes to the first): count, mean confidence, accuracy."""
    conf = np.asarray(confidences, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    hit_sum = np.bincount(which, weights=hit, minlength=bins)
    safe = np.maximum(count, 1)
    return {"bins": bins, "count": count.tolist(), "confidence": (conf_sum / safe).tolist(),
            "accuracy": (hit_sum / safe).tolist()}


def ece_of(rel: dict[str, Any]) -> float:
    """ECE in percent from a `reliability` record (empty bins weigh nothing)."""
    count = np.asarray(rel["count"], dtype=np.float64)
    gap = np.abs(np.asarray(rel["accuracy"]) - np.asarray(rel["confidence"]))
    return float(100.0 * (count * gap).sum() / max(count.sum(), 1))


def calibration_report(confidences: np.ndarray, correct: np.ndarray) -> dict[str, Any]:
    """{"ece": percent, "calibration": the bins}: what every evaluation adds to its report."""
    rel = reliability(confidences, correct)
    return {"ece": ece_of(rel), "calibration": rel}


def pool(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' bins as one (count-weighted means): a diagram over seeds."""
    count = np.sum([r["count"] for r in records], axis=0)
    safe = np.maximum(count, 1)
    conf = np.sum([np.multiply(r["count"], r["confidence"]) for r in records], axis=0) / safe
    acc = np.sum([np.multiply(r["count"], r["accuracy"]) for r in records], axis=0) / safe
    return {"bins": records[0]["bins"], "count": count.tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}


def draw_reliability(ax, rel: dict[str, Any], title: str) -> None:
    """Each bin's accuracy (blue), the gap to its mean confidence (hatched red), the diagonal, and in grey the
    share of images in each bin (a bin of a few images says little). Drawn as steps: a few artists, quick."""
    b = rel["bins"]
    edges = np.linspace(0, 1, b + 1)
    count = np.asarray(rel["count"], dtype=np.float64)
    acc = np.where(count > 0, rel["accuracy"], 0.0)
    conf = np.where(count > 0, rel["confidence"], 0.0)
    share = count / max(count.max(), 1) * 0.25
    ax.stairs(acc, edges, fill=True, color="C0", alpha=0.8, label="accuracy of the bin")
    ax.stairs(np.maximum(acc, conf), edges, baseline=np.minimum(acc, conf), fill=True, facecolor="none",
              edgecolor="C3", hatch="///", lw=0.6, label="gap to its mean confidence")
    ax.stairs(share, edges, color="black", lw=1.2, label="images in the bin (scaled)")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 softmax)", ylabel="accuracy")
    ax.set_title(title, fontsize=9 if "\n" not in title else 7)
    ax.text(0.04, 0.93, f"ECE {ece_of(rel):.1f}%, n = {int(count.sum())}", transform=ax.transAxes, fontsize=8,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.88), fontsize=6, frameon=False)


def plot_reliability(panels: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One reliability diagram per (title, bins), side by side, into a PNG."""
    fig = Figure(figsize=(3.6 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, rel) in zip(axes, panels):
        draw_reliability(ax, rel, title)
    # a fixed layout: tight_layout would cost more than the drawing, and every evaluation draws one
    fig.subplots_adjust(left=0.6 / (3.6 * len(panels)), right=1 - 0.15 / len(panels), bottom=0.13, top=0.84,
                        wspace=0.3)
    fig.savefig(path, dpi=100)
