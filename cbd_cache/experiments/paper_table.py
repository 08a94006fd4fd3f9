"""`cbd-cache paper-table` (`make paper-table`): the paper's protocol on one prepared dataset and one cache.

Table 2 (single-stage baselines, fine-tuning, cRT, CBD, CBD_ENS), Table 3 (NCM), Figure 3 (alpha for
feature / logit / hybrid distillation), Table 1 (teacher mix), the view study (accuracy against the
view budget A for both allocations, next to the online mode, with the fidelity runs), and per-class
accuracy, each over `SEEDS`. One export with A = 16 views and teacher logits serves every row of
its allocation: view a does not depend on A, so `student.views = V` is exactly an A = V export, and
the default A = 8 is `student.views = 8`. The view study's other allocation gets its own A = 16
export, `W/cache_<allocation>.zarr`. Every run is a `sweep` run: re-running skips finished runs,
`--time-limit-min` stops between runs so the work can be done in chunks, and `--sections` trains
only some sections.
"""
from __future__ import annotations

import contextlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure   # figures drawn straight to files: no pyplot, no GUI backend

from ..config import Config, load_config
from ..data.longtail import SHOT_GROUPS, shot_group
from ..data.manifest import Manifest
from ..data.sampling import ALLOCATIONS
from ..data.shards import read_labels
from ..data.prepare import prepare
from ..dryrun import projected_cache_bytes
from ..export import export_cache
from ..jobs import JobsFailed
from ..logs import format_seconds, log
from ..ncm import ncm_report
from ..runtime import Runtime
from ..tables import markdown_table, pm
from ..teachers import train_teacher
from ..workdir import Workdir, read_json, write_json
from .sweep import METRICS, Run, execute, make_runs, run_workdir, seeds_text, stats, summarise

BASE = ("export.views=16", "export.logits=true", "student.views=8")
SEEDS = (0, 1, 2)
ALPHAS = (0.2, 0.4, 0.8)
VIEWS = (1, 2, 4, 8, 16)
DISTILL = ("feature", "logit", "hybrid")
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


class Timing:
    """Wall seconds of every step that did work, kept across chunked invocations (max per step)."""

    def __init__(self, path: Path):
        self.path = path
        self.steps: dict[str, float] = read_json(path) if path.is_file() else {}

    def record(self, step: str, seconds: float) -> None:
        self.steps[step] = max(self.steps.get(step, 0.0), round(seconds, 1))
        write_json(self.path, self.steps)

    @contextlib.contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        yield
        self.record(step, time.perf_counter() - t0)

    def total(self, prefix: str = "") -> float:
        return sum(v for k, v in self.steps.items() if k.startswith(prefix))


def paper_table(cfg: Config, wd: Workdir, runtime: Runtime, out: Path, time_limit_min: float = 0,
                jobs: int = 1, only: Sequence[str] = ()) -> bool:
    """Prepare, teachers, exports, every run (of the sections `only`, or all; `jobs` at a time), NCM; then the
    Markdown, JSON and PNGs in `out`.

    True when complete. If parallel runs failed, the table is written from the others before JobsFailed is raised.
    """
    deadline = time.time() + 60 * time_limit_min if time_limit_min > 0 else None
    pipeline, base = cfg.source, (*BASE, *fifth_teacher(cfg), *cfg.overrides)
    base_cfg = load_config(pipeline, base)
    timing = Timing(wd.root / "paper_table_timing.json")
    with timing("prepare"):
        prepare(base_cfg, wd)
    for t in base_cfg.teachers:
        if deadline is not None and time.time() >= deadline:
            log("[paper-table] time limit reached; run the same command again to continue")
            return False
        with timing(f"teacher {t.name}"):
            train_teacher(base_cfg, t, wd, runtime)
    with timing("export"):
        export_cache(base_cfg, wd, runtime)
    runs = all_runs(base_cfg, base, wd.root)
    chosen = {k: rs for k, rs in runs.items() if not only or k in only}
    if "views" in chosen:
        for alloc in ALLOCATIONS:
            if sets := allocation_sets(base_cfg, wd.root, alloc):
                other = load_config(pipeline, (*base, *sets))
                with timing(f"export {alloc}"):
                    export_cache(other, run_workdir(wd, other), runtime)
    failed = None
    try:
        complete = execute(training_order(chosen), pipeline, wd, runtime, deadline,
                           on_trained=lambda r, s: timing.record(f"student {r.name}", s), jobs=jobs)
    except JobsFailed as e:
        complete, failed = False, e
    ncm = ncm_rows(base_cfg, wd, runtime, runs, timing) if "table2" in chosen else []   # on the models finished so far
    write_paper_table(cfg, base, wd, runs, ncm, timing, out, complete and len(chosen) == len(runs))
    if failed is not None:
        raise failed
    return complete


def ncm_rows(cfg: Config, wd: Workdir, runtime: Runtime, runs: dict[str, list[Run]], timing: Timing) -> list[dict]:
    rows = []
    s1 = stage1(cfg)
    for source in ("cache", "images"):
        with timing(f"ncm teachers/{s1} {source}"):
            rep = ncm_report(cfg, wd, runtime, f"teachers/{s1}", source)
        rows.append({"label": f"Instance: teacher {s1} ({source} features)", "runs": [f"teachers/{s1}"],
                     "complete": True, **{m: stats([rep[m]] if rep[m] is not None else []) for m in METRICS}})
    for method in NCM_METHODS:
        mine = [r for r in runs["table2"] if r.label == method]
        reps = []
        for r in [r for r in mine if (wd.student_dir(r.name) / "run.json").is_file()]:
            with timing(f"ncm students/{r.name} images"):
                reps.append(ncm_report(cfg, wd, runtime, f"students/{r.name}", "images"))
        rows.append({"label": method, "runs": [f"students/{r.name}" for r in mine], "complete": len(reps) == len(mine),
                     **{m: stats([x[m] for x in reps if x[m] is not None]) for m in METRICS}})
    return rows


# -------------------------------------------------------------------------------------------- output
def _row(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["label"] == label), None)


def _mean(rows: list[dict], label: str, metric: str = "top1") -> float | None:
    r = _row(rows, label)
    return None if r is None or not r["complete"] else r[metric]["mean"]


def checks(summary: dict[str, list[dict]], ncm: list[dict], views: int = HEADLINE_VIEWS,
           cache_bytes: dict[str, int] | None = None) -> list[str]:
    """The issue's 'must show' claims, each stated with its numbers and whether it holds."""
    t2, alpha, by_views = summary["table2"], summary["alpha"], summary["views"]
    out = []

    def line(claim: str, values: list[tuple[str, float | None]], holds: bool | None):
        nums = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} –" for k, v in values)
        verdict = "not yet run" if holds is None else ("holds" if holds else "**does not hold**")
        out.append(f"- {claim}: {verdict} ({nums}).")

    order = [(m, _mean(t2, m)) for m in ("CBD_ENS", "CBD", "cRT", "Standard-Instance")]
    ok = None if any(v is None for _, v in order) else all(a[1] > b[1] for a, b in zip(order, order[1:]))
    line("CBD_ENS > CBD > cRT > Standard-Instance (top-1, mean of 3 seeds)", order, ok)
    fl = [(d, _mean(alpha, f"{d}, alpha=0.4")) for d in ("feature", "logit")]
    line("feature >= logit distillation at alpha = 0.4", fl,
         None if any(v is None for _, v in fl) else fl[0][1] >= fl[1][1])
    nc = [(f"NCM {m}", _mean(ncm, m)) for m in ("CBD", "Standard-Instance")] if ncm else []
    line("NCM on CBD features > NCM on Standard-Instance features", nc or [("NCM", None)],
         None if not nc or any(v is None for _, v in nc) else nc[0][1] > nc[1][1])
    online = {m: _mean(by_views, "online", m) for m in METRICS}
    draws = {m: _mean(by_views, f"draws A={views}", m) for m in METRICS}
    uniform = _mean(by_views, f"uniform A={views}")
    co = [(f"draws A={views}", draws["top1"]), (f"uniform A={views}", uniform), ("online", online["top1"])]
    line(f"cached CBD_ENS, draws allocation at A = {views}, within 0.5 top-1 points of online", co,
         None if draws["top1"] is None or online["top1"] is None else online["top1"] - draws["top1"] <= 0.5)
    groups = [(f"{g} draws - online", None if draws[g] is None or online[g] is None else draws[g] - online[g])
              for g in SHOT_GROUPS]
    line(f"no shot group of draws A = {views} more than 1.5 points below online", groups,
         None if any(v is None for _, v in groups) else min(v for _, v in groups) >= -1.5)
    if cache_bytes:
        b = [(f"draws A={views} MiB", cache_bytes.get(f"draws A={views}", 0) / 2**20),
             (f"uniform A={views} MiB", cache_bytes.get(f"uniform A={views}", 0) / 2**20)]
        line(f"draws A = {views} cache bytes within 5% of the uniform A = {views} cache", b,
             abs(b[0][1] / b[1][1] - 1) <= 0.05 if b[1][1] else None)
    for alloc in ALLOCATIONS:
        fid = [("cache", _mean(by_views, f"{alloc} A={views}")),
               ("teachers on the stored views", _mean(by_views, f"{alloc} A={views}, teachers on the stored views"))]
        line(f"fidelity, {alloc} A = {views}: cached targets train like the teachers run on the same views "
             "(within 1 point, seed noise)", fid,
             None if any(v is None for _, v in fid) else abs(fid[0][1] - fid[1][1]) <= 1.0)
    return out


def write_paper_table(cfg: Config, base: Sequence[str], wd: Workdir, runs: dict[str, list[Run]], ncm: list[dict],
                      timing: Timing, out: Path, complete: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.pipeline.name
    base_cfg = load_config(cfg.source, base)
    summary = {k: summarise(rs, wd) for k, rs in runs.items()}
    manifest = Manifest.load(wd.manifest)
    counts = manifest.train.class_counts
    groups = [shot_group(n) for n in counts]
    plots = {"alpha": out / f"{name}_alpha.png", "views": out / f"{name}_views.png",
             "per_class": out / f"{name}_per_class.png"}
    plot_alpha(summary, plots["alpha"])
    cache_bytes = budget_bytes(cfg.source, base, manifest)
    plot_views(summary["views"], plots["views"])
    plot_per_class(summary["table2"], manifest.class_names, plots["per_class"])
    sets = " ".join(f"--set {shlex.quote(o)}" for o in base)
    base_overrides_added = [o for o in base if o.startswith("teachers.")]
    sweep = f"cbd-cache sweep --pipeline {shlex.quote(cfg.source)} --workdir {shlex.quote(str(wd.root))} {sets}"
    total = timing.total()
    lines = [
        f"# The paper's protocol on {name}, {len(SEEDS)} seeds",
        "",
        f"Made by `make paper-table`, i.e. `cbd-cache paper-table --pipeline {shlex.quote(cfg.source)} "
        f"--workdir {shlex.quote(str(wd.root))} --out {shlex.quote(str(out))}`"
        f"{'' if complete else ' (**partial: not every run is finished yet**)'}. Each row below is "
        f"also `{sweep} <row's --set> --seeds {','.join(map(str, SEEDS))}`, which finds the same runs "
        "finished. Numbers are mean ± sample std over the seeds of top-1 and of the mean per-class accuracy of "
        "the many / medium / few-shot groups, on the balanced test set.",
        "",
        f"Data: {manifest.train.num_samples} training images in {len(counts)} classes, {max(counts)} down to "
        f"{min(counts)} per class ("
        + ", ".join(f"{groups.count(g)} {g}-shot" for g in SHOT_GROUPS)
        + f"), {manifest.splits[manifest.eval_split].num_samples} {manifest.eval_split} images. One export: {len(base_cfg.teachers)} teachers "
        f"x A = {base_cfg.export.views} views, with logits; A = {base_cfg.student.views} "
        f"(`student.views={base_cfg.student.views}`) everywhere else.",
        "",
        f"Wall time, 2-core CPU, no GPU: **{format_seconds(total)}** of work (prepare + teachers + export "
        f"{format_seconds(timing.total('prepare') + timing.total('teacher') + timing.total('export'))}, "
        f"{sum(1 for k in timing.steps if k.startswith('student'))} student runs "
        f"{format_seconds(timing.total('student'))}, NCM {format_seconds(timing.total('ncm'))}), summed over "
        f"the chunks it ran in (`{wd.root}/paper_table_timing.json`).",
        "",
        "## Checks",
        "",
        *checks(summary, ncm, HEADLINE_VIEWS, cache_bytes),
        "",
        "## Table 2: long-tailed recognition",
        "",
    ]
    sets_of = dict(table2(base_cfg))
    rows = []
    for r in summary["table2"]:
        paper = PAPER_TABLE2.get(r["label"])
        ptxt = f"{paper[3]} ({paper[0]} / {paper[1]} / {paper[2]})" if paper else "–"
        settings = " ".join(f"`{s.split('.', 1)[1]}`" for s in sets_of[r["label"]]) or "(defaults)"
        rows.append([r["label"], settings, *(pm(r[m]) for m in METRICS), seeds_text(r), ptxt])
    if first_aug(base_cfg) is None:
        rows.append(["Fine-tuning (data-aug), cRT (data-aug)", "not run: the pipeline has no data-aug teacher",
                     *["–"] * 6])
    lines += table(["method", "student settings", "top-1", "many", "medium", "few", "seeds",
                    "paper ImageNet-LT all (many / med / few)"], rows, "llrrrrrl")
    lines += ["", "## Table 3: NCM on each model's features", "",
              "Features centred on the training mean, L2-normalised; nearest class mean. `cbd-cache ncm "
              f"--workdir {wd.root} MODEL [--features cache]` computes one.", ""]
    lines += table(["features", "top-1", "many", "medium", "few", "models", "paper ImageNet-LT all"],
                   [[r["label"], *(pm(r[m]) for m in METRICS), seeds_text(r), PAPER_NCM.get(r["label"], "–")]
                    for r in ncm])
    alpha_rows = summary["alpha"]
    lines += ["", f"## Figure 3: top-1 against alpha (teacher {stage1(base_cfg)}, K = 1)", "",
              f"![alpha]({plots['alpha'].name})", ""]
    lines += table(["distillation", *(f"alpha={a}" for a in ALPHAS)],
                   [[d, *(pm(_row(alpha_rows, f"{d}, alpha={a}")["top1"]) for a in ALPHAS)] for d in DISTILL])
    lines += ["", f"Logit distillation: T = {base_cfg.student.temperature}, the teachers' cached logits; "
              "hybrid adds both terms under one alpha (see `cbd_cache/losses.py`). alpha = 0 is cross-entropy "
              "only: the Standard-Class-Bal row of Table 2.",
              "", f"## Table 1: which teachers (CBD, cached, A = {base_cfg.student.views})", "",
              "The paper's rows: K = 1 (one standard / one data-aug), K = 2 (two standard / two data-aug / one of "
              "each), K = 3 (one standard + two data-aug), K = 4 (two + two), K = 5 (two standard + three data-aug)."
              + (f" The fifth teacher is trained for this table only (`--set {base_overrides_added[0]}`)."
                 if base_overrides_added else ""), ""]
    mix_sets = dict(sections(base_cfg, wd.root)[-1].points)
    std_n = sum(t.type == "standard" for t in base_cfg.teachers)
    rows = []
    for m in teacher_mixes(base_cfg):
        k = m.standard + m.data_aug
        r = _row(summary["mix"], m.label) if m.teachers else None
        if r is None:
            rows.append([k, m.composition, "–", f"not run: the pipeline has {std_n} standard and "
                         f"{len(base_cfg.teachers) - std_n} data-aug teachers", *["–"] * 5])
            continue
        settings = " ".join(f"`{x.split('.', 1)[1]}`" for x in mix_sets[m.label]) or "(defaults)"
        rows.append([k, m.composition, m.label, settings, *(pm(r[x]) for x in METRICS), seeds_text(r)])
    lines += table(["K", "mix", "teachers", "student settings", "top-1", "many", "medium", "few", "seeds"], rows,
                   "rlllrrrrr")
    lines += ["", f"## The view budget: where cached views go (CBD_ENS, K = {len(base_cfg.student_teachers())})", "",
              "uniform: every image gets A views. draws: image i gets max(1, round(A * r_c(i))) views, r_c its "
              "class's class-balanced repeat factor, i.e. views where the student's draws are, for the same "
              "budget of about N * A views (`export.allocation`). Each allocation's rows are one A = 16 export "
              "read at `student.views=A` (a prefix of each image's views, exactly what an A export holds); the "
              "bytes are those of an A export of that allocation (float16, no logits), from the cache schema's "
              "layout, chunk padding included. 'teachers on the stored views' (`student.targets=replay`) runs "
              "the teachers on the cache's views instead of reading their targets: it tests the cache's fidelity.",
              "", f"![views]({plots['views'].name})", ""]
    rows = []
    for r in summary["views"]:
        alloc, _, rest = r["label"].partition(" A=")
        a = rest.split(",")[0] if rest else "–"
        if r["label"] == "online":
            alloc = "online (teachers every step, fresh views)"
        elif "teachers on" in r["label"]:
            alloc += ", teachers on the stored views"
        mib = f"{cache_bytes[r['label']] / 2**20:.2f}" if r["label"] in cache_bytes else "–"
        rows.append([alloc, a, *(pm2(r[m]) for m in METRICS), mib, seeds_text(r)])
    lines += table(["allocation", "A", "top-1", "many", "medium", "few", "cache MiB", "seeds"], rows)
    lines += ["", "## Per class: accuracy against training images", "", f"![per class]({plots['per_class'].name})", ""]
    per = {m: _row(summary["table2"], m) for m in PER_CLASS}
    lines += table(["class", "train images", *PER_CLASS],
                   [[manifest.class_names[c], counts[c],
                     *(f"{per[m]['per_class'][c]:.1f}" if per[m] and per[m]["per_class"] else "–" for m in PER_CLASS)]
                    for c in sorted(range(len(counts)), key=lambda c: -counts[c])])
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    write_json(out / f"{name}.json", {"complete": complete, "base_overrides": list(base), "seeds": list(SEEDS),
                                      "sections": summary, "ncm": ncm, "timing_s": timing.steps})
    log(f"[paper-table] wrote {md}" + ("" if complete else " (partial)"))
    return md


def table(header: Sequence[str], rows, align: str = "") -> list[str]:
    """`tables.markdown_table` as lines of the report."""
    return markdown_table(header, rows, align).rstrip("\n").split("\n")


def budget_bytes(pipeline: str, base: Sequence[str], manifest: Manifest) -> dict[str, int]:
    """Bytes of an A export of each allocation (float16 descriptors, no logits), by view-study label."""
    labels = read_labels(manifest, "train")
    out = {}
    for alloc in ALLOCATIONS:
        for v in VIEWS:
            cfg = load_config(pipeline, (*base, f"export.views={v}", f"export.allocation={alloc}",
                                         "export.logits=false", "student.views=0"))
            out[f"{alloc} A={v}"] = sum(projected_cache_bytes(cfg, labels, manifest.train.class_counts).values())
    return out


def pm2(s: dict) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


# --------------------------------------------------------------------------------------------- plots
def plot_alpha(summary: dict[str, list[dict]], path: Path) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for d, marker in zip(DISTILL, "os^"):
        pts = [(a, _row(summary["alpha"], f"{d}, alpha={a}")["top1"]) for a in ALPHAS]
        pts = [(a, s) for a, s in pts if s["mean"] is not None]
        if pts:
            ax.errorbar([a for a, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                        marker=marker, capsize=3, label=f"{d} distillation")
    ce = _row(summary["table2"], "Standard-Class-Bal")
    if ce and ce["top1"]["mean"] is not None:
        ax.axhline(ce["top1"]["mean"], color="grey", ls="--", label="alpha = 0 (class-balanced CE)")
    ax.set(xlabel="alpha", ylabel="top-1 (%)", title="Distillation weight (one standard teacher)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_views(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for alloc, marker in zip(ALLOCATIONS, "os"):
        pts = [(v, _row(rows, f"{alloc} A={v}")["top1"]) for v in VIEWS]
        pts = [(v, s) for v, s in pts if s["mean"] is not None]
        if pts:
            ax.errorbar([v for v, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                        marker=marker, capsize=3, label=f"cached, {alloc} allocation")
    online = _row(rows, "online")["top1"]
    if online["mean"] is not None:
        ax.axhline(online["mean"], color="C3", label="online (fresh views)")
        ax.axhspan(online["mean"] - online["std"], online["mean"] + online["std"], color="C3", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(VIEWS), [str(v) for v in VIEWS])
    ax.set(xlabel="view budget A (N * A views stored)", ylabel="top-1 (%)", title="CBD_ENS: cached views vs online")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_per_class(rows: list[dict], class_names: list[str], path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for m, marker in zip(PER_CLASS, "osD"):
        r = _row(rows, m)
        if r and r["per_class"]:
            pts = sorted(zip(r["train_counts"], r["per_class"]))
            ax.plot([c for c, _ in pts], [a for _, a in pts], marker=marker, label=m)
    ax.set_xscale("log")
    ax.set(xlabel="training images of the class", ylabel="test accuracy of the class (%)",
           title="Per-class accuracy (mean of seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
