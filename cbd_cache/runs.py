"""A run folder's life: its name, whether it is done, and saving it.

A run folder (`W/teachers/<name>`, `W/students/<run>`) holds checkpoint.pt, eval.json / eval.md
(the test report), log.jsonl (one line per epoch), run.json (identity, kind, history, meta) and,
while training, resume.pt (`engine.RESUME_FILE`). The identity hashes everything the result depends
on, so a finished run with the same identity is not trained again.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from .checkpoint import save_checkpoint
from .config import Config, load_config, parse_override
from .engine import RESUME_FILE
from .evaluation import write_report
from .models import Network
from .workdir import file_sha256, read_json, write_json

NAME_CHARS = re.compile(r"[^A-Za-z0-9_.+=-]")   # what config.NAME_RE accepts after the first character


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def student_run_name(cfg: Config) -> str:
    """`student.name`, or `student` plus every student setting that differs from the pipeline file's, sorted,
    and the seed last when it differs.

    The reference is the pipeline file with the config's non-student overrides applied, so a name says
    what the student itself does differently, and one config reached twice (say `sweep --seeds 0,1`
    next to a plain `train-student`) is one folder.
    """
    if cfg.student.name:
        return cfg.student.name
    base = [o for o in cfg.overrides if not parse_override(o)[0].startswith("student.")]
    mine, ref = dataclasses.asdict(cfg.student), dataclasses.asdict(load_config(cfg.source, base).student)
    parts = [f"{k}={_text(v)}" for k, v in sorted(mine.items()) if k not in ("name", "seed") and v != ref[k]]
    if mine["seed"] != ref["seed"]:   # last: the seeds of one setting sort together
        parts.append(f"seed={mine['seed']}")
    return NAME_CHARS.sub("-", "_".join(["student", *parts]))


def run_is_done(folder: Path, identity: str) -> bool:
    run_json = folder / "run.json"
    return (folder / "checkpoint.pt").is_file() and run_json.is_file() and read_json(run_json).get("identity") == identity


def save_run(folder: Path, net: Network, spec: dict[str, Any], meta: dict[str, Any], identity: str,
             history: list[dict], report: dict[str, Any], class_names: list[str]) -> Path:
    """Checkpoint, test report and run.json, in that order: run.json last marks the run finished."""
    ckpt = folder / "checkpoint.pt"
    save_checkpoint(ckpt, net, spec, meta)
    report = {**report, "checkpoint_sha256": file_sha256(ckpt), "manifest_fingerprint": meta["manifest_fingerprint"]}
    write_report(folder, meta["name"], meta["kind"], report, class_names)
    write_json(folder / "run.json", {"identity": identity, "history": history, **meta})
    (folder / RESUME_FILE).unlink(missing_ok=True)   # the finished run needs it no more
    return ckpt
