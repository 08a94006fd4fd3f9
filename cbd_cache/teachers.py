"""Stage 1: train a teacher with instance sampling, standard or data-augmentation views."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoint import network_spec
from .config import Config, TeacherCfg, digest
from .data.manifest import Manifest
from .data.stream import TrainStream
from .engine import cross_entropy_step, fit
from .evaluation import evaluate_network
from .logs import log
from .models import Network
from .runs import run_is_done, save_run
from .runtime import Runtime
from .seeding import seed_everything
from .summaries import Summaries, write_evaluation
from .views import ViewSpec
from .workdir import Workdir


def teacher_recipe(cfg: Config, t: TeacherCfg, manifest: Manifest) -> dict:
    """What a finished teacher depends on; a checkpoint with the same recipe is not retrained, nor resumed under another."""
    return {"teacher": dataclasses.asdict(t), "views": dataclasses.asdict(cfg.views), "manifest": manifest.fingerprint}


def teacher_identity(cfg: Config, t: TeacherCfg, manifest: Manifest) -> str:
    return digest(teacher_recipe(cfg, t, manifest))


def train_teacher(cfg: Config, t: TeacherCfg, wd: Workdir, runtime: Runtime) -> Path:
    manifest = Manifest.load(wd.manifest)
    folder = wd.teacher_dir(t.name)
    identity = teacher_identity(cfg, t, manifest)
    if run_is_done(folder, identity):
        log(f"[teacher {t.name}] already trained with this config ({folder}); skipping")
        return folder / "checkpoint.pt"
    seed_everything(t.seed)
    net = runtime.prepare_model(Network(t.arch, manifest.channels, manifest.num_classes, t.gamma))
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
    kind = f"teacher ({t.type})"
    meta = {"kind": kind, "name": t.name, "type": t.type, "seed": t.seed, "config": dataclasses.asdict(t),
            "views": dataclasses.asdict(cfg.views), "manifest_fingerprint": manifest.fingerprint,
            "train_top1": train["top1"], "test_top1": test["top1"], "train_wall_s": wall_s}
    spec = network_spec(net, t.arch, manifest.channels, manifest.num_classes, t.gamma)
    ckpt = save_run(folder, net, spec, meta, identity, history, test, manifest.class_names)
    log(f"[teacher {t.name}] done in {wall_s:.0f}s: train top-1 {train['top1']:.2f}, test top-1 {test['top1']:.2f}")
    return ckpt
