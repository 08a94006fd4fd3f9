"""Stage 1: train a teacher with instance sampling, standard or data-augmentation views.

A teacher with `source = "imported"` is not trained here: `cbd-cache import-teacher` (imported.py)
makes it from a checkpoint, and `train_teacher` only checks that it is there and still matches its
`[[teachers]]` entry.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from cbd_cache.config import Config, TeacherCfg
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import TrainStream
from cbd_cache.errors import ConfigError
from cbd_cache.models.networks import Network
from cbd_cache.system.digests import digest
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.runs import RunPlan, is_done
from cbd_cache.train.skeleton import train_model
from cbd_cache.train.steps import cross_entropy_step
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import CHECKPOINT, RECORD, Workdir, read_run_json

# what an imported teacher's checkpoint depends on in its [[teachers]] entry (the rest is metadata)
IMPORTED_FIELDS = ("arch", "mean", "std")


def teacher_recipe(cfg: Config, t: TeacherCfg, manifest: Manifest) -> dict:
    """What a finished teacher depends on; a checkpoint with the same recipe is not retrained, nor resumed under another."""
    return {"teacher": dataclasses.asdict(t), "views": dataclasses.asdict(cfg.views), "manifest": manifest.fingerprint}


def imported_identity(t: TeacherCfg, manifest: Manifest, source_sha256: str | None) -> str:
    """An imported teacher's identity: its source file, the entry's architecture and normalisation, the data."""
    return digest({"imported": {k: getattr(t, k) for k in IMPORTED_FIELDS}, "source_sha256": source_sha256,
                   "manifest": manifest.fingerprint})


def teacher_network(t: TeacherCfg, manifest: Manifest, head: str = "cosine") -> Network:
    """A new network for teacher `t` on this dataset: its architecture, classes and input normalisation."""
    if t.mean and len(t.mean) != manifest.channels:
        raise ConfigError(f"teachers.{t.name}.mean={t.mean}: the dataset has {manifest.channels} channel(s); "
                          "give one mean and one std per channel")
    return Network(t.arch, manifest.channels, manifest.num_classes, t.gamma, head=head, mean=t.mean, std=t.std)


def imported_teacher(t: TeacherCfg, wd: Workdir, manifest: Manifest) -> Path:
    """An imported teacher's checkpoint, once `import-teacher` has made it under the entry's current settings."""
    folder = wd.teacher_dir(t.name)
    run = read_run_json(folder / RECORD) if (folder / RECORD).is_file() else {}
    if not is_done(folder, imported_identity(t, manifest, run.get("source_sha256"))):
        problem = ("was imported under another arch, mean / std or dataset" if run.get("source_sha256")
                   else "has no checkpoint yet")
        raise FileNotFoundError(f"teacher {t.name!r} (source = \"imported\") {problem}: run "
                                f"`cbd-cache import-teacher {t.name} --checkpoint FILE`")
    log(f"[teacher {t.name}] imported from {run['source']} ({run['source_sha256'][:12]}); nothing to train")
    return folder / CHECKPOINT


def teacher_plan(cfg: Config, t: TeacherCfg, wd: Workdir, manifest: Manifest) -> RunPlan:
    return RunPlan(t.name, wd.teacher_dir(t.name), teacher_recipe(cfg, t, manifest), t.kind(), "teacher")


def train_teacher(cfg: Config, t: TeacherCfg, wd: Workdir, runtime: Runtime) -> Path:
    """Train teacher `t`, unless a finished run of the same recipe is there. An imported teacher
    (`source = "imported"`) is only checked: `cbd-cache import-teacher` made it."""
    manifest = Manifest.load(wd.manifest)
    if t.source == "imported":
        return imported_teacher(t, wd, manifest)
    plan = teacher_plan(cfg, t, wd, manifest)
    if is_done(plan.folder, plan.identity):
        log(f"[teacher {t.name}] already trained with this config ({plan.folder}); skipping")
        return plan.checkpoint
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="instance", seed=t.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=t.shuffle_buffer, augment=t)
    log(f"[teacher {t.name}] {t.type} views, instance sampling")
    meta = {"kind": plan.kind, "name": t.name, "type": t.type, "seed": t.seed, "config": dataclasses.asdict(t),
            "views": dataclasses.asdict(cfg.views), "manifest_fingerprint": manifest.fingerprint}
    return train_model(plan, t, lambda: teacher_network(t, manifest), stream, cross_entropy_step(runtime), runtime,
                       cfg, manifest, meta, splits=("train",))
