"""The paper table's figures, drawn straight to PNG files (no pyplot, no GUI backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # figures drawn straight to files: no pyplot, no GUI backend

from cbd_cache.config import ALLOCATIONS, DISTILL
from cbd_cache.experiments.paper_checks import _row
from cbd_cache.experiments.paper_design import ALPHAS, PER_CLASS, VIEWS


# --------------------------------------------------------------------------------------------- plots
def plot_alpha(summary: dict[str, list[dict]], path: Path) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for d, marker in zip(DISTILL, "os^"):
        pts = [(a, _row(summary["alpha"], f"{d}, alpha={a}")["top1"]) for a in ALPHAS]
        pts = [(a, s) for a, s in pts if s["mean"] is not None]
        if pts:
            ax.errorbar([a for a, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                        marker=marker, capsize=3, label=f"{d} distillation")
    ce = _row(summary["table2"], "Standard-Class-Bal")
    if ce and ce["top1"]["mean"] is not None:
        ax.axhline(ce["top1"]["mean"], color="grey", ls="--", label="alpha = 0 (class-balanced CE)")
    ax.set(xlabel="alpha", ylabel="top-1 (%)", title="Distillation weight (one standard teacher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_views(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for alloc, marker in zip(ALLOCATIONS, "os"):
        pts = [(v, _row(rows, f"{alloc} A={v}")["top1"]) for v in VIEWS]
        pts = [(v, s) for v, s in pts if s["mean"] is not None]
        if pts:
            ax.errorbar([v for v, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                        marker=marker, capsize=3, label=f"cached, {alloc} allocation")
    online = _row(rows, "online")["top1"]
    if online["mean"] is not None:
        ax.axhline(online["mean"], color="C3", label="online (fresh views)")
        ax.axhspan(online["mean"] - online["std"], online["mean"] + online["std"], color="C3", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(VIEWS), [str(v) for v in VIEWS])
    ax.set(xlabel="view budget A (N * A views stored)", ylabel="top-1 (%)", title="CBD_ENS: cached views vs online")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def count_bins(counts: list[int], most: int = 12) -> list[list[int]]:
    """Class indices grouped for the per-class plot: by training count, or, past `most` distinct counts (200
    glyph classes), by log-spaced count bins, so that a line through hundreds of classes stays readable."""
    distinct = sorted(set(counts))
    if len(distinct) <= most:
        edges = distinct + [distinct[-1] + 1]
    else:
        edges = sorted(set(np.geomspace(distinct[0], distinct[-1] + 1, most + 1).round().astype(int)))
    groups = [[c for c, n in enumerate(counts) if lo <= n < hi] for lo, hi in zip(edges, edges[1:])]
    return [g for g in groups if g]


def plot_per_class(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    binned = averaged = False
    for m, marker in zip(PER_CLASS, "osD"):
        r = _row(rows, m)
        if r and r["per_class"]:
            counts, accs = r["train_counts"], r["per_class"]
            groups = count_bins(counts)
            binned, averaged = len(groups) < len(set(counts)), len(groups) < len(counts)
            ax.plot([float(np.exp(np.mean(np.log([counts[c] for c in g])))) for g in groups],
                    [float(np.mean([accs[c] for c in g])) for g in groups], marker=marker, label=m)
    ax.set_xscale("log")
    ax.set(xlabel="training images of the class" + (" (log-spaced bins, geometric mean)" if binned else ""),
           ylabel="test accuracy (%), mean over the classes" if averaged else "test accuracy of the class (%)",
           title="Per-class accuracy (mean of seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
