"""Pipeline configs: dataclasses loaded from the TOML recipes in `pipelines/`, plus `--set` overrides.

A pipeline is one whole experiment. Every field is named here once, with its type and default; the
TOML file and `--set section.field=value` overrides are checked against these names, and every bad
key or value raises `ConfigError` with a one-line message that names the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .models import arch_error

DEFAULT_PIPELINE = "pipelines/fashion_mnist_lt.toml"


class ConfigError(ValueError):
    """A bad pipeline file, key or value. The CLI prints it on one line and exits 2."""


@dataclass
class PipelineCfg:
    name: str = ""                 # default workdir is runs/<name>
    seed: int = 0                  # seeds the view derivation; stored in the cache
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    workers: int = -1              # DataLoader workers per process; -1 sizes them from the machine
    amp: str = "auto"              # auto (bf16 on CUDA) | bf16 | off
    channels_last: str = "auto"    # auto (on for CUDA) | on | off
    compile: bool = False          # torch.compile the models being trained
    accumulate: int = 1            # micro-batches per optimiser step: each process's batch_size / N in this many parts
    checkpoint_steps: int = 0      # training: also write a resume checkpoint every N steps (0: by time only)
    checkpoint_minutes: float = 10.0   # training: write a resume checkpoint at least this often (0: never by time)
    data_url: str = ""             # manifest + shards: a path or fsspec URL ("" = W/data)
    cache_url: str = ""            # the cache: a path or fsspec URL ("" = W/cache.zarr)
    tensorboard: bool = True       # TensorBoard event files in each run folder (needs the tensorboard package)


@dataclass
class DataCfg:
    format: str = "fashion_mnist"  # fashion_mnist | synthetic | imagenet_lt | inat | imagefolder
    root: str = "/usr/share/datasets/fashion-mnist"
    profile: str = "exponential"   # exponential: cut a balanced source to n_i = floor(n_max * IF^(-i/(C-1))); none: keep
    n_max: int = 1280
    imbalance_factor: float = 256.0
    seed: int = 0                  # class-rank permutation, subsampling and shard order
    shard_size: int = 256          # training samples per WebDataset shard (= cache rows per chunk)
    on_error: str = "stop"         # a label problem (bad line, label out of range, duplicate or missing path):
                                   # stop with the offending line, or skip the item and list it in the report
    # `synthetic` only: a generated, learnable dataset used by tests and the smoke pipeline.
    num_classes: int = 10
    image_px: int = 16
    test_per_class: int = 20


@dataclass
class ViewsCfg:
    image_px: int = 28                                   # side of the square view fed to the networks
    scale: list[float] = field(default_factory=lambda: [0.35, 1.0])   # crop area, fraction of the image
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True
    eval_resize_px: int = 0        # evaluation: resize short side to this, centre-crop image_px (0: resize to image_px)


@dataclass
class TrainCfg:
    """What a teacher and a student share: architecture and optimiser."""

    arch: str = "resnet8"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 20.0            # cosine-classifier scale (official code: 20, fixed)
    seed: int = 0
    shuffle_buffer: int = 4096     # samples held by the stream's shuffle buffer


@dataclass
class TeacherCfg(TrainCfg):
    name: str = ""
    type: str = "standard"         # standard: crop + flip; data_aug: also colour jitter (+ noise)
    aug_style: str = "paper"       # paper: jitter + Gaussian noise; official: SimCLR jitter p=.8, grayscale p=.2
    noise_std: float = 0.01        # paper's Gaussian noise sigma, pixels in [0, 1]
    jitter: float = 0.4            # paper style: brightness, contrast and saturation factors in [1-j, 1+j]
    source: str = "trained"        # trained: by train-teacher; imported: from a checkpoint by import-teacher
    mean: list[float] = field(default_factory=list)   # input normalisation on [0, 1] pixels; [] = the arch's
    std: list[float] = field(default_factory=list)    # (timm: the model's config; others: none)

    def kind(self) -> str:
        """How reports name the teacher: `teacher (standard)`, `teacher (imported, standard)`."""
        return f"teacher ({self.type})" if self.source == "trained" else f"teacher ({self.source}, {self.type})"


@dataclass
class ExportCfg:
    views: int = 8                 # A: augmented views per training image
    dtype: str = "float16"         # float16 | float32 | int8 (+ a float16 scale per vector: about half of float16)
    allocation: str = "uniform"    # uniform: A views per image; draws: image i gets max(min_views, round(A * r_c(i))),
                                   # where the class-balanced student draws it (same total, N * A)
    min_views: int = 1             # draws: fewest views of an image
    chunk_views: int = 0           # views per Zarr chunk; 0 = auto (a full shard's views / 32, at least 64)
    batch_size: int = 512
    logits: bool = False           # also store teacher logits per view (classifier-level distillation)


@dataclass
class StudentCfg(TrainCfg):
    name: str = ""                 # run folder under students/; "" derives it from the --set overrides
    alpha: float = 0.4
    beta: float = 100.0
    teachers: list[str] = field(default_factory=list)   # cached teachers to distil from; [] = all
    targets: str = "cache"         # cache | replay (the cache's views, teachers run on them: a fidelity check)
                                   # | online (teachers run every step on fresh views) | none (cross-entropy only)
    distill: str = "feature"       # feature (Eq. 2/4) | logit (Eq. 3) | hybrid (both)
    temperature: float = 5.0       # T of logit distillation
    sampling: str = "class_balanced"   # class_balanced | instance
    type: str = "standard"         # the student's own views: standard | data_aug (single-stage baselines)
    views: int = 0                 # use the views an export at A = V would hold (a prefix of each image's); 0 = all
    init: str = ""                 # start from teachers/<name> or students/<run> (fine-tuning, cRT); "" = scratch
    classifier_only: bool = False  # cRT: a new cosine classifier on init's frozen, cached descriptors


@dataclass
class EvalCfg:
    batch_size: int = 512


@dataclass
class Config:
    pipeline: PipelineCfg = field(default_factory=PipelineCfg)
    data: DataCfg = field(default_factory=DataCfg)
    views: ViewsCfg = field(default_factory=ViewsCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)     # defaults shared by every [[teachers]] entry
    teachers: list[TeacherCfg] = field(default_factory=list)
    export: ExportCfg = field(default_factory=ExportCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    source: str = ""               # the TOML file this came from
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def teacher_by_name(self, name: str) -> TeacherCfg:
        for t in self.teachers:
            if t.name == name:
                return t
        raise ConfigError(f"teachers: no teacher named {name!r} (have {[t.name for t in self.teachers]})")

    def student_teachers(self) -> list[str]:
        """The cached teachers the student distils from, in pipeline order."""
        return list(self.student.teachers) or [t.name for t in self.teachers]


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("source", "overrides")}
CHOICES = {
    "pipeline.amp": ("auto", "bf16", "off"),
    "pipeline.channels_last": ("auto", "on", "off"),
    "data.format": ("fashion_mnist", "synthetic", "imagenet_lt", "inat", "imagefolder"),
    "data.profile": ("exponential", "none"),
    "data.on_error": ("stop", "skip"),
    "teacher.type": ("standard", "data_aug"),
    "teacher.aug_style": ("paper", "official"),
    "teacher.source": ("trained", "imported"),
    "export.dtype": ("float16", "float32", "int8"),
    "export.allocation": ("uniform", "draws"),
    "student.targets": ("cache", "replay", "online", "none"),
    "student.sampling": ("class_balanced", "instance"),
    "student.distill": ("feature", "logit", "hybrid"),
    "student.type": ("standard", "data_aug"),
}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


# ----------------------------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal (1, 0.2, true, "s", [1, 2]), else a bare string or list of them."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [s.strip().strip("'\"") for s in inner.split(",")] if inner else []
    return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, for example student.alpha=0.2")
    key, _, value = item.partition("=")
    return key.strip(), parse_value(value.strip())


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `section.field` (or `teachers.<name>.field`) in the raw TOML dict, checking the key exists."""
    parts = key.split(".")
    section = parts[0]
    if section not in SECTIONS:
        raise ConfigError(f"unknown config key {key!r}: no section {section!r}{_suggest(section, SECTIONS)}")
    if section == "teachers":
        entries = raw.setdefault("teachers", [])
        names = [e.get("name") for e in entries]
        if len(parts) == 2 and isinstance(value, dict):     # teachers.<name>={type = "data_aug", seed = 5}
            if parts[1] in names:
                entries[names.index(parts[1])].update(value)
            else:
                entries.append({**value, "name": parts[1]})
            return
        if len(parts) != 3:
            raise ConfigError(f"unknown config key {key!r}: use teachers.<name>.<field>, teacher.<field>, or "
                              "teachers.<name>={field = value, ...} to add a teacher")
        if parts[1] not in names:
            raise ConfigError(f"unknown config key {key!r}: no teacher named {parts[1]!r}{_suggest(parts[1], names)}")
        _check_field(TeacherCfg, key, parts[2])
        entries[names.index(parts[1])][parts[2]] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"unknown config key {key!r}: expected section.field")
    _check_field(typing.get_type_hints(Config)[section], key, parts[1])
    raw.setdefault(section, {})[parts[1]] = value


def _check_field(cls: type, key: str, name: str) -> None:
    names = _field_names(cls)
    if name not in names:
        raise ConfigError(f"unknown config key {key!r}{_suggest(name, names)}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(key, v, item_hint) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise AssertionError(f"unhandled type {hint} for {key}")


def _build(cls: type, raw: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """Dataclass `cls` from a raw TOML table; unknown keys and wrong types raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    for k in raw:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}.{k}'{_suggest(k, names)}")
    obj = copy.deepcopy(base) if base is not None else cls()
    for k, v in raw.items():
        setattr(obj, k, _coerce(f"{prefix}.{k}", v, hints[k]))
    return obj


# ---------------------------------------------------------------------------------------- loading
def load_config(path: str | Path = DEFAULT_PIPELINE, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a pipeline TOML, apply `key=value` overrides in order, validate, and return the Config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--pipeline {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--pipeline {path}: not valid TOML: {e}") from None
    for item in overrides:
        apply_override(raw, *parse_override(item))
    for k in raw:
        if k not in SECTIONS:
            raise ConfigError(f"unknown config key {k!r} in {path}{_suggest(k, SECTIONS)}")
    cfg = Config(source=str(path), overrides=list(overrides))
    for name in ("pipeline", "data", "views", "teacher", "export", "student", "eval"):
        setattr(cfg, name, _build(type(getattr(cfg, name)), raw.get(name, {}), name))
    teachers = raw.get("teachers", [])
    if not isinstance(teachers, list):
        raise ConfigError("teachers: expected [[teachers]] entries")
    cfg.teachers = [_build(TeacherCfg, t, f"teachers[{i}]", base=cfg.teacher) for i, t in enumerate(teachers)]
    if not cfg.pipeline.name:
        cfg.pipeline.name = path.stem
    validate(cfg)
    return cfg


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
    sections = [(name, getattr(cfg, name)) for name in ("pipeline", "data", "views", "teacher", "export", "student", "eval")]
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
    _require(cfg.pipeline.checkpoint_minutes >= 0,
             f"pipeline.checkpoint_minutes={cfg.pipeline.checkpoint_minutes}: must be >= 0")
    d = cfg.data
    _require(d.n_max >= 1, f"data.n_max={d.n_max}: must be >= 1")
    _require(d.imbalance_factor >= 1, f"data.imbalance_factor={d.imbalance_factor}: must be >= 1")
    _require(d.shard_size >= 1, f"data.shard_size={d.shard_size}: must be >= 1")
    _require(d.num_classes >= 2, f"data.num_classes={d.num_classes}: must be >= 2")
    _require(d.image_px >= 4, f"data.image_px={d.image_px}: must be >= 4")
    _require(d.test_per_class >= 1, f"data.test_per_class={d.test_per_class}: must be >= 1")
    v = cfg.views
    _require(v.image_px >= 4, f"views.image_px={v.image_px}: must be >= 4")
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
        _require(bool(init) and init[1] == "teachers",
                 "student.classifier_only=true: cRT needs student.init=teachers/<name>, a teacher in the cache")
        _require(s.targets == "none", "student.classifier_only=true: cRT trains with cross-entropy only; "
                 "set student.targets=none")
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


# ---------------------------------------------------------------------------------------- helpers
def digest(obj: Any) -> str:
    """A stable short hash of JSON-able data: configs, provenance."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
