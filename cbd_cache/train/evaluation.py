"""Evaluation: top-1, many / medium / few-shot and per-class accuracy, and calibration (15-bin ECE), written as
eval.json, eval.md, per_class.csv and a reliability diagram beside the checkpoint."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cbd_cache.config import Config
from cbd_cache.data.longtail import SHOT_GROUPS, shot_group
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import EvalStream
from cbd_cache.models.networks import Network
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import atomic_write_bytes, write_json
from cbd_cache.system.tables import fmt, markdown_table
from cbd_cache.train.calibration import calibration_report, plot_reliability
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import EVAL_JSON, EVAL_MD, PER_CLASS_CSV, RELIABILITY_PNG


def accuracy_report(labels: np.ndarray, preds: np.ndarray, train_counts: list[int]) -> dict[str, Any]:
    """top1 over all test images; many / medium / few = mean per-class accuracy of the group (percent).

    A group with no classes (say, no class has > 100 images) is None.
    """
    num_classes = len(train_counts)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(float(100.0 * (preds[mask] == c).mean()) if mask.any() else math.nan)
    report: dict[str, Any] = {"top1": float(100.0 * (preds == labels).mean()), "num_test": int(len(labels))}
    groups = [shot_group(n) for n in train_counts]
    for g in SHOT_GROUPS:
        accs = [a for a, gc in zip(per_class, groups) if gc == g and not math.isnan(a)]
        report[g] = float(np.mean(accs)) if accs else None
    report["per_class"] = [None if math.isnan(a) else round(a, 3) for a in per_class]
    report["train_counts"] = list(train_counts)
    report["groups"] = groups
    return report


def eval_loader(manifest: Manifest, split: str, spec: ViewSpec, batch_size: int, runtime: Runtime) -> DataLoader:
    return DataLoader(EvalStream(manifest, split, spec), batch_size=batch_size, **runtime.loader_kwargs())


def evaluate_network(net: Network, manifest: Manifest, cfg: Config, runtime: Runtime, split: str = "test") -> dict:
    """Accuracy and calibration of `net` on one split (the evaluation view)."""
    net = runtime.prepare_model(net)
    out = predict(net, eval_loader(manifest, split, ViewSpec.from_cfg(cfg.views), cfg.eval.batch_size, runtime), runtime)
    return {"split": split, **accuracy_report(out["labels"], out["preds"], manifest.train.class_counts),
            **calibration_report(out["confidences"], out["preds"] == out["labels"])}


def evaluate_splits(net: Network, manifest: Manifest, cfg: Config, runtime: Runtime) -> dict:
    """The headline split's report (`manifest.eval_split`), with every eval split's (val, test) under `splits`.

    Each split's many / medium / few groups use the training split's class counts.
    """
    reports = {s: evaluate_network(net, manifest, cfg, runtime, s) for s in manifest.eval_splits}
    keys = ("top1", "num_test", "many", "medium", "few", "ece", "per_class")
    return {**reports[manifest.eval_split], "splits": {s: {k: r[k] for k in keys} for s, r in reports.items()}}


def split_reports(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{split: report}; a run's own report (`save_run`: the held-out split only) has no `splits`."""
    return report.get("splits") or {report.get("split", "test"): report}


def results_table(rows: list[dict[str, Any]]) -> str:
    """| model | kind | top-1 | many | medium | few | ECE | with one row per evaluated model (ECE: – for NCM)."""
    return markdown_table(["model", "kind", "top-1", "many", "medium", "few", "ECE"],
                          ([r["model"], r["kind"], *(fmt(r.get(k)) for k in ("top1", *SHOT_GROUPS, "ece"))]
                           for r in rows), "llrrrrr")


def per_class_table(report: dict[str, Any], class_names: list[str]) -> str:
    order = np.argsort(report["train_counts"])[::-1]
    return markdown_table(["class", "train images", "group", "accuracy"],
                          ([class_names[c], report["train_counts"][c], report["groups"][c], fmt(report["per_class"][c])]
                           for c in order), "lrlr")


def per_class_csv(report: dict[str, Any], class_names: list[str]) -> str:
    """class, name, train_count, group, accuracy: one line per class of the report's split."""
    lines = ["class,name,train_count,group,accuracy"]
    for c, name in enumerate(class_names):
        acc = report["per_class"][c]
        lines.append(",".join([str(c), '"' + name.replace('"', '""') + '"', str(report["train_counts"][c]),
                               report["groups"][c], "" if acc is None else f"{acc:.3f}"]))
    return "\n".join(lines) + "\n"


def write_report(folder: Path, name: str, kind: str, report: dict[str, Any], class_names: list[str]) -> None:
    """eval.json (keys top1, many, medium, few, ece, calibration, per_class, ...), eval.md, per_class.csv and
    reliability.png (the headline split's) beside the checkpoint."""
    write_json(folder / EVAL_JSON, report)
    md = f"# {kind} {name}\n\n" + results_table([{"model": name, "kind": kind, **report}]) + "\n" + \
        per_class_table(report, class_names)
    (folder / EVAL_MD).write_text(md)
    atomic_write_bytes(folder / PER_CLASS_CSV, per_class_csv(report, class_names).encode())
    title = "\n".join(textwrap.wrap(f"{kind}, {report.get('split', 'test')}: {name}", 52, break_on_hyphens=False)[:3])
    plot_reliability([(title, report["calibration"])], folder / RELIABILITY_PNG)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, runtime: Runtime,
            features: bool = False) -> dict[str, np.ndarray]:
    """Run a model over an EvalStream loader, by row: labels, rows, predictions, top-1 softmax confidences
    (and, if asked, descriptors v and e = h(v))."""
    model.eval()
    out: dict[str, list] = {"labels": [], "rows": [], "preds": [], "confidences": [], "features": [], "embeddings": []}
    for x, y, rows in loader:
        with runtime.autocast():
            x = runtime.to_device(x)
            if features:
                v = model.features(x)
                e = model.projection(v)
                logits = model.classifier(e)
                out["features"].append(v.float().cpu())
                out["embeddings"].append(e.float().cpu())
            else:
                logits, _ = model(x)
        out["preds"].append(logits.argmax(1).cpu())
        out["confidences"].append(torch.softmax(logits.float(), dim=1).amax(dim=1).cpu())
        out["labels"].append(y)
        out["rows"].append(rows)
    result = {k: torch.cat(v).numpy() for k, v in out.items() if v}
    order = np.argsort(result["rows"])
    return {k: v[order] for k, v in result.items()}
