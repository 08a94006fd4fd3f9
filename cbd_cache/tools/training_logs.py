"""`cbd-cache logs`: every run's log.jsonl, as the last epoch per run or as one CSV."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cbd_cache.workdir import LOG, RUN_KINDS


def run_logs(root: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(`teachers/<name>` or `students/<run>`, its log.jsonl lines) for every run folder under workdir `root`."""
    runs = []
    for kind in RUN_KINDS:
        for path in sorted((root / kind).glob(f"*/{LOG}")):
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            runs.append((f"{kind}/{path.parent.name}", lines))
    return runs


def logs_csv(root: Path) -> str:
    """One row per epoch per run: run, epoch, step, then every other key any log.jsonl holds (blank where absent)."""
    runs = run_logs(root)
    keys = ["epoch", "step"]
    for _, lines in runs:
        keys += [k for line in lines for k in line if k not in keys]
    out = io.StringIO()
    writer = csv.DictWriter(out, ["run", *keys], restval="", lineterminator="\n")
    writer.writeheader()
    for run, lines in runs:
        for line in lines:
            writer.writerow({"run": run, **line})
    return out.getvalue()


def last_epochs_text(root: Path) -> str:
    """The last epoch of every run under workdir `root`, a line each."""
    runs = run_logs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no teachers/*/{LOG} or students/*/{LOG}; train a model first")
    lines = []
    for run, epochs in runs:
        last = epochs[-1] if epochs else {}
        terms = "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "step"))
        lines.append(f"{run}: epoch {last.get('epoch', 0)}, step {last.get('step', 0)}  {terms}")
    return "\n".join(lines)
