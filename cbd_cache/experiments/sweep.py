"""`cbd-cache sweep`: a grid of student settings x seeds, against one prepared dataset and one cache.

Every run is an ordinary second-stage run (`pipeline.train_student`) under `W/students/<run>`, named by the
student settings that differ from the pipeline file's (`runs.student_run_name`); so a run is trained once
whichever sweep (or table) asks for it, and a finished run is skipped when a sweep is re-run. Only
`student.*` keys may vary: the teachers and the export are never touched, they must already exist
(a table may point some runs at a second cache with `pipeline.cache_url`, see `paper_table.py`).
The table gives mean ± std (sample std over seeds) per grid point, as Markdown and JSON.
With `jobs` > 1 the runs train side by side, one `cbd-cache train-student` process each
(`jobs.run_parallel`), with their output in `W/sweeps/logs/<run>.log`. Either way a failed run does
not stop the others, the table is written from those that finished, and the next sweep retries only it.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cbd_cache.config import Config, load_config
from cbd_cache.data.longtail import SHOT_GROUPS
from cbd_cache.errors import ConfigError, JobsFailed, exit_line, one_line
from cbd_cache.pipeline import train_student
from cbd_cache.stages.student import plan_student
from cbd_cache.system import distributed
from cbd_cache.system.jobs import gpus_for, run_parallel
from cbd_cache.system.logs import format_seconds, log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import write_json
from cbd_cache.system.tables import markdown_table, pm
from cbd_cache.train.runs import is_done, student_run_name
from cbd_cache.workdir import EVAL_JSON, Workdir, read_run_json

METRICS = ("top1", *SHOT_GROUPS)


@dataclass(frozen=True)
class Run:
    label: str                     # the grid point (or method) this run is a seed of
    seed: int
    name: str                      # its folder under W/students
    overrides: tuple[str, ...]     # every --set it is trained with, student.name last


def split_values(text: str) -> list[str]:
    """'0,0.2,[std0,aug0]' -> ['0', '0.2', '[std0,aug0]']: commas inside brackets belong to a list value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`--grid student.alpha=0,0.2` items -> [(key, [value texts])]; only student settings may vary."""
    grid = []
    for item in items:
        key, _, text = item.partition("=")
        key = key.strip()
        if not text or not key:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,..., for example student.alpha=0,0.2,0.4")
        if not key.startswith("student.") or key in ("student.seed", "student.name"):
            raise ConfigError(f"--grid {key}: a sweep varies student settings only (seeds with --seeds; teachers "
                              "and export are fixed for one cache)")
        values = split_values(text)
        if any(not v for v in values):
            raise ConfigError(f"--grid {item!r}: empty value")
        grid.append((key, values))
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers, for example 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give one or more distinct seeds")
    return seeds


def grid_points(grid: list[tuple[str, list[str]]]) -> list[tuple[str, tuple[str, ...]]]:
    """Every combination as (label, --set items), in the order the grid was given."""
    keys = [k for k, _ in grid]
    points = []
    for values in itertools.product(*[v for _, v in grid]):
        label = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in zip(keys, values))
        points.append((label or "default", tuple(f"{k}={v}" for k, v in zip(keys, values))))
    return points


def make_runs(pipeline: str | Path, base: Sequence[str], points: Sequence[tuple[str, Sequence[str]]],
              seeds: Sequence[int]) -> list[Run]:
    """Each (label, --set items) x seed as a Run, every config loaded and validated before anything trains."""
    runs = []
    for label, sets in points:
        for seed in seeds:
            overrides = [*base, *sets, f"student.seed={seed}"]
            name = student_run_name(load_config(pipeline, overrides))
            runs.append(Run(label, seed, name, (*overrides, f"student.name={name}")))
    return runs


def unique(runs: Sequence[Run]) -> list[Run]:
    seen, out = set(), []
    for r in runs:
        if r.name not in seen:
            seen.add(r.name)
            out.append(r)
    return out


def execute(runs: Sequence[Run], pipeline: str | Path, wd: Workdir, runtime: Runtime,
            deadline: float | None = None, on_trained=None, jobs: int = 1) -> bool:
    """Train every run not yet finished, in order (each name once), `jobs` at a time. Returns False if
    `deadline` stopped it; raises JobsFailed (after the others finish) if a run failed.

    Every run is planned first (cache, teachers and init checked), so a bad run fails before any trains.
    """
    todo = []
    for r in unique(runs):
        cfg = load_config(pipeline, r.overrides)
        plan = plan_student(cfg, run_workdir(wd, cfg))
        if not is_done(plan.folder, plan.identity):
            todo.append((r, cfg, plan))
    total = len(unique(runs))
    log(f"[sweep] {total} runs: {total - len(todo)} finished, {len(todo)} to train")
    if jobs > 1 and len(todo) > 1:
        return execute_parallel([r for r, _, _ in todo], pipeline, wd, jobs, gpus_for(todo[0][1].pipeline.device),
                                deadline, on_trained)
    started, failed = time.perf_counter(), []
    for i, (r, cfg, plan) in enumerate(todo):
        if deadline is not None and time.time() >= deadline:
            log(f"[sweep] time limit reached: {len(todo) - i} runs left; run the same command again to continue")
            complete = False
            break
        t0 = time.perf_counter()
        try:
            train_student(cfg, run_workdir(wd, cfg), runtime, plan)
        except Exception as e:     # as under --jobs J: a failed run stops no other (Ctrl-C / SIGTERM still do)
            failed.append(failure(wd, r, e))
            log(f"[sweep] {i + 1}/{len(todo)} failed ({r.name}): {failed[-1]}")
            continue
        if on_trained is not None:
            on_trained(r, time.perf_counter() - t0)
        log(f"[sweep] {i + 1}/{len(todo)} trained ({r.name}); elapsed {format_seconds(time.perf_counter() - started)}")
    else:
        complete = True
    if failed:
        raise JobsFailed(f"{len(failed)} of {len(todo)} runs failed: {'; '.join(failed)}")
    return complete


def failure(wd: Workdir, run: Run, e: Exception) -> str:
    """What a failed run's line says: its one error line, or, for a bug, where its traceback went (its log)."""
    line = exit_line(e, "train-student")
    if line is not None:
        return f"`{run.name}`: {line[0]}"
    path = log_path(wd, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(traceback.format_exc())
    return f"`{run.name}`: {type(e).__name__}: {one_line(e)}; traceback in {path}"


def log_path(wd: Workdir, run: Run) -> Path:
    return wd.root / "sweeps" / "logs" / f"{run.name}.log"


def execute_parallel(todo: Sequence[Run], pipeline: str | Path, wd: Workdir, jobs: int, gpus: int,
                     deadline: float | None, on_trained) -> bool:
    """One `cbd-cache train-student` process per run, `jobs` at a time, each logging to `log_path`."""
    if distributed.from_env().world > 1:
        raise ConfigError("--jobs trains one run per process; under torchrun train them one after another")
    commands = [[sys.executable, "-m", "cli", "train-student", "--pipeline", str(pipeline), "--workdir", str(wd.root),
                 *[x for o in r.overrides for x in ("--set", o)]] for r in todo]
    log(f"[sweep] training {len(todo)} runs {jobs} at a time, one process each; logs in {wd.root / 'sweeps' / 'logs'}")
    started, finished = time.perf_counter(), [0]

    def done(i: int, seconds: float) -> None:
        finished[0] += 1
        if on_trained is not None:
            on_trained(todo[i], seconds)
        log(f"[sweep] {finished[0]}/{len(todo)} trained ({todo[i].name}); "
            f"elapsed {format_seconds(time.perf_counter() - started)}")
    complete = run_parallel(commands, jobs, gpus, [log_path(wd, r) for r in todo], deadline, done)
    if not complete:
        log("[sweep] time limit reached: runs left; run the same command again to continue")
    return complete


def run_workdir(wd: Workdir, cfg: Config) -> Workdir:
    """The workdir as the run sees it: a run may name its own cache (`pipeline.cache_url`), e.g. another allocation's."""
    return dataclasses.replace(wd, data_url=cfg.pipeline.data_url or wd.data_url,
                               cache_url=cfg.pipeline.cache_url or wd.cache_url)


def load_report(wd: Workdir, run: Run) -> dict[str, Any] | None:
    path = wd.student_dir(run.name) / EVAL_JSON
    return read_run_json(path) if path.is_file() else None


def summarise(runs: Sequence[Run], wd: Workdir) -> list[dict[str, Any]]:
    """Per label (in first-seen order): mean, sample std and values of each metric over its seeds.

    A label with a missing run gets `complete: false` and statistics over the runs that exist.
    """
    rows: dict[str, dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault(r.label, {"label": r.label, "runs": [], "seeds": [], "reports": []})
        row["runs"].append(r.name)
        row["seeds"].append(r.seed)
        row["reports"].append(load_report(wd, r))
    out = []
    for row in rows.values():
        reports = [rep for rep in row.pop("reports") if rep is not None]
        row["complete"] = len(reports) == len(row["runs"])
        for m in (*METRICS, "ece"):
            values = [rep[m] for rep in reports if rep.get(m) is not None]
            row[m] = stats(values)
        row["taus"] = [rep["selection"]["tau"] for rep in reports if "selection" in rep]   # chosen on val
        per_class = [rep["per_class"] for rep in reports]
        row["per_class"] = np.mean(np.array(per_class, dtype=float), axis=0).round(3).tolist() if per_class else None
        row["train_counts"] = reports[0]["train_counts"] if reports else None
        out.append(row)
    return out


def stats(values: Sequence[float]) -> dict[str, Any]:
    """mean and sample standard deviation (ddof 1; 0 for one value), None when empty."""
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "n": len(values), "values": [round(v, 3) for v in values]}


def seeds_text(row: dict[str, Any]) -> str:
    """How many seeds a row's statistics cover, 'k of n' while some are missing."""
    return f"{row['top1']['n']}" + ("" if row["complete"] else f" of {len(row['runs'])}")


def markdown(rows: Sequence[dict[str, Any]], header: str = "setting") -> str:
    return markdown_table([header, "top-1", "many", "medium", "few", "ECE", "seeds"],
                          ([r["label"], *(pm(r[m]) for m in (*METRICS, "ece")), seeds_text(r)] for r in rows))


def run_sweep(cfg: Config, wd: Workdir, runtime: Runtime, grid: list[tuple[str, list[str]]], seeds: Sequence[int],
              name: str = "", jobs: int = 1) -> tuple[list[dict[str, Any]], Path]:
    """Train the grid x seeds (skipping finished runs), then write W/sweeps/<name>.{md,json}.

    If runs failed, the table is written from those that finished before JobsFailed is raised.
    """
    runs = make_runs(cfg.source, cfg.overrides, grid_points(grid), seeds)
    failed = None
    try:
        execute(runs, cfg.source, wd, runtime, jobs=jobs)
    except JobsFailed as e:
        failed = e
    rows = summarise(runs, wd)
    if not name:
        name = "_".join(["sweep", *[k.split(".", 1)[1] for k, _ in grid]])
    folder = wd.root / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    command = " ".join(["cbd-cache sweep", f"--pipeline {cfg.source}", f"--workdir {wd.root}",
                        *[f"--set {o}" for o in cfg.overrides],
                        *[f"--grid {k}={','.join(v)}" for k, v in grid], f"--seeds {','.join(map(str, seeds))}"])
    md = f"# Sweep {name}\n\n`{command}`\n\n" + markdown(rows)
    (folder / f"{name}.md").write_text(md)
    write_json(folder / f"{name}.json", {"command": command, "grid": grid, "seeds": list(seeds), "rows": rows})
    if failed is not None:
        raise JobsFailed(f"{failed}. The table {folder / f'{name}.md'} has the runs that finished; "
                         "the same command retries only the failed ones")
    return rows, folder / f"{name}.md"
