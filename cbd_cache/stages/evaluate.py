"""`cbd-cache evaluate`: every finished teacher and student of the workdir, into results.md / results.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import FileDamaged
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import write_json
from cbd_cache.system.tables import fmt
from cbd_cache.train.evaluation import evaluate_splits, results_table, split_reports, write_report
from cbd_cache.train.runs import is_done
from cbd_cache.train.summaries import write_evaluation
from cbd_cache.workdir import CHECKPOINT, EVAL_JSON, RECORD, Workdir, read_run_json, rebuild_command


def evaluate_checkpoint(folder: Path, name: str, kind: str, manifest: Manifest, cfg: Config,
                        runtime: Runtime) -> dict[str, Any]:
    """The test report of the checkpoint in `folder`, reusing eval.json while the checkpoint is unchanged."""
    ckpt = folder / CHECKPOINT
    sha = file_sha256(ckpt)
    eval_json = folder / EVAL_JSON
    report = {}
    if eval_json.is_file():
        try:
            report = read_run_json(eval_json)
        except FileDamaged as e:        # only a record of what evaluation gives: evaluate again
            log(f"[evaluate] {str(e).split('; write it again')[0]}; evaluating {name} again")
        if (report.get("checkpoint_sha256") == sha and report.get("manifest_fingerprint") == manifest.fingerprint
                and set(manifest.eval_splits) <= set(split_reports(report)) and "calibration" in report):
            return report
    net, _ = load_checkpoint(ckpt)
    report = evaluate_splits(net, manifest, cfg, runtime)
    report.update(checkpoint_sha256=sha, manifest_fingerprint=manifest.fingerprint)
    write_report(folder, name, kind, report, manifest.class_names)
    history = read_run_json(folder / RECORD).get("history") if (folder / RECORD).is_file() else None
    write_evaluation(folder, cfg.pipeline.tensorboard, report["splits"], history[-1]["step"] if history else 0)
    for split, r in report["splits"].items():
        log(f"[evaluate] {kind} {name} {split}: top-1 {r['top1']:.2f}  many {fmt(r['many'])}  "
            f"medium {fmt(r['medium'])}  few {fmt(r['few'])}  ECE {fmt(r['ece'])}")
    return report


def reportable(folder: Path, ref: str) -> bool:
    """A finished run (`is_done`) is reported; one whose checkpoint no run.json vouches for is left out, with a warning."""
    if is_done(folder):
        return True
    if (folder / CHECKPOINT).is_file():
        log(f"[evaluate] warning: {ref} left out: {folder / CHECKPOINT} is not the one its run.json records (torn, "
            f"or a run cut short while saving); write it again: {rebuild_command(folder / CHECKPOINT)}")
    return False


def evaluate_workdir(cfg: Config, wd: Workdir, runtime: Runtime) -> list[dict[str, Any]]:
    """Evaluate every teacher and student in the workdir; write results.md / results.json; return the rows."""
    manifest = Manifest.load(wd.manifest)
    rows = []
    for t in cfg.teachers:
        if reportable(wd.teacher_dir(t.name), f"teachers/{t.name}"):
            r = evaluate_checkpoint(wd.teacher_dir(t.name), t.name, t.kind(), manifest, cfg, runtime)
            rows.append({"model": t.name, "kind": t.kind(), **r})
    for s in wd.students():
        folder = wd.student_dir(s)
        if reportable(folder, f"students/{s}"):
            kind = read_run_json(folder / RECORD).get("kind", "?")
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
    keys = ("top1", "many", "medium", "few", "ece")
    write_json(wd.results_json, [{**{k: r[k] for k in ("model", "kind", *keys, "per_class")},
                                  "splits": {s: {k: split_reports(r)[s][k] for k in keys} for s in splits}}
                                 for r in rows])
    return rows
