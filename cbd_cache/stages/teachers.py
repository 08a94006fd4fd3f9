"""Stage 1: train a teacher with instance sampling, standard or data-augmentation views.

A teacher with `source = "imported"` is not trained here: `cbd-cache import-teacher` (external.py)
makes it from a checkpoint, and `train_teacher` only checks that it is there and still matches its
`[[teachers]]` entry.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

from cbd_cache.config import Config, TeacherCfg
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.stream import TrainStream
from cbd_cache.errors import ConfigError
from cbd_cache.models.checkpoints import network_spec
from cbd_cache.models.networks import Network
from cbd_cache.system.digests import digest
from cbd_cache.system.locks import hold, run_lock
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.seeding import seed_everything
from cbd_cache.system.storage import read_json
from cbd_cache.train.engine import fit
from cbd_cache.train.evaluation import evaluate_network
from cbd_cache.train.runs import run_is_done, save_run
from cbd_cache.train.steps import cross_entropy_step
from cbd_cache.train.summaries import Summaries, write_evaluation
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import Workdir

# fields added to TeacherCfg after workdirs existed: they enter a trained teacher's identity only when
# set, so the teachers of those workdirs are not trained again
LATER_FIELDS = {"source": "trained", "mean": [], "std": []}


# what an imported teacher's checkpoint depends on in its [[teachers]] entry (the rest is metadata)
IMPORTED_FIELDS = ("arch", "mean", "std")


def teacher_recipe(cfg: Config, t: TeacherCfg, manifest: Manifest) -> dict:
    """What a finished teacher depends on; a checkpoint with the same recipe is not retrained, nor resumed under another."""
    teacher = {k: v for k, v in dataclasses.asdict(t).items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    return {"teacher": teacher, "views": dataclasses.asdict(cfg.views), "manifest": manifest.fingerprint}


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
    run = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
    if not run_is_done(folder, imported_identity(t, manifest, run.get("source_sha256"))):
        problem = ("was imported under another arch, mean / std or dataset" if run.get("source_sha256")
                   else "has no checkpoint yet")
        raise FileNotFoundError(f"teacher {t.name!r} (source = \"imported\") {problem}: run "
                                f"`cbd-cache import-teacher {t.name} --checkpoint FILE`")
    log(f"[teacher {t.name}] imported from {run['source']} ({run['source_sha256'][:12]}); nothing to train")
    return folder / "checkpoint.pt"


def teacher_identity(cfg: Config, t: TeacherCfg, manifest: Manifest) -> str:
    return digest(teacher_recipe(cfg, t, manifest))


def train_teacher(cfg: Config, t: TeacherCfg, wd: Workdir, runtime: Runtime) -> Path:
    """Under the teacher folder's lock (rank 0's): two processes never train one teacher at once.
    An imported teacher (`source = "imported"`) is only checked: `cbd-cache import-teacher` made it."""
    if t.source == "imported":
        return imported_teacher(t, wd, Manifest.load(wd.manifest))
    folder = wd.teacher_dir(t.name)
    with hold(run_lock(folder), f"teachers/{t.name}") if runtime.dist.main else nullcontext():
        return _train_teacher(cfg, t, wd, runtime, folder)


def _train_teacher(cfg: Config, t: TeacherCfg, wd: Workdir, runtime: Runtime, folder: Path) -> Path:
    manifest = Manifest.load(wd.manifest)
    identity = teacher_identity(cfg, t, manifest)
    if run_is_done(folder, identity):
        log(f"[teacher {t.name}] already trained with this config ({folder}); skipping")
        return folder / "checkpoint.pt"
    seed_everything(t.seed)
    net = runtime.prepare_model(teacher_network(t, manifest))
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling="instance", seed=t.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=t.shuffle_buffer, augment=t)
    log(f"[teacher {t.name}] {t.type} views, instance sampling")
    summaries = Summaries(folder, cfg.pipeline.tensorboard)
    history, wall_s = fit(net, stream, t, cross_entropy_step(runtime), runtime, f"teacher {t.name}", folder,
                          teacher_recipe(cfg, t, manifest), summaries.epoch)
    summaries.close()
    if not runtime.dist.main:   # under torchrun rank 0 evaluates and writes the run folder
        return folder / "checkpoint.pt"
    test = evaluate_network(net, manifest, cfg, runtime, manifest.eval_split)
    train = evaluate_network(net, manifest, cfg, runtime, "train")
    write_evaluation(folder, cfg.pipeline.tensorboard, {test["split"]: test, "train": train}, history[-1]["step"])
    kind = t.kind()
    meta = {"kind": kind, "name": t.name, "type": t.type, "seed": t.seed, "config": dataclasses.asdict(t),
            "views": dataclasses.asdict(cfg.views), "manifest_fingerprint": manifest.fingerprint,
            "train_top1": train["top1"], "test_top1": test["top1"], "train_wall_s": wall_s}
    spec = network_spec(net, t.arch, manifest.channels, manifest.num_classes, t.gamma)
    ckpt = save_run(folder, net, spec, meta, identity, history, test, manifest.class_names)
    log(f"[teacher {t.name}] done in {wall_s:.0f}s: train top-1 {train['top1']:.2f}, test top-1 {test['top1']:.2f}")
    return ckpt
