"""Markdown tables: the one writer behind eval.md, results.md, sweep tables and the paper table."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def fmt(value: float | None) -> str:
    """One decimal, or '–' for a missing value (a shot group with no class, a run not yet trained)."""
    return "–" if value is None else f"{value:.1f}"


def pm(s: dict[str, Any]) -> str:
    """A mean ± std statistic as '66.4 ± 0.3', or '–' when there is no value."""
    return "–" if s["mean"] is None else f"{s['mean']:.1f} ± {s['std']:.1f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub table. `align` has one letter per column, l or r (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a row of {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
