"""Rebalancing a trained classifier after training, as pure functions of tensors and modules.

tau-normalisation (Kang et al. 2020): each classifier row w_j becomes w_j / |w_j|^tau; the bias, where
there is one, stays, so tau = 0 is the classifier as trained. It needs a classifier whose row norms
matter: a cosine classifier normalises its rows, so every tau gives it the same logits
(`stages/rebalance.py` refuses it and says so).
Post-hoc logit adjustment (Menon et al. 2021): z_j - tau * log pi_j, pi the training class prior.
Either tau is given (`student.tau`) or chosen on the val split from `TAU_GRIDS` (`choose_tau`).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from cbd_cache.models.networks import PerClassHead

# The grids tau is chosen from on val: Kang et al.'s tau in [0, 1]; logit adjustment in [0, 2] (Menon et al.'s 1 inside).
TAU_GRIDS = {"tau_norm": tuple(round(0.1 * i, 1) for i in range(11)),
             "logit_adjust": tuple(round(0.1 * i, 1) for i in range(21))}


def tau_normalized_weight(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """w_j / |w_j|^tau for every row j; tau = 0 returns the weight unchanged (bit for bit)."""
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


def rebalanced(classifier: nn.Module, method: str, tau: float, prior_log: torch.Tensor) -> nn.Module:
    """A copy of `classifier` rebalanced by `method` (tau_norm, logit_adjust) at `tau`; the original is untouched.

    tau_norm needs a linear classifier (ValueError otherwise); logit_adjust wraps any classifier in a
    `PerClassHead` whose bias is -tau * log pi (added to the bias it already has).
    """
    out = copy.deepcopy(classifier)
    with torch.no_grad():
        if method == "tau_norm":
            base = out.base if isinstance(out, PerClassHead) else out
            if not isinstance(base, nn.Linear):
                raise ValueError(f"tau-normalisation of a {type(base).__name__}: its row norms do not reach its logits")
            base.weight.copy_(tau_normalized_weight(base.weight, tau))
            return out
        if method == "logit_adjust":
            if not isinstance(out, PerClassHead):
                out = PerClassHead(out, len(prior_log)).to(prior_log.device)
            out.bias -= tau * prior_log.to(out.bias.device)
            return out
    raise ValueError(f"unknown rebalancing {method!r}")


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present of each class's accuracy, in percent: the selection score on val (equal
    to top-1 on a balanced split, and not swayed by the head classes on an unbalanced one)."""
    accs = [float((preds[labels == c] == c).mean()) for c in range(num_classes) if (labels == c).any()]
    return 100.0 * float(np.mean(accs))


def choose_tau(scores: dict[float, float]) -> float:
    """The tau of the best score; on a tie the first in the grid's order (the smallest change)."""
    best = max(scores.values())
    return next(t for t, s in scores.items() if s == best)
