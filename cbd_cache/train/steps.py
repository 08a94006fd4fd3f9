"""The step functions `fit` trains with: (model, batch) -> (loss, {term: value}), one per method.

Cross-entropy (teachers, single-stage baselines, fine-tuning, Balanced Softmax), cached distillation (the
student: targets from the batch), online distillation (targets from teacher networks it is handed) and the
classifier step of cRT and LWS on cached descriptors (descriptors in, no backbone).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cbd_cache.config import StudentCfg
from cbd_cache.models.losses import balanced_softmax_loss, distillation_loss, normalize_per_teacher, teacher_target
from cbd_cache.system.runtime import Runtime

# loss_fn(model, batch) -> (loss, {name: detached scalar tensor}); batch as TrainStream collates it
LossFn = Callable[[torch.nn.Module, tuple], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def cross_entropy_step(runtime: Runtime, prior_log: torch.Tensor | None = None) -> LossFn:
    """Plain cross-entropy on the batch: teachers, the single-stage and fine-tuning baselines, and cRT / LWS on
    frozen features; with `prior_log` (`losses.log_prior`), Balanced Softmax."""
    def step(model: torch.nn.Module, batch: tuple):
        x, y = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        logits, _ = model(x)
        ce = F.cross_entropy(logits.float(), y) if prior_log is None else balanced_softmax_loss(logits, y, prior_log)
        return ce, {"ce": ce.detach()}
    return step


def distillation_step(runtime: Runtime, dims: list[int], s: StudentCfg) -> LossFn:
    """The cached distillation step: the batch carries each view's stored targets (and logits)."""
    features, logits_too = s.distill != "logit", s.distill != "feature"

    def step(model: torch.nn.Module, batch: tuple):
        x, y = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        targets = normalize_per_teacher(batch[4].to(runtime.device, non_blocking=True), dims) if features else None
        teacher_logits = batch[5].to(runtime.device, non_blocking=True) if logits_too else None
        logits, e = model(x)
        return distillation_loss(logits, y, e, targets, teacher_logits, s.alpha, s.beta, s.temperature, s.distill)
    return step


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


def classifier_step(runtime: Runtime):
    def step(model: torch.nn.Module, batch: tuple):
        v, y = batch[0].to(runtime.device, non_blocking=True).float(), batch[1].to(runtime.device, non_blocking=True)
        ce = F.cross_entropy(model(v).float(), y)
        return ce, {"ce": ce.detach()}
    return step
