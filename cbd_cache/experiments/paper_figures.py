"""Figures 1 and 4 of the paper, and the reliability diagrams, from what the runs kept (no model is run here).

Figure 1: the training class counts, and a 2-D PCA of val features of 3 head and 3 tail classes under
Instance and CBD_ENS features. Figure 4: test images, 4 from few-shot classes and 4 from the others
(drawn at random, seeded: not picked), each with its 5 nearest training images under each model's
features, framed green where the neighbour is of the query's class and red where it is not. The
features are those NCM's pass kept (`ncm_report(keep_features=True)`), compared as NCM compares
them: L2-normalised, centred on the training mean, normalised again, nearest by cosine.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from matplotlib import font_manager, rc_context
from matplotlib.figure import Figure  # drawn straight to a file: no pyplot, no GUI backend
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from cbd_cache.data.longtail import shot_group

GROUP_COLOURS = {"many": "C0", "medium": "C1", "few": "C3"}
# Faces that `make data` installs (fonts-noto-cjk, fonts-wqy-*, fonts-arphic-*, ...), first found is used.
CJK_FAMILIES = ("Noto Sans CJK SC", "WenQuanYi Zen Hei", "AR PL UMing CN", "IPAGothic", "HanaMinA")


def text_fonts() -> dict:
    """rcParams whose text falls back to an installed CJK face: the glyph source's class names are hanzi,
    which DejaVu Sans draws as empty boxes."""
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return {"font.family": ["DejaVu Sans", *[f for f in CJK_FAMILIES if f in installed][:1]]}


def with_text_fonts(draw: Callable) -> Callable:
    """Draw under `text_fonts()` (text takes its font when created, so the whole figure is drawn inside)."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with rc_context(text_fonts()):
            return draw(*args, **kwargs)
    return drawn


def ncm_space(features: np.ndarray, center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features in NCM's space, the centre used): normalised, centred on `center` (default: their mean), normalised."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    center = f.mean(axis=0) if center is None else center
    g = f - center
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12), center


def head_and_tail(counts: Sequence[int], k: int = 3) -> tuple[list[int], list[int]]:
    """The k classes with the most and the k with the fewest training images (ties: lower index first)."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    return order[:k], sorted(order[-k:], key=lambda c: (counts[c], c))


def pca2(x: np.ndarray) -> np.ndarray:
    """The 2-D principal-component projection of the rows of x."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


@with_text_fonts
def plot_figure1(counts: Sequence[int], names: Sequence[str], panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
                 split: str, path: Path) -> None:
    """Class counts, then per (title, features, labels) of `split` a PCA of its head and tail classes."""
    head, tail = head_and_tail(counts)
    fig = Figure(figsize=(4.2 * (1 + len(panels)), 4.6))
    axes = fig.subplots(1, 1 + len(panels))
    fig.subplots_adjust(left=0.06, right=0.99, top=0.92, bottom=0.27, wspace=0.18)
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    ax = axes[0]
    ax.bar(range(len(order)), [counts[c] for c in order], color=[GROUP_COLOURS[shot_group(counts[c])] for c in order])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    if len(order) <= 20:
        ax.set_xticks(range(len(order)), [names[c] for c in order], rotation=60, ha="right", fontsize=7)
    else:
        ax.set(xlabel="classes, largest first")
    ax.set(ylabel="training images", title="Training images per class")
    ax.legend(handles=[Patch(color=colour, label=f"{g}-shot") for g, colour in GROUP_COLOURS.items()], fontsize=7)
    for ax, (title, features, labels) in zip(axes[1:], panels):
        chosen = np.isin(labels, head + tail)
        xy = pca2(ncm_space(features[chosen])[0])
        for i, c in enumerate(head + tail):
            pts = xy[labels[chosen] == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, marker="o" if c in head else "x", color=f"C{i}",
                       label=f"{names[c]} ({counts[c]}, {'head' if c in head else 'tail'})")
        ax.set(title=f"{title}: {split} features, PCA", xlabel="PC 1", ylabel="PC 2")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5 + 0.5 / (1 + len(panels)), 0.0),
               ncol=3, fontsize=8, markerscale=2.5, title="class (training images): o head, x tail", title_fontsize=8)
    fig.savefig(path, dpi=110)


def pick_queries(labels: np.ndarray, counts: Sequence[int], seed: int, few: int = 4, others: int = 4) -> list[int]:
    """Test rows: `few` from few-shot classes and `others` from the rest, one per class in turn, drawn with a seed."""
    rng = np.random.default_rng([seed, 0xF164])
    picked = []
    for want, in_group in ((few, lambda c: shot_group(counts[c]) == "few"),
                           (others, lambda c: shot_group(counts[c]) != "few")):
        classes = [int(c) for c in rng.permutation(len(counts)) if in_group(c) and (labels == c).any()]
        for i in range(min(want, sum(int((labels == c).sum()) for c in classes))):
            pool = np.flatnonzero(labels == classes[i % len(classes)])
            pool = pool[~np.isin(pool, picked)]
            picked.append(int(rng.choice(pool)))
    return picked


def nearest(train: np.ndarray, queries: np.ndarray, k: int = 5) -> np.ndarray:
    """Indices of the k nearest training rows of each query, in NCM's space (cosine), nearest first."""
    t, center = ncm_space(train)
    q, _ = ncm_space(queries, center)
    sims = q @ t.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _show(ax, image: np.ndarray, frame: str | None = None) -> None:
    ax.imshow(image.squeeze(0) if image.shape[0] == 1 else image.transpose(1, 2, 0),
              cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_edgecolor(frame)
            spine.set_linewidth(3)


@with_text_fonts
def plot_figure4(queries: Sequence[tuple[np.ndarray, int]], neighbours: Sequence[tuple[str, list[list[tuple[np.ndarray, int]]]]],
                 names: Sequence[str], counts: Sequence[int], path: Path) -> None:
    """Rows: a query image (its class, shot group), then per model its neighbours (image, label), framed by rightness."""
    k = len(neighbours[0][1][0])
    widths = [1.0] + [0.35, *[1.0] * k] * len(neighbours)     # query, then per model a gap and k neighbours
    cell, row = 0.8, 1.0           # a row is a cell and room for the class name under a wrong neighbour
    width, height = cell * sum(widths) + 0.7, row * len(queries) + 0.8
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(len(queries), len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})
    fig.subplots_adjust(left=0.7 / width, right=0.995, bottom=0.2 / height, top=1 - 0.75 / height, wspace=0.1,
                        hspace=(row - cell) / cell + 0.05)
    for r, (image, label) in enumerate(queries):
        _show(axes[r, 0], image)
        axes[r, 0].set_ylabel(f"{names[label]}\n{shot_group(counts[label])} ({counts[label]})", fontsize=6)
        for m, (title, rows) in enumerate(neighbours):
            spacer = axes[r, 1 + m * (k + 1)]
            spacer.axis("off")
            for j, (nimage, nlabel) in enumerate(rows[r]):
                ax = axes[r, 2 + m * (k + 1) + j]
                _show(ax, nimage, "tab:green" if nlabel == label else "tab:red")
                if nlabel != label:
                    ax.set_xlabel(names[nlabel], fontsize=6, labelpad=1, color="tab:red")
            if r == 0:
                axes[0, 2 + m * (k + 1)].set_title(f"{title}: {k} nearest training images", fontsize=7, loc="left")
    axes[0, 0].set_title("test image", fontsize=7)
    fig.suptitle("Nearest training images (green frame: the test image's class; red: another class)", fontsize=9)
    fig.savefig(path, dpi=110)
