"""The stage order and its safeguards, in one place: `run`, each stage's command, `paper-table`, the sweeps
and the test fixtures all reach the stages through here.

    prepare  -> rank 0, under the data folder's lock (a remote `pipeline.data_url` is prepared locally, then
                uploaded); the others wait
    teachers -> each under its run folder's lock (rank 0's), or J at a time in processes of their own
    export   -> under a lock per teacher group it writes (rank 0's, a local cache's): one job per teacher, so
                exports of different teachers may fill one cache at once
    student  -> planned once (a refused config writes nothing), then trained under its run folder's lock
                by the method the config picks: cRT / LWS, post-hoc rebalancing, online or replayed targets,
                or cached targets
    evaluate -> rank 0

Under torchrun every stage ends at a barrier, so no rank reads what rank 0 has not finished writing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

from cbd_cache.cache.store import open_group, teacher_folders
from cbd_cache.cache.writer import remove_group
from cbd_cache.config import Config, TeacherCfg
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.prepare import prepare
from cbd_cache.errors import CacheError, ConfigError
from cbd_cache.stages import crt, online, rebalance, student
from cbd_cache.stages.evaluate import evaluate_workdir
from cbd_cache.stages.export import export_cache, export_names
from cbd_cache.stages.teachers import train_teacher
from cbd_cache.system import distributed
from cbd_cache.system.jobs import gpus_for, run_parallel
from cbd_cache.system.locks import hold
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import is_url, upload
from cbd_cache.workdir import Workdir, cache_lock, data_lock, run_lock


def prepare_data(cfg: Config, wd: Workdir, runtime: Runtime) -> Manifest:
    """Rank 0 prepares; with a remote `pipeline.data_url` it prepares W/data, then uploads it there."""
    if runtime.dist.main:
        local = dataclasses.replace(wd, data_url="") if is_url(wd.data) else wd
        lock = data_lock(local.data)
        fresh = not lock.parent.exists()
        try:
            with hold(lock, str(local.data)):   # two prepares at once: the second is refused
                prepare(cfg, local)
                if local is not wd:
                    log(f"[prepare] uploading {local.data} to {wd.data}")
                    upload(local.data, wd.data)
        except BaseException:
            if fresh:    # a prepare refused before it wrote anything leaves no workdir behind
                lock.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    lock.parent.rmdir()
            raise
    distributed.barrier()
    return Manifest.load(wd.manifest)


def rank0_lock(lock: Path, what: str, runtime: Runtime):
    """The lock of one writer, held by rank 0 (the others write nothing there)."""
    return hold(lock, what) if runtime.dist.main else nullcontext()


def train_teachers(cfg: Config, wd: Workdir, runtime: Runtime, teachers: list[TeacherCfg] | None = None,
                   jobs: int = 1) -> None:
    """Stage 1, every teacher (or `teachers`) in turn, or `jobs` at a time in processes of their own."""
    teachers = cfg.teachers if teachers is None else teachers
    if jobs > 1 and len(teachers) > 1:
        return train_teachers_in_parallel(cfg, wd, [t.name for t in teachers], jobs)
    for t in teachers:
        with rank0_lock(run_lock(wd.teacher_dir(t.name)), f"teachers/{t.name}", runtime):
            train_teacher(cfg, t, wd, runtime)
        distributed.barrier()   # rank 0 has written the teacher before anyone reads it


def train_teachers_in_parallel(cfg: Config, wd: Workdir, names: list[str], jobs: int) -> None:
    """One `cbd-cache train-teacher --name N` process per teacher, `jobs` at a time."""
    if distributed.from_env().world > 1:
        raise ConfigError("--jobs trains one teacher per process; under torchrun train them one after another")
    common = ["train-teacher", "--pipeline", cfg.source, "--workdir", str(wd.root),
              *[x for o in cfg.overrides for x in ("--set", o)]]
    run_parallel([[sys.executable, "-m", "cli", *common, "--name", n] for n in names], jobs,
                 gpus_for(cfg.pipeline.device))


def export(cfg: Config, wd: Workdir, runtime: Runtime, repair: bool = False, teachers: list[str] | tuple = (),
           replace: list[str] | tuple = ()) -> None:
    """The cache's `teachers` (all by default), each group under its own lock: one exporting job per teacher."""
    names = export_names(cfg, teachers, replace)
    with ExitStack() as locks:
        if not is_url(wd.cache):
            for name in names:
                locks.enter_context(rank0_lock(cache_lock(Path(wd.cache), f"teacher-{name}"),
                                               f"teacher {name} of {wd.cache}", runtime))
        export_cache(cfg, wd, runtime, repair, names, replace)
    distributed.barrier()


def drop_teacher(wd: Workdir, name: str) -> None:
    """`cache drop`: teacher `name`'s group leaves the cache at once (under its lock); the rest is untouched."""
    open_group(wd.cache)    # a cache of this schema, its provenance intact
    folders = teacher_folders(wd.cache)
    if name not in folders:
        raise CacheError(f"{wd.cache} holds no teacher {name!r}; it holds {folders}")
    with nullcontext() if is_url(wd.cache) else hold(cache_lock(Path(wd.cache), f"teacher-{name}"),
                                                      f"teacher {name} of {wd.cache}"):
        remove_group(wd.cache, name)
    log(f"[cache] dropped teacher {name} from {wd.cache}; a student that names it is refused until "
        "`cbd-cache export` adds it again")


def train_student(cfg: Config, wd: Workdir, runtime: Runtime, plan: student.StudentPlan | None = None) -> Path:
    """Stage 2 by the method the config picks, planned once (here, unless the caller planned it)."""
    plan = plan or student.plan_student(cfg, wd)
    with rank0_lock(run_lock(plan.folder), f"students/{plan.name}", runtime):
        if cfg.student.classifier_only or cfg.student.rebalance == "lws":   # a classifier on frozen features
            ckpt = crt.train_frozen_classifier(cfg, wd, runtime, plan)
        elif cfg.student.rebalance != "none":                                # post-hoc: tau-norm, logit adjustment
            ckpt = rebalance.train_posthoc(cfg, wd, runtime, plan)
        elif cfg.student.targets in ("online", "replay"):   # the teachers run: on fresh views, or on the cache's
            ckpt = online.train_online(cfg, wd, runtime, plan)
        else:
            ckpt = student.train_student(cfg, wd, runtime, plan)
    distributed.barrier()
    return ckpt


def evaluate(cfg: Config, wd: Workdir, runtime: Runtime) -> list[dict[str, Any]]:
    """Every teacher and student of the workdir, on rank 0 (the others get no rows)."""
    rows = evaluate_workdir(cfg, wd, runtime) if runtime.dist.main else []
    distributed.barrier()
    return rows


def run(cfg: Config, wd: Workdir, runtime: Runtime) -> list[dict[str, Any]]:
    """Every stage in order, each skipping what is already done."""
    prepare_data(cfg, wd, runtime)
    train_teachers(cfg, wd, runtime)
    export(cfg, wd, runtime)
    train_student(cfg, wd, runtime)
    return evaluate(cfg, wd, runtime)
