"""Stage 2: the student, and the paper's second-stage baselines, trained into `W/students/<run>`.

targets = "cache"  reads each view's targets from the cache and replays that view: no teacher runs.
targets = "none"   cross-entropy only: the single-stage baselines, and fine-tuning with `init`.
distill            what is distilled: descriptors (feature, Eq. 2/4), logits (Eq. 3) or both (hybrid).
loss               "balanced_softmax": Balanced Softmax, a single-stage baseline (targets = "none").
The other second-stage trainers build on this module: `online.py` (targets = "online": the teachers
run every step on fresh views; targets = "replay": they run on the cache's stored views, a fidelity
check of the cache that must train like "cache" up to float16 rounding), `crt.py` (classifier_only,
and rebalance = "lws": a classifier on init's frozen features) and `rebalance.py` (rebalance =
"tau_norm" / "logit_adjust": post-hoc, tau chosen on val); `pipeline.train_student` picks one. This module never imports
teacher code: a cached student runs no teacher and loads none (tests/test_imports.py checks it).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from cbd_cache.cache.reader import CacheReader
from cbd_cache.config import CHOSEN_ON_VAL, Config, StudentCfg
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import CacheSpec, TrainStream
from cbd_cache.errors import ConfigError
from cbd_cache.models.checkpoints import load_checkpoint, read_torch
from cbd_cache.models.losses import log_prior
from cbd_cache.models.networks import Network, descriptor_dim, projection_dim
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.runs import (
    RunPlan,
    cache_settings,
    flat_config,
    frozen_from_cache,
    is_done,
    run_settings,
    student_run_name,
)
from cbd_cache.train.skeleton import train_model
from cbd_cache.train.steps import LossFn, cross_entropy_step, distillation_step
from cbd_cache.views import ViewSpec
from cbd_cache.workdir import CHECKPOINT, Workdir


@dataclass
class StudentPlan(RunPlan):
    """What a student run needs before it trains, computed once per run and passed down."""

    teachers: list[str] = field(default_factory=list)   # the teachers it distils ([] for cross-entropy only)
    dims: list[int] = field(default_factory=list)       # their descriptor sizes when descriptors are distilled
    cache: CacheSpec | None = None                      # where cached targets come from
    provenance: dict = field(default_factory=dict)      # teacher name -> checkpoint SHA-256
    init: Path | None = None                            # the checkpoint fine-tuning and cRT start from
    cache_settings: dict | None = None                  # the settings the cache it reads recorded (None: no cache)


REBALANCE_KINDS = {"lws": "LWS", "tau_norm": "tau-norm", "logit_adjust": "logit adjustment"}


def student_kind(cfg: Config) -> str:
    s = cfg.student
    if s.classifier_only:
        return f"cRT ({s.init})"
    if s.rebalance != "none":
        return f"{REBALANCE_KINDS[s.rebalance]} ({s.init})"
    if s.targets == "none":
        if s.init:
            return f"fine-tuning ({s.init}, {s.sampling})"
        extra = "".join(f"{x}, " for x in ("data_aug" if s.type != "standard" else "",
                                           "balanced softmax" if s.loss != "ce" else "",
                                           "linear head" if s.head != "cosine" else "") if x)
        return f"single-stage ({extra}{s.sampling})"
    method = "CBD" if s.distill == "feature" else f"{s.distill} distillation"
    return f"{method} K={len(cfg.student_teachers())} ({s.targets})"


def init_checkpoint(wd: Workdir, s: StudentCfg) -> Path:
    ckpt = wd.model_dir(s.init) / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"student.init={s.init}: no checkpoint at {ckpt}; train that model first")
    return ckpt


def data_aug(cfg: Config):
    """The data-augmentation settings a `type = data_aug` student shares with the pipeline's teachers."""
    return dataclasses.replace(cfg.teacher, type="data_aug") if cfg.student.type == "data_aug" else None


def plan_student(cfg: Config, wd: Workdir) -> StudentPlan:
    """Checks the inputs (manifest, cache, teachers, init) and derives the run's name and identity."""
    s = cfg.student
    manifest = Manifest.load(wd.manifest)
    teachers = cfg.student_teachers() if s.targets != "none" else []
    logits = s.distill != "feature"
    cache, provenance, dims, reader = None, {}, [], None
    if frozen_from_cache(s):
        teacher = s.init.split("/", 1)[1]
        hashes = {teacher: file_sha256(ckpt)} if (ckpt := wd.teacher_checkpoint(teacher)).is_file() else {}
        reader = CacheReader(wd.cache, manifest, [teacher], s.views, checkpoint_hashes=hashes)
        provenance = {teacher: reader.records[teacher]["checkpoint_sha256"]}
        cache = CacheSpec(wd.cache, (teacher,), reader.views)
    elif s.targets in ("cache", "replay"):
        hashes = {t: file_sha256(wd.teacher_checkpoint(t)) for t in teachers if wd.teacher_checkpoint(t).is_file()}
        if s.targets == "replay" and len(hashes) < len(teachers):
            raise FileNotFoundError(f"student.targets=replay runs the teachers {teachers}; train them first")
        reader = CacheReader(wd.cache, manifest, teachers, s.views, checkpoint_hashes=hashes,
                             with_logits=logits and s.targets == "cache")
        dims = reader.dims
        cache = CacheSpec(wd.cache, tuple(teachers), reader.views, with_logits=logits and s.targets == "cache")
        provenance = {t: reader.records[t]["checkpoint_sha256"] for t in teachers}
    elif s.targets == "online":
        for t in teachers:
            if not wd.teacher_checkpoint(t).is_file():
                raise FileNotFoundError(f"teacher {t!r} has no checkpoint at {wd.teacher_checkpoint(t)}; "
                                        "online targets need the teachers")
        provenance = {t: file_sha256(wd.teacher_checkpoint(t)) for t in teachers}
        dims = [descriptor_dim(cfg.teacher_by_name(t).arch) for t in teachers]
    recorded = None
    if cache is not None:
        check_cache_settings(cfg, reader.prov, wd.cache)
        recorded = cache_settings(reader.prov)     # the run is named and recorded under what the cache holds
    name = student_run_name(cfg, recorded)
    if s.distill == "logit":
        dims = []
    init = init_checkpoint(wd, s) if s.init else None
    if s.rebalance != "none":
        check_rebalance(cfg, manifest, init)
    recipe = {"settings": run_settings(cfg, recorded), "manifest": manifest.fingerprint, "teachers": provenance,
              "init": file_sha256(init) if init else None,
              "cache_schema": reader.prov["schema_version"] if reader else None}
    return StudentPlan(name, wd.student_dir(name), recipe, student_kind(cfg), "student", teachers, dims, cache,
                       provenance, init, recorded)


SELECTION_SPLIT = "val"   # where anything is chosen (tau): never the split results report


def selection_split(manifest: Manifest, what: str) -> str:
    """The split choices are made on: val, when the data has one that is not also the reported split."""
    if SELECTION_SPLIT not in manifest.splits:
        raise ConfigError(f"{what} chooses tau on the val split, and this data has none (val: "
                          f"{manifest.source.get('val', 'none')}); hold one out with --set data.val_per_class=N "
                          "(a source cut by data.profile), or give --set student.tau=T")
    if manifest.eval_split == SELECTION_SPLIT:
        raise ConfigError(f"{what} chooses tau on the val split, but val is this data's only held-out split, the one "
                          "results report (no test split): give --set student.tau=T chosen elsewhere")
    return SELECTION_SPLIT


def check_rebalance(cfg: Config, manifest: Manifest, init: Path) -> None:
    """Refuse, before anything is written, a rebalancing that cannot mean anything or cannot choose honestly."""
    s = cfg.student
    what = f"student.rebalance={s.rebalance} on {s.init}"
    head = read_torch(init)["network"]["head"]
    if s.rebalance == "tau_norm" and head != "linear":
        raise ConfigError(f"{what}: its classifier is cosine, which divides every row by its norm, so every tau gives "
                          "the same model; tau-normalise a model trained with --set student.head=linear")
    if s.rebalance == "lws" and head != "cosine" and frozen_from_cache(s):
        raise ConfigError(f"{what}: its classifier is linear and the cache holds its descriptors L2-normalised, "
                          "which a linear classifier does not see; use a cosine-head teacher, or cRT")
    if s.rebalance in CHOSEN_ON_VAL and s.tau < 0:
        selection_split(manifest, what)


def already_done(plan: StudentPlan) -> bool:
    """The run folder holds this plan's finished run (and the log says so): nothing to train."""
    done = is_done(plan.folder, plan.identity)
    if done:
        log(f"[student {plan.name}] already trained with this config ({plan.folder}); skipping")
    return done


def check_cache_settings(cfg: Config, prov: dict, path) -> None:
    """The cache's views win: a student whose view or export settings differ from what the cache
    recorded would train on crops, or under a name, that the teachers' targets do not belong to."""
    recorded = cache_settings(prov)
    mine = json.loads(json.dumps(flat_config(cfg)))   # as the cache's JSON attributes hold them (lists, not tuples)
    for key, value in recorded.items():
        if mine[key] != value:
            raise ConfigError(f"{key}={mine[key]}: the cache {path} was exported with {key}={value}; drop that "
                              "--set, or export a cache with it (under another pipeline.cache_url or workdir)")


def load_init(net: Network, ckpt: Path, ref: str) -> None:
    """Fine-tuning starts from the whole stage-1 network: backbone, projection and classifier."""
    source, _ = load_checkpoint(ckpt)
    try:
        net.load_state_dict(source.state_dict())
    except RuntimeError:
        raise ConfigError(f"student.init={ref}: that network's architecture or projection differs from "
                          "this student's (fine-tuning starts from a cross-entropy model: targets=none)") from None


def train_student(cfg: Config, wd: Workdir, runtime: Runtime, plan: StudentPlan) -> Path:
    """A student with cached targets, or cross-entropy only (targets = "none")."""
    s = cfg.student
    if s.targets in ("online", "replay") or s.classifier_only or s.rebalance != "none":
        raise ConfigError(f"[student {plan.name}] online or replayed targets, cRT and rebalancing train through "
                          "pipeline.train_student")
    if already_done(plan):
        return plan.checkpoint
    prior = log_prior(Manifest.load(wd.manifest).train.class_counts) if s.loss == "balanced_softmax" else None
    step_fn = (cross_entropy_step(runtime, prior) if s.targets == "none"
               else distillation_step(runtime, plan.dims, s))
    return train_network(cfg, wd, runtime, plan, step_fn)


def train_network(cfg: Config, wd: Workdir, runtime: Runtime, plan: StudentPlan, step_fn: LossFn) -> Path:
    """Build the student network, train it with `step_fn` on the student's stream, evaluate and save it."""
    s = cfg.student
    manifest = Manifest.load(wd.manifest)

    def build() -> Network:
        net = Network(s.arch, manifest.channels, manifest.num_classes, s.gamma,
                      projection_dim(descriptor_dim(s.arch), plan.dims), head=s.head)
        if plan.init:
            load_init(net, plan.init, s.init)
        return net
    stream = TrainStream(manifest, ViewSpec.from_cfg(cfg.views), sampling=s.sampling, seed=s.seed,
                         samples_per_epoch=manifest.train.num_samples, shuffle_buffer=s.shuffle_buffer,
                         cache=plan.cache, augment=data_aug(cfg))
    log(f"[student {plan.name}] {plan.kind}, {s.sampling} sampling, alpha {s.alpha}, beta {s.beta}, "
        f"teachers {plan.teachers or '-'}{', init ' + s.init if s.init else ''}")
    return train_model(plan, s, build, stream, step_fn, runtime, cfg, manifest, student_meta(cfg, plan, manifest))


def student_meta(cfg: Config, plan: StudentPlan, manifest: Manifest) -> dict:
    """What a second-stage run's checkpoint and run.json record of it, whatever the method."""
    s = cfg.student
    return {"kind": plan.kind, "name": plan.name, "seed": s.seed, "config": dataclasses.asdict(s),
            "teachers": plan.provenance, "overrides": cfg.overrides, "manifest_fingerprint": manifest.fingerprint,
            "cache": plan.cache_settings}
