"""`cbd-cache paper-table` (`make paper-table`): the paper's protocol on one prepared dataset and one cache.

Table 2 (single-stage baselines, fine-tuning, cRT, CBD, CBD_ENS), Table 3 (NCM), Figure 3 (alpha for
feature / logit / hybrid distillation), Table 1 (teacher mix), the view study (accuracy against the
view budget A for both allocations, next to the online mode, with the fidelity runs), Table 4 (the
field's baselines), the control experiments and the upper bound (its extractor trains on the
source's whole balanced training set, prepared into W/data_full), Figures 1 and 4 (from NCM's
feature pass), calibration, and per-class accuracy, each over `SEEDS`. One export with A = 16 views and teacher logits serves every row of
its allocation: view a does not depend on A, so `student.views = V` is exactly an A = V export, and
the default A = 8 is `student.views = 8`. Table 1's fifth teacher is added to that one cache (a
teacher group of its own: the other teachers are not run again). The view study's other allocation
gets its own A = 16 export, `W/cache_<allocation>.zarr`. Every run is a `sweep` run: re-running skips finished runs,
`--time-limit-min` stops between runs so the work can be done in chunks, and `--sections` trains
only some sections.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from cbd_cache import pipeline
from cbd_cache.config import Config, load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import JobsFailed
from cbd_cache.experiments.paper_design import (
    BASE,
    FIGURE_MODELS,
    NCM_METHODS,
    SEEDS,
    UPPER_EXTRACTOR,
    all_runs,
    export_steps,
    fifth_teacher,
    needs_student,
    stage1,
    training_order,
    upper_bound_sets,
)
from cbd_cache.experiments.paper_report import Timing, write_paper_table
from cbd_cache.experiments.sweep import METRICS, Run, execute, run_workdir, stats
from cbd_cache.stages.evaluate import evaluate_checkpoint
from cbd_cache.stages.ncm import ncm_report
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.runs import is_done
from cbd_cache.workdir import RECORD, Workdir, read_run_json


def paper_table(cfg: Config, wd: Workdir, runtime: Runtime, out: Path, time_limit_min: float = 0,
                jobs: int = 1, only: Sequence[str] = ()) -> bool:
    """Prepare, teachers, exports, every run (of the sections `only`, or all; `jobs` at a time), NCM; then the
    Markdown, JSON and PNGs in `out`.

    True when complete. If parallel runs failed, the table is written from the others before JobsFailed is raised.
    """
    deadline = time.time() + 60 * time_limit_min if time_limit_min > 0 else None
    source, base = cfg.source, (*BASE, *fifth_teacher(cfg), *cfg.overrides)
    base_cfg = load_config(source, base)
    options = f"--jobs {jobs} --time-limit-min {time_limit_min:g}" + (f" --sections {','.join(only)}" if only else "")
    timing = Timing(wd.root / "paper_table_timing.json", {"options": options, "device": str(runtime.device)})
    with timing("prepare"):
        pipeline.prepare_data(base_cfg, wd, runtime)
    # stage 1: one teacher at a time, or all `jobs` at a time (one process each; timed together, as wall)
    groups = [list(base_cfg.teachers)] if jobs > 1 else [[t] for t in base_cfg.teachers]
    for group in groups:
        if deadline is not None and time.time() >= deadline:
            log("[paper-table] time limit reached; run the same command again to continue")
            return False
        with timing("teacher " + ", ".join(t.name for t in group) + (f" ({jobs} at a time)" if jobs > 1 else "")):
            pipeline.train_teachers(base_cfg, wd, runtime, group, jobs)
    runs = all_runs(base_cfg, base, wd.root)
    chosen = {k: rs for k, rs in runs.items() if not only or k in only}
    for step in export_steps(base_cfg, wd.root, [t.name for t in cfg.teachers], list(chosen)):
        step_cfg = load_config(source, (*base, *step.sets))
        with timing(step.label):
            pipeline.export(step_cfg, run_workdir(wd, step_cfg), runtime, teachers=list(step.teachers))
    if "controls" in chosen and (full := upper_bound_sets(base_cfg, wd.root)) is not None:
        full_cfg = load_config(source, (*base, *full))
        with timing("prepare full"):
            pipeline.prepare_data(full_cfg, run_workdir(wd, full_cfg), runtime)
    failed, order = None, training_order(chosen)
    try:   # the runs that start from another student's model train once those exist
        complete = all(execute(phase, source, wd, runtime, deadline, jobs=jobs,
                               on_trained=lambda r, s: timing.record(f"student {r.name}", s))
                       for phase in ([r for r in order if not needs_student(r)], [r for r in order if needs_student(r)]))
    except JobsFailed as e:
        complete, failed = False, e
    for r in [r for r in chosen.get("controls", []) if r.label == UPPER_EXTRACTOR]:
        if is_done(folder := wd.student_dir(r.name)):   # trained on the full set: its report, on this one's groups
            evaluate_checkpoint(folder, r.name, read_run_json(folder / RECORD)["kind"], Manifest.load(wd.manifest),
                                base_cfg, runtime)
    ncm = ncm_rows(base_cfg, wd, runtime, runs, timing) if "table2" in chosen else []   # on the models finished so far
    timing.write()   # this invocation's wall, up to the report
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
        for r in [r for r in mine if is_done(wd.student_dir(r.name))]:
            keep = method in FIGURE_MODELS and r.seed == SEEDS[0]     # Figures 1 and 4 are drawn from this pass
            with timing(f"ncm students/{r.name} images"):
                reps.append(ncm_report(cfg, wd, runtime, f"students/{r.name}", "images", keep_features=keep))
        rows.append({"label": method, "runs": [f"students/{r.name}" for r in mine], "complete": len(reps) == len(mine),
                     **{m: stats([x[m] for x in reps if x[m] is not None]) for m in METRICS}})
    return rows
