"""Stage 2's entry: the one place that picks a second-stage trainer for a config.

cRT (`student.classifier_only`) -> crt.py; online or replayed targets -> online.py; cached targets or
cross-entropy only -> student.py. The CLI's train-student, `run` and the sweeps all go through here.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from cbd_cache.config import Config
from cbd_cache.stages import crt, online, student
from cbd_cache.system.locks import hold, run_lock
from cbd_cache.system.runtime import Runtime
from cbd_cache.workdir import Workdir


def train(cfg: Config, wd: Workdir, runtime: Runtime) -> Path:
    """Planned first (a refused config writes nothing), then trained under the run folder's lock (rank 0's),
    so two processes never train one run at once."""
    folder = student.plan_student(cfg, wd).folder
    lock = hold(run_lock(folder), f"students/{folder.name}") if runtime.dist.main else nullcontext()
    with lock:
        if cfg.student.classifier_only:
            return crt.train_crt(cfg, wd, runtime)
        if cfg.student.targets in ("online", "replay"):   # the teachers run: on fresh views, or on the cache's
            return online.train_online(cfg, wd, runtime)
        return student.train_student(cfg, wd, runtime)
