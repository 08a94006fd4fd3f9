"""The grid's figure: CBD_ENS minus the best non-CBD row, one square per cell, annotated with mean ± std."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import (
    Figure,  # figures drawn straight to files: no pyplot, no GUI backend
)


def heatmap_entries(table: dict[str, Any], prefix: str = "") -> list[tuple[str, str, dict[str, Any]]]:
    """(row, column, cbd_pays) per cell: the cell label's first axis is the column, the others the row."""
    out = []
    for c in table["cells"]:
        if c.get("cbd_pays"):
            first, _, rest = c["cell"].partition(", ")
            out.append((rest, f"{prefix}{first}", c["cbd_pays"]))
    return out


def plot_cbd_pays(entries: Sequence[tuple[str, str, dict[str, Any]]], path: Path, title: str) -> Path | None:
    """A diverging heatmap (green: CBD_ENS ahead) of the per-cell difference; None when no cell has one."""
    entries = [e for e in entries if e[2]["diff"]["mean"] is not None]
    if not entries:
        return None
    rows = list(dict.fromkeys(r for r, _, _ in entries))
    cols = list(dict.fromkeys(c for _, c, _ in entries))
    grid = np.full((len(rows), len(cols)), np.nan)
    for r, c, pays in entries:
        grid[rows.index(r), cols.index(c)] = pays["diff"]["mean"]
    span = max(1.0, float(np.nanmax(np.abs(grid))))
    fig = Figure(figsize=(1.9 * len(cols) + 2.2, 1.1 * len(rows) + 1.6))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=-span, vmax=span, aspect="auto")
    for r, c, pays in entries:
        d = pays["diff"]
        ax.text(cols.index(c), rows.index(r), f"{d['mean']:+.1f} ± {d['std']:.1f}\n{pays['ahead']}/{pays['of']} ahead\n"
                f"vs {pays['best']}", ha="center", va="center", fontsize=7.5)
    ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=15)
    ax.set_yticks(range(len(rows)), [r or "-" for r in rows], fontsize=8)
    ax.set_title(f"{title}\nCBD_ENS minus the best non-CBD row, top-1 points (mean ± std over replicates)", fontsize=9)
    fig.colorbar(im, ax=ax, label="points")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
