"""Stage 1: train a teacher with instance sampling, standard or data-augmentation views."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import network_spec, save_checkpoint
from .config import Config, TeacherCfg, digest
from .data.manifest import Manifest
from .data.stream import TrainStream
from .engine import cosine_schedule, make_optimizer, steps_per_epoch, train_one_epoch
from .evaluation import evaluate_network, write_report
from .models import Network
from .runtime import Runtime, file_sha256, log, seed_everything
from .views import ViewSpec
from .workdir import Workdir, read_json, write_json


def teacher_identity(cfg: Config, t: TeacherCfg, manifest: Manifest) -> str:
    """What a finished teacher depends on; a checkpoint with the same identity is not retrained."""
    return digest({"teacher": dataclasses.asdict(t), "views": dataclasses.asdict(cfg.views),
                   "manifest": manifest.fingerprint})


def cross_entropy_step(runtime: Runtime):
    def step(model: torch.nn.Module, batch: tuple):
        x, y = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        logits, _ = model(x)
        return F.cross_entropy(logits.float(), y), {}
    return step


def train_teacher(cfg: Config, t: TeacherCfg, wd: Workdir, runtime: Runtime) -> Path:
    manifest = Manifest.load(wd.manifest)
    folder, ckpt = wd.teacher_dir(t.name), wd.teacher_checkpoint(t.name)
    identity = teacher_identity(cfg, t, manifest)
    run_json = folder / "run.json"
    if ckpt.is_file() and run_json.is_file() and read_json(run_json).get("identity") == identity:
        log(f"[teacher {t.name}] already trained with this config ({ckpt}); skipping")
        return ckpt
    seed_everything(t.seed)
    spec = ViewSpec.from_cfg(cfg.views)
    net = runtime.prepare_model(Network(t.arch, manifest.channels, manifest.num_classes, t.gamma))
    model = torch.compile(net) if runtime.compile else net
    n = manifest.train.num_samples
    stream = TrainStream(manifest, spec, sampling="instance", seed=t.seed, samples_per_epoch=n,
                         shuffle_buffer=t.shuffle_buffer, augment=t)
    batches = iter(DataLoader(stream, batch_size=t.batch_size, **runtime.loader_kwargs()))
    steps = steps_per_epoch(n, t.batch_size)
    optimizer = make_optimizer(net, t)
    scheduler = cosine_schedule(optimizer, steps * t.epochs)
    log(f"[teacher {t.name}] {t.type} {t.arch}, {t.epochs} epochs x {steps} steps of {t.batch_size}, "
        f"instance sampling, seed {t.seed}, on {runtime.device}")
    folder.mkdir(parents=True, exist_ok=True)
    history, started = [], time.perf_counter()
    with open(folder / "log.jsonl", "w") as log_file:
        for epoch in range(t.epochs):
            stats = train_one_epoch(model, batches, steps, optimizer, scheduler, cross_entropy_step(runtime), runtime,
                                    f"teacher {t.name} epoch {epoch + 1}/{t.epochs}", t.batch_size)
            history.append({"epoch": epoch + 1, **stats})
            log_file.write(json.dumps(history[-1]) + "\n")
            log_file.flush()
    del batches
    wall_s = time.perf_counter() - started
    test = evaluate_network(net, manifest, cfg, runtime, "test")
    train = evaluate_network(net, manifest, cfg, runtime, "train")
    meta = {"kind": "teacher", "name": t.name, "type": t.type, "seed": t.seed, "config": dataclasses.asdict(t),
            "views": dataclasses.asdict(cfg.views), "manifest_fingerprint": manifest.fingerprint,
            "train_top1": train["top1"], "test_top1": test["top1"], "train_wall_s": wall_s}
    save_checkpoint(ckpt, net, network_spec(net, t.arch, manifest.channels, manifest.num_classes, t.gamma), meta)
    test.update(checkpoint_sha256=file_sha256(ckpt), manifest_fingerprint=manifest.fingerprint)
    write_report(folder, t.name, f"teacher ({t.type})", test, manifest.class_names)
    write_json(run_json, {"identity": identity, "kind": f"teacher ({t.type})", "history": history, **meta})
    log(f"[teacher {t.name}] done in {wall_s:.0f}s: train top-1 {train['top1']:.2f}, test top-1 {test['top1']:.2f}")
    return ckpt
