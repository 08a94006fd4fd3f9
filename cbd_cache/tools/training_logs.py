"""`cbd-cache logs`: every run's log.jsonl, as the last epoch per run or as one CSV."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from cbd_cache.errors import FileDamaged
from cbd_cache.workdir import LOG, RECORD, RUN_KINDS, read_run_json


def run_logs(root: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(`teachers/<name>` or `students/<run>`, its log.jsonl lines) for every run folder under workdir `root`;
    a finished run without its log.jsonl gives the same lines from its run.json's history."""
    runs = []
    for kind in RUN_KINDS:
        for folder in sorted(p for p in (root / kind).glob("*") if (p / LOG).is_file() or (p / RECORD).is_file()):
            if (folder / LOG).is_file():
                runs.append((f"{kind}/{folder.name}", read_log(folder / LOG)))
            elif history := read_run_json(folder / RECORD).get("history"):
                runs.append((f"{kind}/{folder.name}", history))
    return runs


def read_log(path: Path) -> list[dict[str, Any]]:
    """A log.jsonl's lines; a torn one is `FileDamaged`, naming the file and how to get it back."""
    lines = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            fix = ("remove it: `cbd-cache logs` then reads the same lines from the run's run.json"
                   if (path.parent / RECORD).is_file() else
                   "run the training command again: it writes the file again from its resume point")
            raise FileDamaged(f"{path}, line {n}, is torn (not a JSON object); {fix}")
        lines.append(entry)
    return lines


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
