"""Stage 2 with the teachers running (eval mode) on every batch, instead of reading targets from the cache.

targets = "online": on the student's freshly drawn views, the reference the cache is measured against.
targets = "replay": on the views the cache stores, walked as a cached student walks them: a fidelity
check of the stored targets (it must train like targets = "cache", up to float16 rounding).
Same student, stream and loss as `student.py`; only where the targets come from differs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, StudentCfg
from .engine import LossFn
from .export import load_teachers
from .losses import distillation_loss, teacher_target
from .runtime import Runtime
from .student import finished, plan_student, train_network
from .workdir import Workdir


def online_step(runtime: Runtime, s: StudentCfg, teachers: list[torch.nn.Module]) -> LossFn:
    """The distillation step with targets (and logits) from the teachers on the batch's own images."""
    features, logits_too = s.distill != "logit", s.distill != "feature"

    def step(model: torch.nn.Module, batch: tuple):
        x, y = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        targets = teacher_logits = None
        with torch.no_grad():
            vs = [t.features(x) for t in teachers]
            if features:
                targets = torch.cat([teacher_target(v) for v in vs], dim=1)
            if logits_too:
                teacher_logits = torch.cat([t.classifier(t.projection(v)).float() for t, v in zip(teachers, vs)], dim=1)
        logits, e = model(x)
        return distillation_loss(logits, y, e, targets, teacher_logits, s.alpha, s.beta, s.temperature, s.distill)
    return step


def train_online(cfg: Config, wd: Workdir, runtime: Runtime) -> Path:
    plan = plan_student(cfg, wd)
    if finished(plan):
        return plan.folder / "checkpoint.pt"
    teachers = [runtime.prepare_teacher(n) for n in load_teachers(cfg, wd, plan.teachers)[0]]
    return train_network(cfg, wd, runtime, plan, online_step(runtime, cfg.student, teachers))
