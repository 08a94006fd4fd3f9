"""A run's training, outside log.jsonl: TensorBoard curves in the run folder, and every run's log as one CSV.

log.jsonl stays the source of truth; the curves are its lines (`fit` hands each to `Summaries.epoch`)
plus the evaluation reports. Event files go straight into the run folder, so `tensorboard --logdir
W/students` shows one run per student (a sweep: one per grid point and seed) named as its folder.

    loss/total, loss/<term>     the epoch's mean loss and each term the step reports (ce, distill, kd)
    lr, images_per_s            at the end of each epoch
    <split>/top1, <split>/many, <split>/medium, <split>/few     at the final step, where evaluated
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cbd_cache.data.longtail import SHOT_GROUPS
from cbd_cache.system.logs import log

NOT_CURVES = ("epoch", "step")


PLAIN = ("lr", "images_per_s")


_warned = False


def open_writer(folder: Path, purge_step: int | None = None):
    """A SummaryWriter on `folder`, or None (with one line saying so) when the tensorboard package is absent."""
    global _warned
    try:
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard is an optional extra
    except ImportError:
        if not _warned:
            log("[tensorboard] the tensorboard package is not installed: no event files (log.jsonl is written). "
                "pip install 'cbd-cache[tensorboard]', or set pipeline.tensorboard=false to silence this")
            _warned = True
        return None
    return SummaryWriter(str(folder), purge_step=purge_step, flush_secs=30)


def curve_name(key: str) -> str:
    if key in PLAIN:
        return key
    return "loss/total" if key == "loss" else f"loss/{key}"


class Summaries:
    """Epoch curves of one training run; the writer opens at the first epoch and purges anything a
    cut-short earlier run logged from that step on, so a resumed or restarted run draws one line."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled, self.writer = folder, enabled, None

    def epoch(self, entry: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = open_writer(self.folder, purge_step=int(entry["step"]))
            if self.writer is None:
                self.enabled = False
                return
        for key, value in entry.items():
            if key not in NOT_CURVES and isinstance(value, (int, float)):
                self.writer.add_scalar(curve_name(key), value, int(entry["step"]))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_evaluation(folder: Path, enabled: bool, reports: dict[str, dict[str, Any]], step: int) -> None:
    """Top-1, many / medium / few and ECE of each report (by split name) at `step`; a group with no class is left out."""
    if not enabled or (writer := open_writer(folder)) is None:
        return
    for split, report in reports.items():
        for key in ("top1", *SHOT_GROUPS, "ece"):
            if report.get(key) is not None:
                writer.add_scalar(f"{split}/{key}", report[key], step)
    writer.close()
