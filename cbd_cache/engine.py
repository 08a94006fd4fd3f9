"""The training engine shared by teachers, students and baselines: `train_one_epoch` and `predict`."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import TrainCfg
from .runtime import Progress, Runtime, log

# loss_fn(model, batch) -> (loss, {name: detached scalar tensor}); batch as TrainStream collates it
LossFn = Callable[[torch.nn.Module, tuple], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class NonFiniteLoss(FloatingPointError):
    pass


def make_optimizer(model: torch.nn.Module, t: TrainCfg) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on every parameter, as the official code does."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base lr to 0 over `total_steps`, stepped every iteration, no warm-up (paper)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def steps_per_epoch(samples_per_epoch: int, batch_size: int, world: int = 1) -> int:
    """An epoch is N samples whatever the sampling (official code), in whole global batches."""
    return max(1, samples_per_epoch // (batch_size * world))


def train_one_epoch(model: torch.nn.Module, batches: Iterator[tuple], steps: int, optimizer: torch.optim.Optimizer,
                    scheduler, loss_fn: LossFn, runtime: Runtime, tag: str, batch_size: int) -> dict[str, float]:
    """`steps` optimiser steps on batches from an endless iterator; returns the epoch's mean stats."""
    model.train()
    progress = Progress(tag, steps * batch_size)
    sums: dict[str, torch.Tensor] = {}
    for step in range(steps):
        batch = next(batches)
        with runtime.autocast():
            loss, stats = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        stats = {"loss": loss.detach(), **stats}
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        progress.advance(batch_size)
        if progress.due():
            mean_loss = float(sums["loss"] / (step + 1))
            if not math.isfinite(mean_loss):
                raise NonFiniteLoss(f"{tag}: the loss became {mean_loss} by step {step + 1} of this epoch")
            progress.report(f"loss {mean_loss:.4f}  lr {scheduler.get_last_lr()[0]:.4g}")
    means = {k: float(v / steps) for k, v in sums.items()}
    if not math.isfinite(means["loss"]):
        raise NonFiniteLoss(f"{tag}: the loss became {means['loss']}")
    means["images_per_s"] = progress.rate
    return means


def fit(net: torch.nn.Module, stream, t: TrainCfg, step_fn: LossFn, runtime: Runtime, tag: str,
        folder: Path) -> tuple[list[dict[str, float]], float]:
    """Train `net` for `t.epochs` epochs of `stream.samples_per_epoch` samples: SGD, cosine schedule per step.

    Writes one line per epoch to `folder/log.jsonl`; returns (history, wall seconds).
    """
    model = torch.compile(net) if runtime.compile else net
    batches = iter(DataLoader(stream, batch_size=t.batch_size, **runtime.loader_kwargs()))
    steps = steps_per_epoch(stream.samples_per_epoch, t.batch_size)
    optimizer = make_optimizer(net, t)
    scheduler = cosine_schedule(optimizer, steps * t.epochs)
    log(f"[{tag}] {t.arch}, {t.epochs} epochs x {steps} steps of {t.batch_size}, seed {t.seed}, on {runtime.device}")
    folder.mkdir(parents=True, exist_ok=True)
    history, started = [], time.perf_counter()
    with open(folder / "log.jsonl", "w") as log_file:
        for epoch in range(t.epochs):
            stats = train_one_epoch(model, batches, steps, optimizer, scheduler, step_fn, runtime,
                                    f"{tag} epoch {epoch + 1}/{t.epochs}", t.batch_size)
            history.append({"epoch": epoch + 1, **stats})
            log_file.write(json.dumps(history[-1]) + "\n")
            log_file.flush()
    return history, time.perf_counter() - started


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, runtime: Runtime,
            features: bool = False) -> dict[str, np.ndarray]:
    """Run a model over an EvalStream loader: labels, rows, predictions (and descriptors v if asked), by row."""
    model.eval()
    out: dict[str, list] = {"labels": [], "rows": [], "preds": [], "features": []}
    for x, y, rows in loader:
        with runtime.autocast():
            x = runtime.to_device(x)
            if features:
                v = model.features(x)
                logits = model.classifier(model.projection(v))
                out["features"].append(v.float().cpu())
            else:
                logits, _ = model(x)
        out["preds"].append(logits.argmax(1).cpu())
        out["labels"].append(y)
        out["rows"].append(rows)
    result = {k: torch.cat(v).numpy() for k, v in out.items() if v}
    order = np.argsort(result["rows"])
    return {k: v[order] for k, v in result.items()}
