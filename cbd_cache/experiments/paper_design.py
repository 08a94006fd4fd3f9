"""The paper table's design: which runs each section trains, and with which `--set`s.

Table 2 (single-stage baselines, fine-tuning, cRT, CBD, CBD_ENS), Figure 3 (alpha for feature /
logit / hybrid distillation), Table 1 (teacher mix), the view study (the view budget A for both
allocations, next to the online mode, with the fidelity runs), Table 4 (the field's baselines:
tau-norm, LWS, logit adjustment, Balanced Softmax, beside cRT and CBD) and the control experiments
(longer baselines, the upper bound), each over `SEEDS`. One export with A = 16 views and teacher
logits serves every row of its allocation: view a does not depend on A, so `student.views = V` is
exactly an A = V export, and the default A = 8 is `student.views = 8`. The view study's other
allocation gets its own A = 16 export, `W/cache_<allocation>.zarr`.

A row trained from another row's model names it `student.init=students/@<label>`: that row's run of
the same seed (or of its one seed), resolved by `all_runs`; such rows train after the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cbd_cache.config import ALLOCATIONS, DISTILL, Config
from cbd_cache.data.sources import has_balanced_train
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


# Table 4 (ImageNet-LT, ResNet-50; logit adjustment gives "all" only) and Section 4.3's controls, top-1 "all".
PAPER_TABLE4 = {"LWS": (57.1, 45.2, 29.3, 47.7), "cRT": (58.8, 44.0, 26.1, 47.3),
                "Logit Adjustment": (None, None, None, 51.1), "CBD": PAPER_TABLE2["CBD"],
                "CBD_ENS": PAPER_TABLE2["CBD_ENS"]}
PAPER_CONTROLS = {"Standard-Instance, 2x epochs": 47.1, "cRT, the student's epochs": 50.1, "Upper bound": 73.5}


NCM_METHODS = ("Standard-Instance", "Standard-Class-Bal", "Fine-tuning", "CBD", "CBD_ENS")


PER_CLASS = ("Standard-Instance", "cRT", "CBD_ENS")


UPPER_EXTRACTOR = "Upper bound: feature extractor (full balanced training set)"


# What the paper's claims rest on is trained first, so a partial table already answers them; the upper bound's
# extractor (the student's epochs over the whole balanced set: the longest run) starts early, beside the rest.
PRIORITY = ("Standard-Instance", "cRT", "CBD", "CBD_ENS", UPPER_EXTRACTOR,
            "uniform A=8", "draws A=8", "online",
            "uniform A=8, teachers on the stored views", "draws A=8, teachers on the stored views",
            "logit, alpha=0.4", "hybrid, alpha=0.4")


SECTION_KEYS = ("table2", "views", "alpha", "mix", "table4", "controls")


REF = "students/@"        # student.init=students/@<label>: the run of that row


FIGURE_MODELS = ("Standard-Instance", "CBD_ENS")    # Figures 1 and 4: Instance vs CBD_ENS, seed 0


HEADLINE_VIEWS = 8       # the view study's headline budget: its fidelity runs and the checks


def stage1(cfg: Config) -> str:
    """The stage-1 model of fine-tuning, cRT and CBD: the first standard (instance-sampled) teacher."""
    return next((t.name for t in cfg.teachers if t.type == "standard"), cfg.teachers[0].name)


def first_aug(cfg: Config) -> str | None:
    """The stage-1 model of the data-augmentation two-stage baselines: the first data-augmentation teacher."""
    return next((t.name for t in cfg.teachers if t.type == "data_aug"), None)


INSTANCE = ("student.targets=none", "student.sampling=instance")
CRT = ("student.targets=none", "student.classifier_only=true")
CRT_EPOCHS = 10


def table2(cfg: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Table 2's rows as `--set` lists. cRT trains 10 epochs: Kang et al.'s cRT schedule (the CBD paper
    takes cRT from them and gives no schedule of its own), not the student's 90 / 200."""
    s1, a1 = stage1(cfg), first_aug(cfg)
    finetune = ("student.targets=none", "student.lr=0.01", "student.epochs=10")
    crt = (*CRT, f"student.epochs={CRT_EPOCHS}")
    rows = [
        ("Standard-Instance", INSTANCE),
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


def table4(cfg: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Table 4's rows: the field's baselines from the same stage-1 models, beside cRT, CBD and CBD_ENS.

    LWS trains on the first standard teacher's cached descriptors, as cRT does (10 epochs). Logit
    adjustment adjusts the Standard-Instance logits. tau-normalisation needs a classifier whose row
    norms matter, and this tool's cosine classifier normalises them (every tau would give the same
    model), so its stage 1 is Standard-Instance with a linear head. Both choose tau on val.
    """
    rows = dict(table2(cfg))
    return (("Standard-Instance", INSTANCE),
            ("Standard-Instance (linear head)", (*INSTANCE, "student.head=linear")),
            ("τ-norm", ("student.targets=none", "student.rebalance=tau_norm",
                        f"student.init={REF}Standard-Instance (linear head)")),
            ("LWS", ("student.targets=none", "student.rebalance=lws", f"student.epochs={CRT_EPOCHS}",
                     f"student.init=teachers/{stage1(cfg)}")),
            ("Logit Adjustment", ("student.targets=none", "student.rebalance=logit_adjust",
                                  f"student.init={REF}Standard-Instance")),
            ("Balanced Softmax", (*INSTANCE, "student.loss=balanced_softmax")),
            *((m, rows[m]) for m in ("cRT", "CBD", "CBD_ENS")))


def upper_bound_sets(cfg: Config, root: Path) -> tuple[str, ...] | None:
    """The --set items of the data the upper bound's extractor trains on: the source's whole balanced training
    set (`data.profile=none`, prepared into W/data_full); None when the source has none."""
    if not has_balanced_train(cfg.data):
        return None
    return ("data.profile=none", f"pipeline.data_url={Path(root) / 'data_full'}")


def controls(cfg: Config, root: Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Section 4.3: Standard-Instance at twice the epochs, cRT at the student's epochs, and the upper bound: an
    extractor trained on the full balanced set (one, seed 0), frozen, under a class-balanced cRT classifier."""
    rows = [("Standard-Instance, 2x epochs", (*INSTANCE, f"student.epochs={2 * cfg.student.epochs}")),
            ("cRT, the student's epochs", (*CRT, f"student.epochs={cfg.student.epochs}",
                                           f"student.init=teachers/{stage1(cfg)}"))]
    if (full := upper_bound_sets(cfg, root)) is not None:
        rows += [(UPPER_EXTRACTOR, (*INSTANCE, *full)),
                 ("Upper bound", (*CRT, f"student.epochs={CRT_EPOCHS}", f"student.init={REF}{UPPER_EXTRACTOR}"))]
    return tuple(rows)


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
    seeds: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (label, its seeds) where not SEEDS


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
            Section("mix", mixes), Section("table4", table4(cfg)),
            Section("controls", controls(cfg, root), ((UPPER_EXTRACTOR, (0,)),))]


def resolve(item: str, seed: int, names: dict[tuple[str, int], str]) -> str:
    """`student.init=students/@<label>` -> that label's run of `seed` (or of its one seed); other items as they are."""
    key, _, value = item.partition("=")
    if not value.startswith(REF):
        return item
    label = value[len(REF):]
    seeds = sorted(s for lab, s in names if lab == label)
    return f"{key}=students/{names[(label, seed if seed in seeds else seeds[0])]}"


def all_runs(cfg: Config, base: Sequence[str], root: Path) -> dict[str, list[Run]]:
    """Every section's runs, each row x its seeds, with `students/@<label>` references resolved (to earlier rows)."""
    out, names = {}, {}
    for s in sections(cfg, root):
        seeds, runs = dict(s.seeds), []
        for label, sets in s.points:
            for seed in seeds.get(label, SEEDS):
                run = make_runs(cfg.source, base, [(label, tuple(resolve(x, seed, names) for x in sets))], [seed])[0]
                names[(label, seed)] = run.name
                runs.append(run)
        out[s.key] = runs
    return out


def needs_student(run: Run) -> bool:
    """The run starts from another student run (which must be trained first)."""
    return any(o.startswith("student.init=students/") for o in run.overrides)


def training_order(runs: dict[str, list[Run]]) -> list[Run]:
    flat = [r for rs in runs.values() for r in rs]
    rank = {label: i for i, label in enumerate(PRIORITY)}
    return sorted(flat, key=lambda r: rank.get(r.label, len(rank)))      # stable: section order otherwise
