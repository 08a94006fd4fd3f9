"""A run folder's life: its plan (name, folder, recipe), whether it is done, and saving it.

The files of a run folder are named in `workdir.py`. A run's recipe holds everything its result
depends on; its digest is the run's identity, so a finished run with the same identity is not
trained again, and a resumed run must agree with the recipe.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbd_cache.cache.schema import CACHE_SETTINGS
from cbd_cache.config import TABLES, Config, StudentCfg, load_config
from cbd_cache.models.checkpoints import save_checkpoint
from cbd_cache.models.networks import Network
from cbd_cache.system.digests import digest, file_sha256
from cbd_cache.system.storage import write_json
from cbd_cache.train.evaluation import write_report
from cbd_cache.workdir import CHECKPOINT, RECORD, RESUME, read_run_json

NAME_CHARS = re.compile(r"[^A-Za-z0-9_.+=-]")   # what config.NAME_RE accepts after the first character
LOCATIONS = ("data.root",)        # where the data is, not what it is: the manifest's fingerprint covers that
MAX_NAME = 160                    # longer names end in a digest (file systems take 255 bytes)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def flat_config(cfg: Config) -> dict[str, Any]:
    """Every setting by its `--set` key: `section.field`, and `teachers.<name>.field` per teacher."""
    flat = {f"{sec}.{k}": v for sec in TABLES for k, v in dataclasses.asdict(getattr(cfg, sec)).items()}
    flat.update({f"teachers.{t.name}.{k}": v for t in cfg.teachers for k, v in dataclasses.asdict(t).items()})
    return flat


def cache_settings(prov: dict[str, Any]) -> dict[str, Any]:
    """The settings a cache recorded, by their `--set` keys: the views it stored and `CACHE_SETTINGS`."""
    recorded = {f"views.{k}": v for k, v in prov["view_spec"].items() if k != "eval_resize_px"}   # (evaluation only)
    recorded.update({key: prov[name] for key, name in CACHE_SETTINGS.items()})
    return recorded


def run_settings(cfg: Config, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings a student run's result depends on: its name and its identity cover exactly these.

    The student's own, the views, the data, and, as far as the run uses them, the cache (view seed,
    view budget and its allocation, dtype, logits), the teachers it distils or starts from, and the teachers' data
    augmentation that a `type = data_aug` student shares. `cache`: the cache's own record of its settings
    (`cache_settings`), which then wins over the config's (a run is recorded under what it read).
    """
    s = cfg.student
    cached = s.targets in ("cache", "replay") or frozen_from_cache(s)
    used = set(cfg.student_teachers()) if s.targets != "none" else set()
    if s.init.startswith("teachers/"):
        used.add(s.init.split("/", 1)[1])
    keys = [f"student.{k}" for k in _fields(cfg.student) if k != "name"]
    keys += [f"views.{k}" for k in _fields(cfg.views)]
    keys += [f"data.{k}" for k in _fields(cfg.data) if f"data.{k}" not in LOCATIONS]
    if cached:
        keys += list(CACHE_SETTINGS)
    keys += [f"teachers.{t.name}.{k}" for t in cfg.teachers if t.name in used for k in _fields(t) if k != "name"]
    if s.type == "data_aug":
        keys += ["teacher.aug_style", "teacher.noise_std", "teacher.jitter"]
    flat = flat_config(cfg)
    if cached and cache:
        flat.update({k: tuple(v) if isinstance(flat[k], tuple) else v for k, v in cache.items() if k in flat})
    return {k: flat[k] for k in keys}


def frozen_from_cache(s: StudentCfg) -> bool:
    """cRT or LWS on a teacher: trained on its cached descriptors (on a student's features of the images otherwise)."""
    return (s.classifier_only or s.rebalance == "lws") and s.init.startswith("teachers/")


def _fields(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def student_run_name(cfg: Config, cache: dict[str, Any] | None = None) -> str:
    """`student.name`, or `student` plus every run setting (`run_settings`) that differs from the pipeline file's.

    The student's own settings come first and bare (`alpha=0.2`), then the others by their full key
    (`views.image_px=32`; `teacher.epochs=3` when every teacher used changed alike), sorted, and the
    seed last. So a run whose config differs never lands in a finished run's folder, and one config
    reached twice (say `sweep --seeds 0,1` next to a plain `train-student`) is one folder.
    """
    if cfg.student.name:
        return cfg.student.name
    ref = flat_config(load_config(cfg.source))
    mine = flat_config(cfg)
    settings = run_settings(cfg, cache)
    changed = {k: v for k, v in settings.items() if v != ref.get(k)}
    _collapse_teachers(changed, list(settings), mine, ref)
    own = sorted(k for k in changed if k.startswith("student.") and k != "student.seed")
    parts = [f"{k[8:]}={_text(changed[k])}" for k in own]
    parts += [f"{k}={_text(v)}" for k, v in sorted(changed.items()) if not k.startswith("student.")]
    if "student.seed" in changed:   # last: the seeds of one setting sort together
        parts.append(f"seed={changed['student.seed']}")
    name = NAME_CHARS.sub("-", "_".join(["student", *parts]))
    return name if len(name) <= MAX_NAME else f"{name[:MAX_NAME - 17]}_{digest(parts)}"


def _collapse_teachers(changed: dict[str, Any], keys: list[str], mine: dict[str, Any], ref: dict[str, Any]) -> None:
    """`teachers.<t>.f` of every teacher used -> one `teacher.f` when they all took the teacher section's change."""
    for f in {k.rsplit(".", 1)[1] for k in keys if k.startswith("teachers.")}:
        per_teacher = [k for k in keys if k.startswith("teachers.") and k.endswith(f".{f}")]
        section = f"teacher.{f}"
        if mine[section] != ref[section] and all(k in changed and changed[k] == mine[section] for k in per_teacher):
            for k in per_teacher:
                changed.pop(k)
            changed[section] = mine[section]


@dataclass
class RunPlan:
    """What one training run is, before it trains: its folder and the recipe its result depends on."""

    name: str
    folder: Path
    recipe: dict[str, Any]       # what a resumed run must agree with
    kind: str                    # how reports name it: "teacher (standard)", "CBD K=4 (cache)", ...
    role: str                    # "teacher" or "student": how its log lines are tagged

    @property
    def identity(self) -> str:
        return digest(self.recipe)

    @property
    def tag(self) -> str:
        return f"{self.role} {self.name}"

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT


def is_done(folder: Path, identity: str | None = None) -> bool:
    """The run finished saving: its run.json vouches for its checkpoint (records its SHA-256), and, when
    `identity` is given, the run is that one. A finished run is never trained again."""
    ckpt, record = folder / CHECKPOINT, folder / RECORD
    if not (ckpt.is_file() and record.is_file()):
        return False
    run = read_run_json(record)
    return (run.get("checkpoint_sha256") == file_sha256(ckpt)
            and (identity is None or run.get("identity") == identity))


def save_run(folder: Path, net: Network, spec: dict[str, Any], meta: dict[str, Any], identity: str,
             history: list[dict], report: dict[str, Any], class_names: list[str]) -> Path:
    """Checkpoint, test report and run.json, in that order: run.json last, with the checkpoint's
    SHA-256, marks the run finished. A crash in between leaves a checkpoint that no run.json vouches for."""
    ckpt = folder / CHECKPOINT
    (folder / RECORD).unlink(missing_ok=True)   # the old record must not vouch for the new weights
    save_checkpoint(ckpt, net, spec, meta)
    sha = file_sha256(ckpt)
    report = {**report, "checkpoint_sha256": sha, "manifest_fingerprint": meta["manifest_fingerprint"]}
    write_report(folder, meta["name"], meta["kind"], report, class_names)
    write_json(folder / RECORD, {"identity": identity, "checkpoint_sha256": sha, "history": history, **meta})
    (folder / RESUME).unlink(missing_ok=True)   # the finished run needs it no more
    return ckpt
