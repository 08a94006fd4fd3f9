"""Losses as pure functions of tensors.

Feature distillation (paper Eq. 2; Eq. 4 with K teachers, targets concatenated):
    L = (1 - alpha) * CE(z, y) + alpha * beta * (1 - cos(e, t))
where e = h(v) is the student's (projected) descriptor and t the concatenation of the K teachers'
L2-normalised descriptors of the same view.

Classifier-level (logit) distillation (Eq. 3), temperature T; with K teachers the target is the
mean of their softened distributions:
    L = (1 - alpha) * CE(z, y) + alpha * T^2 * KL(p_t || softmax(z / T)),  p_t = mean_k softmax(z_k / T)
Hybrid adds both distillation terms under the one alpha:
    L = (1 - alpha) * CE(z, y) + alpha * (beta * (1 - cos(e, t)) + T^2 * KL(p_t || softmax(z / T)))

Balanced Softmax (Ren et al. 2020; Menon et al.'s logit-adjusted loss at tau = 1), a single-stage loss:
    L = CE(z + log pi, y),  pi the training class prior; the model predicts with z alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cbd_cache.config import DISTILL


def teacher_target(v: torch.Tensor) -> torch.Tensor:
    """A teacher's target for one view: its pooled descriptor v, L2-normalised, in float32.

    The one definition: export stores it, `cache verify` recomputes it, the online student computes it each step.
    """
    return F.normalize(v.float(), dim=1)


def normalize_per_teacher(targets: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """L2-normalise each teacher's slice of the concatenated target (float32), undoing float16 rounding."""
    parts = torch.split(targets.float(), dims, dim=1)
    return torch.cat([F.normalize(p, dim=1) for p in parts], dim=1)


def cosine_distance(e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(e, t)."""
    return (1.0 - F.cosine_similarity(e.float(), t.float(), dim=1)).mean()


def logit_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_t || softmax(z / T)), batch mean; teacher_logits is (B, K*C), K teachers side by side."""
    num_classes = logits.shape[1]
    t = teacher_logits.float().reshape(len(teacher_logits), -1, num_classes)
    p_teacher = F.softmax(t / temperature, dim=2).mean(dim=1)
    log_p_student = F.log_softmax(logits.float() / temperature, dim=1)
    return temperature ** 2 * F.kl_div(log_p_student, p_teacher, reduction="batchmean")


def cbd_loss(logits: torch.Tensor, labels: torch.Tensor, e: torch.Tensor, targets: torch.Tensor,
             alpha: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * CE + alpha * beta * (1 - cos(e, targets)); returns the loss and its two terms."""
    ce = F.cross_entropy(logits.float(), labels)
    distill = cosine_distance(e, targets)
    return (1.0 - alpha) * ce + alpha * beta * distill, {"ce": ce.detach(), "distill": distill.detach()}


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, e: torch.Tensor, targets: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None, alpha: float, beta: float, temperature: float,
                      distill: str = "feature") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Feature (Eq. 2/4), logit (Eq. 3) or hybrid distillation; returns the loss and its terms."""
    if distill == "feature":
        return cbd_loss(logits, labels, e, targets, alpha, beta)
    if distill not in DISTILL:
        raise ValueError(f"unknown distillation {distill!r}; expected one of {DISTILL}")
    ce = F.cross_entropy(logits.float(), labels)
    kd = logit_kd(logits, teacher_logits, temperature)
    stats = {"ce": ce.detach(), "kd": kd.detach()}
    term = kd
    if distill == "hybrid":
        feature = cosine_distance(e, targets)
        stats["distill"] = feature.detach()
        term = beta * feature + kd
    return (1.0 - alpha) * ce + alpha * term, stats


def log_prior(class_counts: list[int]) -> torch.Tensor:
    """log pi_j, the training class prior, float32; a class with no training image counts as one (stays finite)."""
    counts = torch.tensor(class_counts, dtype=torch.float64).clamp(min=1)
    return (counts / counts.sum()).log().float()


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, prior_log: torch.Tensor) -> torch.Tensor:
    """CE(z + log pi, y): Balanced Softmax; `prior_log` from `log_prior`."""
    return F.cross_entropy(logits.float() + prior_log.to(logits.device), labels)
