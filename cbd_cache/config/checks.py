"""Value checks that types alone cannot express; each message names the key."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any

from cbd_cache.config.archs import arch_error
from cbd_cache.config.schema import (CHOICES, CHOSEN_ON_VAL, FEW_SHOT_BELOW, MANY_SHOT_ABOVE, NAME_RE, TABLES, Config,
                                     TrainCfg)
from cbd_cache.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _floats(obj: Any, prefix: str) -> typing.Iterator[tuple[str, Any]]:
    """(key, value) of every float setting of a section (list items included)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if hints[f.name] in (float, list[float]):
            yield f"{prefix}.{f.name}", getattr(obj, f.name)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express. Each message names the key."""
    sections = [(name, getattr(cfg, name)) for name in TABLES]
    for prefix, obj in sections + [(f"teachers.{t.name}", t) for t in cfg.teachers]:
        for key, value in _floats(obj, prefix):   # inf and nan pass most range checks below
            _require(all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])),
                     f"{key}={value}: must be a finite number")
    for key, options in CHOICES.items():
        section, name = key.split(".")
        objs = cfg.teachers + [cfg.teacher] if section == "teacher" else [getattr(cfg, section)]
        for obj in objs:
            value = getattr(obj, name)
            _require(value in options, f"{key}={value!r}: must be one of {', '.join(options)}")
    _require(NAME_RE.match(cfg.pipeline.name) is not None, f"pipeline.name={cfg.pipeline.name!r}: use letters, digits, _ . + = -")
    _require(re.match(r"^(auto|cpu|cuda(:\d+)?)$", cfg.pipeline.device) is not None,
             f"pipeline.device={cfg.pipeline.device!r}: must be auto, cpu, cuda or cuda:N")
    _require(cfg.pipeline.workers >= -1, f"pipeline.workers={cfg.pipeline.workers}: must be >= 0, or -1 for auto")
    _require(cfg.pipeline.accumulate >= 1, f"pipeline.accumulate={cfg.pipeline.accumulate}: must be >= 1")
    _require(cfg.pipeline.checkpoint_steps >= 0, f"pipeline.checkpoint_steps={cfg.pipeline.checkpoint_steps}: must be >= 0")
    _require(cfg.pipeline.rank_timeout_minutes > 0,
             f"pipeline.rank_timeout_minutes={cfg.pipeline.rank_timeout_minutes}: must be > 0")
    _require(cfg.pipeline.checkpoint_minutes >= 0,
             f"pipeline.checkpoint_minutes={cfg.pipeline.checkpoint_minutes}: must be >= 0")
    d = cfg.data
    _require(d.n_max >= 1, f"data.n_max={d.n_max}: must be >= 1")
    _require(d.imbalance_factor >= 1, f"data.imbalance_factor={d.imbalance_factor}: must be >= 1")
    _require(d.profile != "imagenet_lt_shape" or (d.n_max > MANY_SHOT_ABOVE + 1 and d.n_max / d.imbalance_factor < FEW_SHOT_BELOW),
             f"data.profile=imagenet_lt_shape needs many-shot and few-shot classes: data.n_max={d.n_max} must be > "
             f"{MANY_SHOT_ABOVE + 1} and n_max / data.imbalance_factor = {d.n_max / d.imbalance_factor:g} below {FEW_SHOT_BELOW}")
    _require(d.shard_size >= 1, f"data.shard_size={d.shard_size}: must be >= 1")
    _require(d.num_classes >= 2, f"data.num_classes={d.num_classes}: must be >= 2")
    _require(d.image_px >= 4, f"data.image_px={d.image_px}: must be >= 4")
    _require(d.test_per_class >= 1, f"data.test_per_class={d.test_per_class}: must be >= 1")
    _require(0 <= d.distortion <= 4, f"data.distortion={d.distortion}: must be in 0..4")
    _require(d.val_per_class >= 0, f"data.val_per_class={d.val_per_class}: must be >= 0 (0: no val split held out)")
    v = cfg.views
    _require(v.image_px >= 4, f"views.image_px={v.image_px}: must be >= 4")
    _require(d.max_short_px == 0 or d.max_short_px >= v.image_px,
             f"data.max_short_px={d.max_short_px}: must be 0 (images as they are) or >= views.image_px={v.image_px}")
    _require(len(v.scale) == 2 and 0 < v.scale[0] <= v.scale[1] <= 1,
             f"views.scale={v.scale}: must be [min, max] with 0 < min <= max <= 1")
    _require(len(v.ratio) == 2 and 0 < v.ratio[0] <= v.ratio[1],
             f"views.ratio={v.ratio}: must be [min, max] with 0 < min <= max")
    _require(v.eval_resize_px == 0 or v.eval_resize_px >= v.image_px,
             f"views.eval_resize_px={v.eval_resize_px}: must be 0 or >= views.image_px")
    _require(len(cfg.teachers) >= 1, "teachers: the pipeline needs at least one [[teachers]] entry")
    names = [t.name for t in cfg.teachers]
    for i, t in enumerate(cfg.teachers):
        _require(bool(t.name) and NAME_RE.match(t.name) is not None,
                 f"teachers[{i}].name={t.name!r}: every teacher needs a name of letters, digits, _ . + = -")
        _require(names.count(t.name) == 1, f"teachers[{i}].name={t.name!r}: duplicate teacher name")
        _check_train(f"teachers.{t.name}", t)
        _require(t.noise_std >= 0, f"teachers.{t.name}.noise_std={t.noise_std}: must be >= 0")
        _require(0 <= t.jitter <= 1, f"teachers.{t.name}.jitter={t.jitter}: must be in [0, 1]")
        _require(len(t.mean) == len(t.std) and all(x > 0 for x in t.std),
                 f"teachers.{t.name}.mean / std: {t.mean} / {t.std}: give both, one value per channel, std > 0 (or neither)")
    e = cfg.export
    _require(1 <= e.views <= 1024, f"export.views={e.views}: must be in [1, 1024]")
    _require(e.batch_size >= 1, f"export.batch_size={e.batch_size}: must be >= 1")
    _require(e.min_views >= 1, f"export.min_views={e.min_views}: must be >= 1")
    _require(e.chunk_views >= 0, f"export.chunk_views={e.chunk_views}: must be >= 0 (0: auto)")
    s = cfg.student
    _check_train("student", s)
    _require(s.name == "" or NAME_RE.match(s.name) is not None, f"student.name={s.name!r}: use letters, digits, _ . + = -")
    _require(0.0 <= s.alpha <= 1.0, f"student.alpha={s.alpha}: must be in [0, 1]")
    _require(s.beta >= 0, f"student.beta={s.beta}: must be >= 0")
    _require(0 <= s.views <= e.views, f"student.views={s.views}: must be in [0, export.views={e.views}]")
    _require(s.temperature > 0, f"student.temperature={s.temperature}: must be > 0")
    _require(s.type == "standard" or s.targets not in ("cache", "replay"),
             "student.type=data_aug: cached targets belong to standard views; use targets=none or online")
    init = re.match(r"^(teachers|students)/([A-Za-z0-9][A-Za-z0-9_.+=,-]*)$", s.init)
    _require(s.init == "" or init is not None,
             f"student.init={s.init!r}: must be teachers/<name> or students/<run>, or empty")
    if init and init[1] == "teachers":
        _require(init[2] in names, f"student.init={s.init!r}: no teacher named {init[2]!r} in this pipeline")
    if s.classifier_only:
        _require(bool(init), "student.classifier_only=true: cRT needs student.init=teachers/<name> (its cached "
                 "descriptors) or students/<run> (its features of the images)")
        _require(s.targets == "none", "student.classifier_only=true: cRT trains with cross-entropy only; "
                 "set student.targets=none")
    if s.rebalance != "none":
        _require(bool(init) and s.targets == "none" and not s.classifier_only,
                 f"student.rebalance={s.rebalance}: rebalances a trained model's classifier; set "
                 "student.init=teachers/<name> or students/<run>, student.targets=none, and no classifier_only")
    _require(s.tau == -1 or (s.tau >= 0 and s.rebalance in CHOSEN_ON_VAL),
             f"student.tau={s.tau}: a tau >= 0 for student.rebalance={' or '.join(CHOSEN_ON_VAL)}, or -1 to choose "
             "it on the val split")
    _require(s.loss == "ce" or (s.targets == "none" and not s.classifier_only and s.rebalance == "none"),
             f"student.loss={s.loss}: a single-stage loss; set student.targets=none (no distillation, no "
             "classifier_only, no rebalance)")
    _require(s.head == "cosine" or not (s.classifier_only or s.rebalance != "none"),
             f"student.head={s.head}: cRT trains a new cosine classifier and rebalancing keeps init's; drop it")
    for t in s.teachers:
        _require(t in names, f"student.teachers: no teacher named {t!r} in this pipeline (have {names})")
    _require(len(set(s.teachers)) == len(s.teachers), f"student.teachers={s.teachers}: duplicate teacher")
    _require(cfg.eval.batch_size >= 1, f"eval.batch_size={cfg.eval.batch_size}: must be >= 1")


def _check_train(prefix: str, t: TrainCfg) -> None:
    _require(t.epochs >= 1, f"{prefix}.epochs={t.epochs}: must be >= 1")
    _require(t.batch_size >= 1, f"{prefix}.batch_size={t.batch_size}: must be >= 1")
    _require(t.lr > 0 and math.isfinite(t.lr), f"{prefix}.lr={t.lr}: must be > 0")
    _require(0 <= t.momentum < 1, f"{prefix}.momentum={t.momentum}: must be in [0, 1)")
    _require(t.weight_decay >= 0, f"{prefix}.weight_decay={t.weight_decay}: must be >= 0")
    _require(t.gamma > 0, f"{prefix}.gamma={t.gamma}: must be > 0")
    _require(t.shuffle_buffer >= 1, f"{prefix}.shuffle_buffer={t.shuffle_buffer}: must be >= 1")
    problem = arch_error(t.arch)
    _require(problem is None, f"{prefix}.arch={t.arch!r}: {problem}")
