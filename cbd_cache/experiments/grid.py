"""`cbd-cache grid`: the whole protocol over a grid of cells, each cell replicated on fresh draws of the data.

A cell is one combination of the axes. An axis may tie keys together, which then take each value at once:
`--axis teacher.epochs+student.epochs=20,40,80` trains teachers and students at one schedule, and
`--axis teacher.arch+student.arch=resnet8,resnet20` gives both one capacity. A replicate r redraws the data
and every training seed together (`replicate_sets`): a claim over replicates is a mean over fresh draws, not
over training seeds of one draw.

Each (cell, replicate) is a workdir of its own, `W/cells/<cell>/rep<r>`, and runs what its rows need through
the stages the pipeline already has: prepare -> the teachers its rows distil or start from -> the exports
those rows read -> the rows (sweep runs) -> NCM of the single-stage baselines. Every step skips what is
done, so a grid resumes wherever it stopped (SIGTERM, SIGKILL, `--time-limit-min`), a second call trains
nothing, and grids that share a cell (the same settings) share its runs. The rows are the paper table's
(`paper_design`), named by their labels. The table: every cell x row as mean ± std over replicates; per cell,
CBD_ENS minus the best non-CBD row with its spread, and how many replicates show each ordering.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cbd_cache import pipeline
from cbd_cache.config import Config, load_config
from cbd_cache.errors import ConfigError, JobsFailed
from cbd_cache.experiments.grid_plots import heatmap_entries, plot_cbd_pays
from cbd_cache.experiments.paper_design import REF, resolve, table2, table4
from cbd_cache.experiments.paper_report import Timing
from cbd_cache.experiments.sweep import (
    METRICS,
    Run,
    execute,
    load_report,
    make_runs,
    run_workdir,
    split_values,
    stats,
)
from cbd_cache.stages.ncm import ncm_report
from cbd_cache.system.logs import format_seconds, log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import write_json
from cbd_cache.system.tables import markdown_table, pm
from cbd_cache.train.runs import flat_config, frozen_from_cache, is_done
from cbd_cache.workdir import Workdir, read_run_json
from cbd_cache.workdir import ncm_report as ncm_report_path

# The map's rows: the single-stage baselines, cRT, the best post-hoc baseline of the paper tables (Logit
# Adjustment: no model of its own, tau chosen on val), CBD (K = 1) and CBD_ENS (the pipeline's K teachers).
DEFAULT_ROWS = ("Standard-Instance", "Standard-Class-Bal", "cRT", "Logit Adjustment", "CBD", "CBD_ENS")
DISTILLED = ("CBD", "CBD_ENS")                        # rows that need teachers' descriptors; the rest are baselines
ENSEMBLE = "CBD_ENS"
NCM_ROWS = ("Standard-Instance", "Standard-Class-Bal")  # the rule's cheap signal: NCM on their features
ONLINE = "CBD_ENS online"                             # the teachers every step, on fresh views
VIEW_BUDGET = re.compile(r"^CBD_ENS A=(\d+)$")        # CBD_ENS from a cache of A views per image, its own export
TEACHER_SEED_STRIDE = 100                             # replicate r: each teacher's seed + 100 r
RESERVED = ("data.seed", "pipeline.seed", "student.seed", "student.name", "pipeline.data_url", "pipeline.cache_url")


@dataclass(frozen=True)
class Axis:
    keys: tuple[str, ...]       # tied keys: each takes the same value
    values: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.keys[0].rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Cell:
    label: str                  # "epochs=40, arch=resnet20": every axis
    folder: str                 # W/cells/<folder>: only the values that differ from the pipeline file's
    sets: tuple[str, ...]       # its --set items


def parse_axes(items: Sequence[str]) -> list[Axis]:
    """`--axis teacher.epochs+student.epochs=20,40` items -> Axes; the seeds belong to the replicates."""
    axes = []
    for item in items:
        lhs, _, text = item.partition("=")
        keys = tuple(k.strip() for k in lhs.split("+"))
        if not text or not all(keys):
            raise ConfigError(f"--axis {item!r}: expected key=v1,v2,... or key1+key2=v1,v2,..., for example "
                              "teacher.epochs+student.epochs=20,40")
        if reserved := [k for k in keys if k in RESERVED or re.fullmatch(r"teachers\.[^.]+\.seed", k)]:
            raise ConfigError(f"--axis {reserved[0]}: the replicates set the seeds and the grid the workdirs; "
                              "choose the replicates with --replicates")
        values = tuple(split_values(text))
        if any(not v for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"--axis {item!r}: give distinct, non-empty values")
        axes.append(Axis(keys, values))
    if len({a.keys for a in axes}) != len(axes):
        raise ConfigError("--axis: the same keys twice; give each axis once")
    return axes


def parse_replicates(text: str) -> list[int]:
    try:
        reps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--replicates {text!r}: expected integers, for example 0,1,2") from None
    if not reps or len(set(reps)) != len(reps) or min(reps) < 0:
        raise ConfigError(f"--replicates {text!r}: give one or more distinct replicates >= 0")
    return reps


def cells(source: str | Path, base: Sequence[str], axes: Sequence[Axis]) -> list[Cell]:
    """Every combination of the axes, in the order given (the last axis fastest), each config validated.

    A cell's folder names every setting, --set or axis value, that differs from the pipeline file's: so a grid
    with other --set items never lands in another grid's cells, and grids that agree on a cell share it."""
    ref, based = flat_config(load_config(source)), flat_config(load_config(source, base))
    if urls := [k for k in ("pipeline.data_url", "pipeline.cache_url") if based[k]]:
        raise ConfigError(f"{urls[0]} is set: a grid gives each cell its own data and cache under its "
                          "workdir; unset it (a row that needs another cache gets one there)")
    varied = {k for a in axes for k in a.keys}
    if clash := [i for i in base if i.partition("=")[0].strip() in varied]:
        raise ConfigError(f"--set {clash[0]}: an --axis varies that key; drop one of the two")
    fixed = [safe(i.replace(" ", "")) for i in base
             if (k := i.partition("=")[0].strip()) not in ref or based[k] != ref[k]]
    out = [Cell("", "_".join(fixed), ())]
    for axis in axes:
        nxt = []
        for c in out:
            for v in axis.values:
                sets = tuple(f"{k}={v}" for k in axis.keys)
                mine = flat_config(load_config(source, (*base, *c.sets, *sets)))
                differs = any(mine[k] != ref[k] for k in axis.keys)
                part = f"{axis.name}={v}"
                nxt.append(Cell(", ".join(x for x in (c.label, part) if x),
                                "_".join(x for x in (c.folder, safe(part) if differs else "") if x), (*c.sets, *sets)))
        out = nxt
    out = [Cell(c.label or "default", c.folder or "default", c.sets) for c in out]
    if len({c.folder for c in out}) != len(out):
        raise ConfigError("--axis: two cells would share one folder (values that differ only in characters a "
                          "folder name cannot hold); give distinct values")
    return out


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._+-]", "-", text)


def replicate_sets(cfg: Config, r: int) -> tuple[str, ...]:
    """Replicate r draws the data again (data.seed), and every seed of training with it: the cached views
    (pipeline.seed) and each teacher's; the student's is the run's seed. Replicate 0 is the pipeline as it is."""
    if r == 0:
        return ()
    return (f"data.seed={cfg.data.seed + r}", f"pipeline.seed={cfg.pipeline.seed + r}",
            *(f"teachers.{t.name}.seed={t.seed + TEACHER_SEED_STRIDE * r}" for t in cfg.teachers))


def row_sets(cfg: Config, root: Path, label: str) -> tuple[str, ...]:
    """A row's student --set items: the paper table's rows, the online CBD_ENS, or CBD_ENS at another view budget."""
    rows = {**dict(table2(cfg)), **dict(table4(cfg)), ONLINE: ("student.targets=online",)}
    if label in rows:
        return rows[label]
    if m := VIEW_BUDGET.match(label):
        a = int(m.group(1))
        return (f"export.views={a}", f"student.views={a}", f"pipeline.cache_url={Path(root) / f'cache_A{a}.zarr'}")
    raise ConfigError(f"--rows: no row {label!r}; choose from {', '.join(rows)}, or 'CBD_ENS A=<views>'")


def with_references(cfg: Config, root: Path, labels: Sequence[str]) -> list[str]:
    """The rows and, first, every row one of them starts from (`students/@<label>`)."""
    out: list[str] = []

    def add(label: str) -> None:
        for item in row_sets(cfg, root, label):
            if item.startswith("student.init=" + REF):
                add(item.split("=", 1)[1][len(REF):])
        if label not in out:
            out.append(label)
    for label in labels:
        add(label)
    return out


@dataclass
class Replicate:
    """One (cell, replicate): its workdir, config and runs."""
    cell: Cell
    r: int
    wd: Workdir
    cfg: Config
    sets: tuple[str, ...]       # base + cell + replicate --set items
    runs: list[Run]             # one per row (and per row a row starts from)


def plan_replicate(source: str | Path, base: Sequence[str], cell: Cell, r: int, root: Path,
                   labels: Sequence[str]) -> Replicate:
    cfg0 = load_config(source, (*base, *cell.sets))
    sets = (*base, *cell.sets, *replicate_sets(cfg0, r))
    cfg = load_config(source, sets)
    wd = Workdir(root / "cells" / cell.folder / f"rep{r}")
    runs, names = [], {}
    for label in with_references(cfg, wd.root, labels):
        items = tuple(resolve(x, cfg.student.seed + r, names) for x in row_sets(cfg, wd.root, label))
        run = make_runs(source, sets, [(label, items)], [cfg.student.seed + r])[0]
        names[(label, cfg.student.seed + r)] = run.name
        runs.append(run)
    return Replicate(cell, r, wd, cfg, sets, runs)


def needs(source: str | Path, rep: Replicate) -> tuple[list[str], dict[str, tuple[Config, list[str]]]]:
    """The teachers the replicate's rows use, and per cache (its location) the config that exports it and
    the teachers it must hold."""
    teachers: list[str] = []
    caches: dict[str, tuple[Config, list[str]]] = {}
    for run in rep.runs:
        cfg = load_config(source, run.overrides)
        s = cfg.student
        used = cfg.student_teachers() if s.targets != "none" else []
        if s.init.startswith("teachers/"):
            used = [*used, s.init.split("/", 1)[1]]
        teachers += [t for t in used if t not in teachers]
        if s.targets in ("cache", "replay") or frozen_from_cache(s):
            where = str(run_workdir(rep.wd, cfg).cache)
            _, held = caches.setdefault(where, (cfg, []))
            held += [t for t in used if t not in held]
    order = [t.name for t in rep.cfg.teachers]
    return sorted(teachers, key=order.index), caches


def run_replicate(source: str | Path, rep: Replicate, runtime: Runtime, deadline: float | None, jobs: int) -> bool:
    """Prepare, teachers, exports, rows, NCM of one replicate; False when the deadline stopped it."""
    def late() -> bool:
        return deadline is not None and time.time() >= deadline
    pipeline.prepare_data(rep.cfg, rep.wd, runtime)
    teachers, caches = needs(source, rep)
    if teachers and not all(is_done(rep.wd.teacher_dir(t)) for t in teachers):
        if late():
            return False
        pipeline.train_teachers(rep.cfg, rep.wd, runtime, [rep.cfg.teacher_by_name(t) for t in teachers], jobs)
    for cfg, held in caches.values():
        if late():
            return False
        pipeline.export(cfg, run_workdir(rep.wd, cfg), runtime, teachers=held)
    first = [r for r in rep.runs if not any(o.startswith("student.init=students/") for o in r.overrides)]
    then = [r for r in rep.runs if r not in first]
    for phase in (first, then):
        if phase and not execute(phase, source, rep.wd, runtime, deadline, jobs=jobs):
            return False
    for run in rep.runs:
        if run.label in NCM_ROWS and is_done(rep.wd.student_dir(run.name)):
            ncm_report(load_config(source, run.overrides), rep.wd, runtime, f"students/{run.name}", "images")
    return True


def run_grid(cfg: Config, root: Path, runtime: Runtime, axes: Sequence[Axis], replicates: Sequence[int],
             rows: Sequence[str] = DEFAULT_ROWS, name: str = "grid", time_limit_min: float = 0,
             jobs: int = 1) -> tuple[dict[str, Any], bool]:
    """Run every cell x replicate (each skipping what is done), then write W/grids/<name>.{md,json}.

    Returns the table and whether every replicate finished. A replicate that fails stops the grid after
    the table is written from what finished (the same command retries it)."""
    deadline = time.time() + 60 * time_limit_min if time_limit_min > 0 else None
    source, base = cfg.source, tuple(cfg.overrides)
    with_references(cfg, root, rows)      # an unknown row is refused before anything runs
    grid = [plan_replicate(source, base, c, r, root, rows) for c in cells(source, base, axes) for r in replicates]
    command = grid_command(cfg, root, axes, replicates, rows, name)
    options = f"--jobs {jobs} --time-limit-min {time_limit_min:g}"
    (root / "grids").mkdir(parents=True, exist_ok=True)
    timing = Timing(root / "grids" / f"{name}_timing.json", {"options": options, "device": str(runtime.device)})
    log(f"[grid] {len(grid)} replicates ({len(grid) // len(replicates)} cells x {len(replicates)}) of "
        f"{len(rows)} rows, under {root / 'cells'}")
    started, complete, failed = time.perf_counter(), True, None
    for i, rep in enumerate(grid):
        if deadline is not None and time.time() >= deadline:
            complete = False
            break
        log(f"[grid] {i + 1}/{len(grid)}: {rep.cell.label}, replicate {rep.r} ({rep.wd.root})")
        try:
            with timing(f"{rep.cell.label}, replicate {rep.r}"):
                finished = run_replicate(source, rep, runtime, deadline, jobs)
            if not finished:
                complete = False
                break
        except JobsFailed as e:
            complete, failed = False, e
            break
        log(f"[grid] {i + 1}/{len(grid)} done; elapsed {format_seconds(time.perf_counter() - started)}")
        write_table(root / "grids", name, {**summarise(grid, rows, command), "timing_text": timing.chunks_text()})
    if not complete and failed is None:
        log("[grid] time limit reached; run the same command again to continue")
    timing.write()
    table = {**summarise(grid, rows, command), "timing": {"steps_s": timing.steps, "chunks": timing.chunks},
             "timing_text": timing.chunks_text()}
    write_table(root / "grids", name, table)
    plot_cbd_pays(heatmap_entries(table), root / "grids" / f"{name}.png", f"{cfg.pipeline.name}: when does CBD pay?")
    if failed is not None:
        raise JobsFailed(f"{failed}. The table {root / 'grids' / f'{name}.md'} has what finished; "
                         "the same command retries the rest")
    return table, complete


def grid_command(cfg: Config, root: Path, axes: Sequence[Axis], replicates: Sequence[int], rows: Sequence[str],
                 name: str) -> str:
    return " ".join(["cbd-cache grid", f"--pipeline {cfg.source}", f"--workdir {root}",
                     *[f"--set '{o}'" for o in cfg.overrides],
                     *[f"--axis {'+'.join(a.keys)}={','.join(a.values)}" for a in axes],
                     f"--replicates {','.join(map(str, replicates))}", f"--rows '{','.join(rows)}'", f"--name {name}"])


def replicate_record(rep: Replicate) -> dict[str, Any]:
    """Per row of one replicate: its run and, when finished, its report's metrics and NCM top-1."""
    out = {}
    for run in rep.runs:
        report = load_report(rep.wd, run)
        ncm_path = ncm_report_path(rep.wd.student_dir(run.name), "images")
        ncm = read_run_json(ncm_path) if run.label in NCM_ROWS and ncm_path.is_file() else None
        out[run.label] = {"run": str(rep.wd.student_dir(run.name)),
                          **({m: report.get(m) for m in (*METRICS, "ece")} if report else {}),
                          "ncm_top1": ncm.get("top1") if ncm else None}
    return out


def summarise(grid: Sequence[Replicate], rows: Sequence[str], command: str) -> dict[str, Any]:
    """The one table of the grid: per cell, each row's statistics over its replicates, CBD_ENS against the
    best non-CBD row, and the orderings the replicates show."""
    by_cell: dict[str, dict[str, Any]] = {}
    for rep in grid:
        cell = by_cell.setdefault(rep.cell.label, {"cell": rep.cell.label, "sets": list(rep.cell.sets),
                                                   "folder": rep.cell.folder, "replicates": {}})
        cell["replicates"][str(rep.r)] = replicate_record(rep)
    out = []
    for cell in by_cell.values():
        reps = list(cell["replicates"].values())
        cell["rows"] = {label: {**{m: stats([x[label][m] for x in reps if x[label].get(m) is not None])
                                   for m in (*METRICS, "ece", "ncm_top1")}, "of": len(reps)}
                        for label in rows}
        cell["cbd_pays"] = cbd_pays(reps, rows)
        cell["orderings"] = orderings(reps, rows)
        out.append(cell)
    return {"command": command, "rows": list(rows), "cells": out}


def cbd_pays(reps: Sequence[dict[str, Any]], rows: Sequence[str]) -> dict[str, Any] | None:
    """CBD_ENS minus the best non-CBD row (best by its mean over the replicates where both finished):
    mean ± std of the per-replicate differences, and in how many replicates CBD_ENS is ahead."""
    baselines = [r for r in rows if r not in DISTILLED and not r.startswith(ENSEMBLE)]
    if ENSEMBLE not in rows or not baselines:
        return None
    done = [x for x in reps if x[ENSEMBLE].get("top1") is not None and all(x[b].get("top1") is not None
                                                                              for b in baselines)]
    if not done:
        return {"best": None, "diff": stats([]), "ahead": 0, "of": 0}
    best = max(baselines, key=lambda b: sum(x[b]["top1"] for x in done))
    diffs = [x[ENSEMBLE]["top1"] - x[best]["top1"] for x in done]
    return {"best": best, "diff": stats(diffs), "ahead": sum(d > 0 for d in diffs), "of": len(done)}


def orderings(reps: Sequence[dict[str, Any]], rows: Sequence[str]) -> list[dict[str, Any]]:
    """Each ordering of the rows by top-1 (high to low) and how many finished replicates show it."""
    counts: dict[str, int] = {}
    for x in reps:
        if all(x[r].get("top1") is not None for r in rows):
            key = " > ".join(sorted(rows, key=lambda r: -x[r]["top1"]))
            counts[key] = counts.get(key, 0) + 1
    return [{"ordering": k, "replicates": v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]


def write_table(folder: Path, name: str, table: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{name}.json", table)
    (folder / f"{name}.md").write_text(markdown(table))


def markdown(table: dict[str, Any]) -> str:
    """The cells x rows table, CBD_ENS against the best non-CBD row, and the orderings."""
    body = [[c["cell"], label, *(pm(row[m]) for m in (*METRICS, "ece", "ncm_top1")), f"{row['top1']['n']} of {row['of']}"]
            for c in table["cells"] for label, row in c["rows"].items()]
    text = f"# Grid\n\n`{table['command']}`\n\n{table.get('timing_text', '')}\n\n"
    text += "Top-1 on the held-out split, mean ± std over replicates (fresh draws).\n\n"
    text += markdown_table(["cell", "row", "top-1", "many", "medium", "few", "ECE", "NCM", "replicates"], body)
    pays = [[c["cell"], c["cbd_pays"]["best"] or "-", pm(c["cbd_pays"]["diff"]),
             f"{c['cbd_pays']['ahead']} of {c['cbd_pays']['of']}"] for c in table["cells"] if c["cbd_pays"]]
    if pays:
        text += ("\n\n## CBD_ENS against the best non-CBD row\n\nThe best row by its mean top-1; the difference is "
                 "per replicate.\n\n")
        text += markdown_table(["cell", "best non-CBD row", "CBD_ENS minus it", "CBD_ENS ahead"], pays)
    order = [[c["cell"], o["ordering"], str(o["replicates"])] for c in table["cells"] for o in c["orderings"]]
    if order:
        text += "\n\n## Orderings\n\n" + markdown_table(["cell", "top-1, high to low", "replicates"], order)
    return text + "\n"
