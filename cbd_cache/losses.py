"""Losses as pure functions of tensors.

Feature distillation (paper Eq. 2; Eq. 4 with K teachers, targets concatenated):
    L = (1 - alpha) * CE(z, y) + alpha * beta * (1 - cos(e, t))
where e = h(v) is the student's (projected) descriptor and t the concatenation of the K teachers'
L2-normalised descriptors of the same view.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_per_teacher(targets: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """L2-normalise each teacher's slice of the concatenated target (float32), undoing float16 rounding."""
    parts = torch.split(targets.float(), dims, dim=1)
    return torch.cat([F.normalize(p, dim=1) for p in parts], dim=1)


def cosine_distance(e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(e, t)."""
    return (1.0 - F.cosine_similarity(e.float(), t.float(), dim=1)).mean()


def cbd_loss(logits: torch.Tensor, labels: torch.Tensor, e: torch.Tensor, targets: torch.Tensor,
             alpha: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * CE + alpha * beta * (1 - cos(e, targets)); returns the loss and its two terms."""
    ce = F.cross_entropy(logits.float(), labels)
    distill = cosine_distance(e, targets)
    return (1.0 - alpha) * ce + alpha * beta * distill, {"ce": ce.detach(), "distill": distill.detach()}
