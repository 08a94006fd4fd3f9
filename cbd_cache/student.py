"""Stage 2: the student, from scratch, class-balanced, distilling the cached teacher descriptors.

targets = "cache"  reads each view's targets from the cache and replays that view: no teacher runs.
targets = "online" runs the teachers (eval mode) on freshly drawn views every step: the reference.
targets = "none"   cross-entropy only: the single-stage baselines.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import CacheReader
from .checkpoint import network_spec, run_is_done, save_run
from .config import Config, digest, student_run_name
from .data.manifest import Manifest
from .data.stream import CacheSpec, TrainStream
from .engine import fit
from .evaluation import evaluate_network
from .export import load_teachers
from .losses import cbd_loss, normalize_per_teacher
from .models import Network, descriptor_dim, projection_dim
from .runtime import Runtime, file_sha256, log, seed_everything
from .teachers import cross_entropy_step
from .views import ViewSpec
from .workdir import Workdir


def student_kind(cfg: Config) -> str:
    s = cfg.student
    if s.targets == "none":
        return f"single-stage ({s.sampling})"
    return f"CBD K={len(cfg.student_teachers())} ({s.targets})"


def distillation_step(runtime: Runtime, dims: list[int], alpha: float, beta: float, teachers=None):
    """The CBD step: targets from the batch (cache) or from the teachers on the same images (online)."""
    def step(model: torch.nn.Module, batch: tuple):
        x, y = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        if teachers is None:
            targets = normalize_per_teacher(batch[4].to(runtime.device, non_blocking=True), dims)
        else:
            with torch.no_grad():
                targets = torch.cat([F.normalize(t.features(x).float(), dim=1) for t in teachers], dim=1)
        logits, e = model(x)
        return cbd_loss(logits, y, e, targets, alpha, beta)
    return step


def train_student(cfg: Config, wd: Workdir, runtime: Runtime) -> Path:
    s = cfg.student
    name = student_run_name(cfg)
    folder = wd.student_dir(name)
    manifest = Manifest.load(wd.manifest)
    teacher_names = cfg.student_teachers() if s.targets != "none" else []
    cache_spec, teacher_nets, provenance = None, None, {}
    if s.targets == "cache":
        hashes = {t: file_sha256(wd.teacher_checkpoint(t)) for t in teacher_names if wd.teacher_checkpoint(t).is_file()}
        reader = CacheReader(wd.cache, manifest, teacher_names, s.views, checkpoint_hashes=hashes)
        dims = reader.dims
        cache_spec = CacheSpec(wd.cache, tuple(teacher_names), reader.views)
        provenance = {t: reader.prov["teachers"][t]["checkpoint_sha256"] for t in teacher_names}
    elif s.targets == "online":
        teacher_nets, records = load_teachers(cfg, wd, teacher_names)
        teacher_nets = [runtime.prepare_teacher(n) for n in teacher_nets]
        dims = [r.descriptor_dim for r in records]
        provenance = {r.name: r.checkpoint_sha256 for r in records}
    else:
        dims = []
    config = {k: v for k, v in dataclasses.asdict(s).items() if k != "name"}
    recipe = {"student": config, "views": dataclasses.asdict(cfg.views), "export_views": cfg.export.views,
              "manifest": manifest.fingerprint, "teachers": provenance}
    identity = digest(recipe)
    if run_is_done(folder, identity):
        log(f"[student {name}] already trained with this config ({folder}); skipping")
        return folder / "checkpoint.pt"

    seed_everything(s.seed)
    proj = projection_dim(descriptor_dim(s.arch), dims)
    net = runtime.prepare_model(Network(s.arch, manifest.channels, manifest.num_classes, s.gamma, proj))
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=s.sampling, seed=s.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=s.shuffle_buffer,
                         cache=cache_spec)
    step_fn = (cross_entropy_step(runtime) if s.targets == "none"
               else distillation_step(runtime, dims, s.alpha, s.beta, teacher_nets))
    kind = student_kind(cfg)
    log(f"[student {name}] {kind}, {s.sampling} sampling, alpha {s.alpha}, beta {s.beta}, "
        f"teachers {teacher_names or '-'}")
    history, wall_s = fit(net, stream, s, step_fn, runtime, f"student {name}", folder, recipe)
    if not runtime.dist.main:   # under torchrun rank 0 evaluates and writes the run folder
        return folder / "checkpoint.pt"
    test = evaluate_network(net, manifest, cfg, runtime, manifest.eval_split)
    meta = {"kind": kind, "name": name, "seed": s.seed, "config": dataclasses.asdict(s), "teachers": provenance,
            "overrides": cfg.overrides, "manifest_fingerprint": manifest.fingerprint, "test_top1": test["top1"],
            "train_wall_s": wall_s}
    spec = network_spec(net, s.arch, manifest.channels, manifest.num_classes, s.gamma)
    ckpt = save_run(folder, net, spec, meta, identity, history, test, manifest.class_names)
    log(f"[student {name}] done in {wall_s:.0f}s: test top-1 {test['top1']:.2f}")
    return ckpt
