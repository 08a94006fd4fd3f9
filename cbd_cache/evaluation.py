"""Evaluation: top-1, many / medium / few-shot accuracy and per-class accuracy, as JSON and Markdown."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from .checkpoint import RUN_JSON, load_checkpoint, run_finished
from .config import Config
from .data.longtail import SHOT_GROUPS, shot_group
from .data.manifest import Manifest
from .data.stream import EvalStream
from .engine import predict
from .logs import log
from .models import Network
from .runtime import Runtime
from .tables import fmt, markdown_table
from .summaries import write_evaluation
from .views import ViewSpec
from .workdir import Workdir, file_sha256, read_json, write_json


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
    net = runtime.prepare_model(net)
    out = predict(net, eval_loader(manifest, split, ViewSpec.from_cfg(cfg.views), cfg.eval.batch_size, runtime), runtime)
    return {"split": split, **accuracy_report(out["labels"], out["preds"], manifest.train.class_counts)}


def evaluate_splits(net: Network, manifest: Manifest, cfg: Config, runtime: Runtime) -> dict:
    """The headline split's report (`manifest.eval_split`), with every eval split's (val, test) under `splits`.

    Each split's many / medium / few groups use the training split's class counts.
    """
    reports = {s: evaluate_network(net, manifest, cfg, runtime, s) for s in manifest.eval_splits}
    keys = ("top1", "num_test", "many", "medium", "few", "per_class")
    return {**reports[manifest.eval_split], "splits": {s: {k: r[k] for k in keys} for s, r in reports.items()}}


def split_reports(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{split: report}; a report written before it had `splits` covers its own split only."""
    return report.get("splits") or {report.get("split", "test"): report}


def results_table(rows: list[dict[str, Any]]) -> str:
    """| model | kind | top-1 | many | medium | few | with one row per evaluated model."""
    return markdown_table(["model", "kind", "top-1", "many", "medium", "few"],
                          ([r["model"], r["kind"], *(fmt(r[k]) for k in ("top1", *SHOT_GROUPS))] for r in rows), "llrrrr")


def per_class_table(report: dict[str, Any], class_names: list[str]) -> str:
    order = np.argsort(report["train_counts"])[::-1]
    return markdown_table(["class", "train images", "group", "accuracy"],
                          ([class_names[c], report["train_counts"][c], report["groups"][c], fmt(report["per_class"][c])]
                           for c in order), "lrlr")


def write_report(folder: Path, name: str, kind: str, report: dict[str, Any], class_names: list[str]) -> None:
    """eval.json (keys top1, many, medium, few, per_class, ...) and eval.md beside the checkpoint."""
    write_json(folder / "eval.json", report)
    md = f"# {kind} {name}\n\n" + results_table([{"model": name, "kind": kind, **report}]) + "\n" + \
        per_class_table(report, class_names)
    (folder / "eval.md").write_text(md)


def evaluate_checkpoint(folder: Path, name: str, kind: str, manifest: Manifest, cfg: Config,
                        runtime: Runtime) -> dict[str, Any]:
    """The test report of the checkpoint in `folder`, reusing eval.json while the checkpoint is unchanged."""
    ckpt = folder / "checkpoint.pt"
    sha = file_sha256(ckpt)
    eval_json = folder / "eval.json"
    if eval_json.is_file():
        report = read_json(eval_json)
        if (report.get("checkpoint_sha256") == sha and report.get("manifest_fingerprint") == manifest.fingerprint
                and set(manifest.eval_splits) <= set(split_reports(report))):
            return report
    net, _ = load_checkpoint(ckpt)
    report = evaluate_splits(net, manifest, cfg, runtime)
    report.update(checkpoint_sha256=sha, manifest_fingerprint=manifest.fingerprint)
    write_report(folder, name, kind, report, manifest.class_names)
    history = read_json(folder / "run.json").get("history") if (folder / "run.json").is_file() else None
    write_evaluation(folder, cfg.pipeline.tensorboard, report["splits"], history[-1]["step"] if history else 0)
    for split, r in report["splits"].items():
        log(f"[evaluate] {kind} {name} {split}: top-1 {r['top1']:.2f}  many {fmt(r['many'])}  "
            f"medium {fmt(r['medium'])}  few {fmt(r['few'])}")
    return report


def finished(folder: Path, ref: str) -> bool:
    """A run to report: its run.json vouches for its checkpoint. One that does not is left out, with a warning."""
    if run_finished(folder):
        return True
    if (folder / "checkpoint.pt").is_file():
        log(f"[evaluate] warning: {ref} left out: its checkpoint.pt is not the one its run.json records "
            "(a run cut short while saving); train it again")
    return False


def evaluate_workdir(cfg: Config, wd: Workdir, runtime: Runtime) -> list[dict[str, Any]]:
    """Evaluate every teacher and student in the workdir; write results.md / results.json; return the rows."""
    manifest = Manifest.load(wd.manifest)
    rows = []
    for t in cfg.teachers:
        if finished(wd.teacher_dir(t.name), f"teachers/{t.name}"):
            r = evaluate_checkpoint(wd.teacher_dir(t.name), t.name, t.kind(), manifest, cfg, runtime)
            rows.append({"model": t.name, "kind": t.kind(), **r})
    for s in wd.students():
        folder = wd.student_dir(s)
        if finished(folder, f"students/{s}"):
            kind = read_json(folder / RUN_JSON)["kind"]
            rows.append({"model": s, "kind": kind, **evaluate_checkpoint(folder, s, kind, manifest, cfg, runtime)})
    if not rows:
        raise FileNotFoundError(f"{wd.root}: no teacher or student checkpoints to evaluate")
    splits = manifest.eval_splits
    tables = {s: results_table([{**r, **split_reports(r)[s]} for r in rows]) for s in splits}
    if len(splits) == 1:
        md = f"# Results: {cfg.pipeline.name} ({manifest.splits[splits[0]].num_samples} {splits[0]} images)\n\n"
        md += tables[splits[0]]
    else:
        md = f"# Results: {cfg.pipeline.name}\n\n" + "\n".join(
            f"## {s} ({manifest.splits[s].num_samples} images)\n\n{tables[s]}" for s in splits)
    wd.results_md.write_text(md)
    write_json(wd.results_json, [{**{k: r[k] for k in ("model", "kind", "top1", "many", "medium", "few", "per_class")},
                                  "splits": {s: {k: split_reports(r)[s][k] for k in ("top1", "many", "medium", "few")}
                                             for s in splits}} for r in rows])
    return rows
