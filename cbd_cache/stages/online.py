"""Stage 2 with the teachers running (eval mode) on every batch, instead of reading targets from the cache.

targets = "online": on the student's freshly drawn views, the reference the cache is measured against.
targets = "replay": on the views the cache stores, walked as a cached student walks them: a fidelity
check of the stored targets (it must train like targets = "cache", up to float16 rounding).
Same student, stream and loss as `student.py`; only where the targets come from differs.
"""
from __future__ import annotations

from pathlib import Path

from cbd_cache.config import Config
from cbd_cache.stages.export import load_teachers
from cbd_cache.stages.student import StudentPlan, already_done, train_network
from cbd_cache.system.runtime import Runtime
from cbd_cache.train.steps import online_step
from cbd_cache.workdir import Workdir


def train_online(cfg: Config, wd: Workdir, runtime: Runtime, plan: StudentPlan) -> Path:
    if already_done(plan):
        return plan.checkpoint
    teachers = [runtime.prepare_teacher(n) for n in load_teachers(cfg, wd, plan.teachers)[0]]
    return train_network(cfg, wd, runtime, plan, online_step(runtime, cfg.student, teachers))
