"""The paper table's design: which runs each section trains, and with which `--set`s.

Table 2 (single-stage baselines, fine-tuning, cRT, CBD, CBD_ENS), Figure 3 (alpha for feature /
logit / hybrid distillation), Table 1 (teacher mix) and the view study (the view budget A for both
allocations, next to the online mode, with the fidelity runs), each over `SEEDS`. One export with
A = 16 views and teacher logits serves every row of its allocation: view a does not depend on A, so
`student.views = V` is exactly an A = V export, and the default A = 8 is `student.views = 8`. The
view study's other allocation gets its own A = 16 export, `W/cache_<allocation>.zarr`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cbd_cache.config import DISTILL, Config
from cbd_cache.data.sampling import ALLOCATIONS
from cbd_cache.experiments.sweep import Run, make_runs

BASE = ("export.views=16", "export.logits=true", "student.views=8")


SEEDS = (0, 1, 2)


ALPHAS = (0.2, 0.4, 0.8)


VIEWS = (1, 2, 4, 8, 16)




# The paper's ImageNet-LT test numbers, ResNet-50 (many, medium, few, all).
PAPER_TABLE2 = {"Standard-Instance": (66.6, 40.4, 13.0, 46.7), "Standard-Class-Bal": (60.4, 40.0, 14.3, 44.3),
                "Fine-tuning": (62.8, 46.1, 24.8, 49.6), "cRT": (62.9, 46.0, 25.7, 49.8),
                "CBD": (65.2, 48.0, 25.9, 51.6), "CBD_ENS": (68.5, 52.7, 29.2, 55.6)}


PAPER_NCM = {"Standard-Instance": 49.0, "CBD": 50.7, "CBD_ENS": 54.0}


NCM_METHODS = ("Standard-Instance", "Standard-Class-Bal", "Fine-tuning", "CBD", "CBD_ENS")


PER_CLASS = ("Standard-Instance", "cRT", "CBD_ENS")


# What the paper's claims rest on is trained first, so a partial table already answers them.
PRIORITY = ("Standard-Instance", "cRT", "CBD", "CBD_ENS", "uniform A=8", "draws A=8", "online",
            "uniform A=8, teachers on the stored views", "draws A=8, teachers on the stored views",
            "logit, alpha=0.4", "hybrid, alpha=0.4")


SECTION_KEYS = ("table2", "views", "alpha", "mix")


HEADLINE_VIEWS = 8       # the view study's headline budget: its fidelity runs and the checks


def stage1(cfg: Config) -> str:
    """The stage-1 model of fine-tuning, cRT and CBD: the first standard (instance-sampled) teacher."""
    return next((t.name for t in cfg.teachers if t.type == "standard"), cfg.teachers[0].name)


def first_aug(cfg: Config) -> str | None:
    """The stage-1 model of the data-augmentation two-stage baselines: the first data-augmentation teacher."""
    return next((t.name for t in cfg.teachers if t.type == "data_aug"), None)


def table2(cfg: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Table 2's rows as `--set` lists. cRT trains 10 epochs: Kang et al.'s cRT schedule (the CBD paper
    takes cRT from them and gives no schedule of its own), not the student's 90 / 200."""
    s1, a1 = stage1(cfg), first_aug(cfg)
    finetune = ("student.targets=none", "student.lr=0.01", "student.epochs=10")
    crt = ("student.targets=none", "student.classifier_only=true", "student.epochs=10")
    rows = [
        ("Standard-Instance", ("student.targets=none", "student.sampling=instance")),
        ("Standard-Class-Bal", ("student.targets=none",)),
        ("Data-aug-Instance", ("student.targets=none", "student.type=data_aug", "student.sampling=instance")),
        ("Data-aug-Class-Bal", ("student.targets=none", "student.type=data_aug")),
        ("Fine-tuning", (*finetune, f"student.init=teachers/{s1}")),
        ("cRT", (*crt, f"student.init=teachers/{s1}")),
    ]
    if a1 is not None:   # the data-augmentation two-stage baselines: the same, from a data-augmentation teacher
        rows += [("Fine-tuning (data-aug)", (*finetune, f"student.init=teachers/{a1}")),
                 ("cRT (data-aug)", (*crt, f"student.init=teachers/{a1}"))]
    return (*rows, ("CBD", (f"student.teachers=[{s1}]",)), ("CBD_ENS", ()))


# Table 1's rows as the paper ran them: (standard, data-augmentation) teachers of each mix.
MIX_ROWS = ((1, 0), (0, 1), (2, 0), (0, 2), (1, 1), (1, 2), (2, 2), (2, 3))


@dataclass(frozen=True)
class Mix:
    standard: int
    data_aug: int
    teachers: tuple[str, ...] | None      # None: the pipeline has too few teachers of a type for this row

    @property
    def label(self) -> str:
        return "+".join(self.teachers) if self.teachers else f"{self.standard} std + {self.data_aug} aug"

    @property
    def composition(self) -> str:
        return " + ".join(x for x in (f"{self.standard} standard" if self.standard else "",
                                      f"{self.data_aug} data-aug" if self.data_aug else "") if x)


def teacher_mixes(cfg: Config) -> list[Mix]:
    """Table 1's mixes from the pipeline's teachers, in the paper's order (K = 1, 2, 3, 4, 5)."""
    std = [t.name for t in cfg.teachers if t.type == "standard"]
    aug = [t.name for t in cfg.teachers if t.type == "data_aug"]
    return [Mix(s, a, tuple(std[:s] + aug[:a]) if len(std) >= s and len(aug) >= a else None) for s, a in MIX_ROWS]


def fifth_teacher(cfg: Config) -> tuple[str, ...]:
    """The override that adds Table 1's K = 5 teacher (a third data-augmentation one) to the paper table's runs.

    Only to a pipeline with 2 standard + 2 data-augmentation teachers whose student names its teachers
    (`student.teachers`): every other run then keeps the pipeline's default K, and the demo, which trains
    every [[teachers]] entry, stays as it is.
    """
    std = [t for t in cfg.teachers if t.type == "standard"]
    aug = [t for t in cfg.teachers if t.type == "data_aug"]
    if len(std) != 2 or len(aug) != 2 or not cfg.student.teachers:
        return ()
    names = {t.name for t in cfg.teachers}
    name = next(f"aug{i}" for i in range(2, 100) if f"aug{i}" not in names)
    return (f'teachers.{name}={{type = "data_aug", seed = {max(t.seed for t in cfg.teachers) + 1}}}',)


@dataclass(frozen=True)
class ExportStep:
    label: str                        # its timing key
    sets: tuple[str, ...]             # --set items of its config beyond the base (another allocation's cache)
    teachers: tuple[str, ...]         # the teacher groups it writes


def export_steps(cfg: Config, root: Path, pipeline_teachers: Sequence[str], chosen: Sequence[str]) -> list[ExportStep]:
    """The exports the paper table runs for the sections `chosen`: the pipeline's teachers into the one
    cache; Table 1's fifth teacher added to that same cache (`export --teachers`, no second export); the
    view study's other allocation, with the teachers its runs distil."""
    steps = [ExportStep("export", (), tuple(pipeline_teachers))]
    added = tuple(t.name for t in cfg.teachers if t.name not in pipeline_teachers)
    if added and "mix" in chosen:
        steps.append(ExportStep(f"export {'+'.join(added)} (added for Table 1, K = 5)", (), added))
    if "views" in chosen:
        steps += [ExportStep(f"export {alloc}", sets, tuple(cfg.student_teachers()))
                  for alloc in ALLOCATIONS if (sets := allocation_sets(cfg, root, alloc))]
    return steps


@dataclass(frozen=True)
class Section:
    key: str
    points: tuple[tuple[str, tuple[str, ...]], ...]     # (label, student --set items)


def allocation_sets(cfg: Config, root: Path, allocation: str) -> tuple[str, ...]:
    """The --set items of a run on `allocation`'s cache: none for the pipeline's own, else its own A = 16 export."""
    if allocation == cfg.export.allocation:
        return ()
    return (f"export.allocation={allocation}", f"pipeline.cache_url={Path(root) / f'cache_{allocation}.zarr'}")


def views_points(cfg: Config, root: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Budget x allocation, online, and the fidelity runs (teachers run on the stored views of A = 8)."""
    points = [(f"{alloc} A={v}", (*allocation_sets(cfg, root, alloc), f"student.views={v}"))
              for alloc in ALLOCATIONS for v in VIEWS]
    points.append(("online", ("student.targets=online",)))
    points += [(f"{alloc} A={HEADLINE_VIEWS}, teachers on the stored views",
                (*allocation_sets(cfg, root, alloc), f"student.views={HEADLINE_VIEWS}", "student.targets=replay"))
               for alloc in ALLOCATIONS]
    return tuple(points)


def sections(cfg: Config, root: Path) -> list[Section]:
    s1 = stage1(cfg)
    fig3 = tuple((f"{d}, alpha={a}", (f"student.teachers=[{s1}]", f"student.distill={d}", f"student.alpha={a}"))
                 for d in DISTILL for a in ALPHAS)
    default = tuple(cfg.student_teachers())
    mixes = tuple((m.label, () if m.teachers == default else (f"student.teachers=[{','.join(m.teachers)}]",))
                  for m in teacher_mixes(cfg) if m.teachers)
    return [Section("table2", table2(cfg)), Section("views", views_points(cfg, root)), Section("alpha", fig3),
            Section("mix", mixes)]


def all_runs(cfg: Config, base: Sequence[str], root: Path) -> dict[str, list[Run]]:
    return {s.key: make_runs(cfg.source, base, s.points, SEEDS) for s in sections(cfg, root)}


def training_order(runs: dict[str, list[Run]]) -> list[Run]:
    flat = [r for rs in runs.values() for r in rs]
    rank = {label: i for i, label in enumerate(PRIORITY)}
    return sorted(flat, key=lambda r: rank.get(r.label, len(rank)))      # stable: section order otherwise
