"""The pipeline's settings: one dataclass per TOML section, every field named once with its type and default.

`SECTIONS` (and `TABLES`, those that are one table) is the one list of section names and `CHOICES` the one list of each choice-valued key's
options (taken from the registry that implements them where that registry needs no torch).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from cbd_cache.errors import ConfigError

DEFAULT_PIPELINE = "pipelines/fashion_mnist_lt.toml"


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
    rank_timeout_minutes: float = 10.0   # torchrun: give up on a rank that has not answered for this long, naming it
    data_url: str = ""             # manifest + shards: a path or fsspec URL ("" = W/data)
    cache_url: str = ""            # the cache: a path or fsspec URL ("" = W/cache.zarr)
    tensorboard: bool = True       # TensorBoard event files in each run folder (needs the tensorboard package)


@dataclass
class DataCfg:
    format: str = "fashion_mnist"  # a reader of data/sources (READERS, FORMATS): fashion_mnist, synthetic, imagenet_lt, ...
    root: str = "/usr/share/datasets/fashion-mnist"
    profile: str = "exponential"   # exponential: cut a balanced source to n_i = floor(n_max * IF^(-i/(C-1))); imagenet_lt_shape; none: keep
    n_max: int = 1280
    imbalance_factor: float = 256.0
    seed: int = 0                  # class-rank permutation, subsampling and shard order
    shard_size: int = 256          # training samples per WebDataset shard (= cache rows per chunk)
    max_short_px: int = 0          # store each image with its short side at most this (resized, encoded again); 0: as it is
    on_error: str = "stop"         # a label problem (bad line, label out of range, duplicate or missing path):
                                   # stop with the offending line, or skip the item and list it in the report
    # generated sets (`synthetic`: tests and the smoke pipeline; `glyphs`: characters from installed fonts)
    num_classes: int = 10
    image_px: int = 16
    test_per_class: int = 20       # per class in each held-out split (glyphs: val and test alike)
    distortion: float = 1.0        # `glyphs`: strength of the warp, stroke, blur, contrast and noise (0: clean)
    val_per_class: int = 0         # a source with no val split: hold out this many training images per class, from
                                   # those the long-tail profile leaves out, as a balanced val split (0: no val)


@dataclass
class ViewsCfg:
    image_px: int = 28                                   # side of the square view fed to the networks
    scale: list[float] = field(default_factory=lambda: [0.35, 1.0])   # crop area, fraction of the image
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip: bool = True
    eval_resize_px: int = 0        # evaluation: resize short side to this, centre-crop image_px (0: resize to image_px)
    decode: str = "full"           # training views' pixels: full (decode the whole image) | reduced (a JPEG at 1/2..1/8
                                   # when the crop is >= 2 x image_px) | gpu (nvJPEG, crop and resize on the device);
                                   # stored in the cache, which a student under another policy is refused


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
    classifier_only: bool = False  # cRT: a new cosine classifier on init's frozen features (a teacher's: cached)
    rebalance: str = "none"        # on init's frozen model: lws (a learned per-class scale, class-balanced) |
                                   # tau_norm (rows / |row|^tau) | logit_adjust (logits - tau * log prior)
    tau: float = -1.0              # tau_norm / logit_adjust: tau; -1 chooses it on the val split
    head: str = "cosine"           # the classifier: cosine (gamma * cos) | linear (W e + b: tau_norm's stage 1)
    loss: str = "ce"               # ce | balanced_softmax (CE on z + log prior, Ren et al.; targets = none)


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


# The TOML sections, in file order; every one is a table but `teachers`, a list of [[teachers]] tables.
SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name not in ("source", "overrides"))
TABLES = tuple(s for s in SECTIONS if s != "teachers")


# The choice lists live here, at the bottom, so that loading a config climbs to no module that implements one;
# each implementing registry imports its names from here (tests/test_config.py checks that they agree).
FORMATS = ("fashion_mnist", "synthetic", "imagenet_lt", "inat", "imagefolder", "glyphs", "cifar")   # data/sources READERS
# data.profile: "exponential" cuts a balanced source to `exponential_profile`, "imagenet_lt_shape" to
# `imagenet_lt_shape_profile`; "cifar_lt" is the community's CIFAR-LT cut (`cifar_lt_subset`); "none" keeps a
# long-tailed source as it is (data/longtail.py)
PROFILES = ("exponential", "imagenet_lt_shape", "cifar_lt", "none")
# Shot groups by training-image count (paper, after Liu et al. 2019): many > 100, medium 20..100, few < 20.
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20
SAMPLINGS = ("class_balanced", "instance")   # student / teacher sampling: data/sampling.py `repeat_factors`
ALLOCATIONS = ("uniform", "draws")           # the cache's view allocation: data/sampling.py `view_counts`
DTYPES = ("float16", "float32", "int8")      # export.dtype: how descriptors are stored (cache/codec.py)
DISTILL = ("feature", "logit", "hybrid")   # what a student distils: `models.losses.distillation_loss` implements each
# how a frozen stage-1 model's classifier is rebalanced: `stages/rebalance.py` implements each
REBALANCE = ("none", "lws", "tau_norm", "logit_adjust")
CHOSEN_ON_VAL = ("tau_norm", "logit_adjust")   # the methods whose tau is chosen on val when student.tau = -1

# Every choice-valued key's options.
CHOICES = {
    "pipeline.amp": ("auto", "bf16", "off"),
    "pipeline.channels_last": ("auto", "on", "off"),
    "data.format": FORMATS,
    "data.profile": PROFILES,
    "data.on_error": ("stop", "skip"),
    "views.decode": ("full", "reduced", "gpu"),
    "teacher.type": ("standard", "data_aug"),
    "teacher.aug_style": ("paper", "official"),
    "teacher.source": ("trained", "imported"),
    "export.dtype": DTYPES,
    "export.allocation": ALLOCATIONS,
    "student.targets": ("cache", "replay", "online", "none"),
    "student.sampling": SAMPLINGS,
    "student.distill": DISTILL,
    "student.type": ("standard", "data_aug"),
    "student.rebalance": REBALANCE,
    "student.head": ("cosine", "linear"),
    "student.loss": ("ce", "balanced_softmax"),
}


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
