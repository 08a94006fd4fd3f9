"""The training engine shared by teachers, students and baselines: `fit` (the one training loop) and `predict`.

`fit` runs the same way alone or under torchrun: each rank wraps the model in DistributedDataParallel,
reads its own slots of the stream, and takes the same number of steps. `batch_size` is the global
batch, as in the paper: each of N processes takes batch_size / N per step, in `pipeline.accumulate`
micro-batches, so the steps per epoch and the lr schedule do not depend on N or on accumulation. Rank 0 logs and writes the
resume checkpoint (`resume.pt` in the run folder: model, optimiser, schedule, step, RNG states,
stats, config; written then renamed) every `checkpoint_steps` steps or `checkpoint_minutes` minutes.
With `--resume` a killed run continues from it to the same final step, on the same batches, and a
config that differs from the checkpoint's is refused with the keys that differ. A non-finite loss
stops every rank, naming the step and the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import distributed
from .config import ConfigError, TrainCfg
from .logs import Progress, log
from .runtime import Runtime
from .workdir import atomic_write_bytes

# loss_fn(model, batch) -> (loss, {name: detached scalar tensor}); batch as TrainStream collates it
LossFn = Callable[[torch.nn.Module, tuple], tuple[torch.Tensor, dict[str, torch.Tensor]]]

RESUME_FILE = "resume.pt"
CONTROL_EVERY = 10   # steps between the ranks' agreement on stopping, reporting and checkpointing


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


def steps_per_epoch(samples_per_epoch: int, batch_size: int) -> int:
    """An epoch is N samples whatever the sampling (official code), in whole global batches."""
    return max(1, samples_per_epoch // batch_size)


def micro_batch(batch_size: int, world: int, accumulate: int, tag: str) -> int:
    """The loader's batch: the global `batch_size` split over `world` processes and `accumulate` micro-batches."""
    if batch_size % (world * accumulate):
        raise ConfigError(f"[{tag}] batch_size={batch_size} is the global batch and does not split over {world} "
                          f"process(es) x pipeline.accumulate={accumulate}; use a multiple of {world * accumulate}")
    return batch_size // (world * accumulate)


@dataclass
class TrainState:
    """Where a run is: what a resume checkpoint restores besides the weights and the optimiser."""

    step: int = 0                                            # optimiser steps taken (the same on every rank)
    history: list[dict[str, float]] = field(default_factory=list)   # one entry per finished epoch
    sums: dict[str, float] = field(default_factory=dict)     # the current epoch's stat sums over steps and ranks
    wall_s: float = 0.0                                      # training seconds before this process started


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: checkpoint value -> current value` for every key whose value differs."""
    a, b = flatten(saved), flatten(now)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The run folder's resume checkpoint: when one is due, writing it (rank 0), reading it back."""

    def __init__(self, path: Path, runtime: Runtime):
        self.path, self.runtime = path, runtime
        self.last_step: int | None = None
        self.last_time = time.perf_counter()

    def due_by_time(self) -> bool:
        minutes = self.runtime.checkpoint_minutes
        return minutes > 0 and time.perf_counter() - self.last_time >= 60 * minutes

    def due_by_step(self, step: int) -> bool:
        every = self.runtime.checkpoint_steps
        return every > 0 and step % every == 0

    def save(self, net: torch.nn.Module, optimizer, scheduler, state: TrainState, config: dict, workers: int) -> None:
        if self.runtime.dist.main:
            buf = io.BytesIO()
            torch.save({"step": state.step, "config": config, "loader_workers": workers,
                        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "history": state.history, "sums": state.sums, "wall_s": state.wall_s,
                        "rng": rng_state()}, buf)
            atomic_write_bytes(self.path, buf.getvalue())
        self.last_step, self.last_time = state.step, time.perf_counter()

    def load(self, net: torch.nn.Module, optimizer, scheduler, config: dict) -> tuple[TrainState, int] | None:
        """Restore a run from the checkpoint, if there is one; refuse one written for another config."""
        if not self.path.is_file():
            log(f"[resume] no checkpoint at {self.path}; starting from step 0")
            return None
        # on the CPU: RNG states must stay there; the model and optimiser copy their tensors to their device
        ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        diff = config_diff(ckpt["config"], config)
        if diff:
            raise ConfigError(f"cannot resume {self.path}: the config differs from the checkpoint's in "
                              f"{'; '.join(diff)}. Restore those values, or start over without --resume")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        state = TrainState(ckpt["step"], ckpt["history"], ckpt["sums"], ckpt["wall_s"])
        steps = distributed.all_gather_int(state.step, self.runtime.device)
        if len(set(steps)) > 1:
            raise RuntimeError(f"ranks read different resume checkpoints (steps {steps}): put the workdir on "
                               "storage every node sees")
        self.last_step = state.step
        log(f"[resume] {self.path}: continuing from step {state.step}")
        return state, ckpt["loader_workers"]


def fold(local: dict[str, torch.Tensor], state: TrainState) -> None:
    """Add the steps' stat sums since the last fold, summed over ranks, into the epoch's sums."""
    if not local:
        return
    keys = sorted(local)
    values = distributed.all_reduce(torch.stack([local[k] for k in keys])).tolist()
    for k, v in zip(keys, values):
        state.sums[k] = state.sums.get(k, 0.0) + v
    local.clear()


def train_step(model: torch.nn.Module, batches: list[tuple], step_fn: LossFn, optimizer: torch.optim.Optimizer,
               scheduler, runtime: Runtime) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step on this process's micro-batches: what `fit` does per step, and what the benchmarks time.

    Each micro-batch's loss is scaled by 1/len(batches), so the summed gradient is the mean over the
    process's share of the global batch (DDP then averages the ranks, all-reducing on the last one
    only). Returns the mean loss and stats over the micro-batches.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(batches)
    total: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        quiet = i < n - 1 and hasattr(model, "no_sync")    # DDP (or compiled DDP): all-reduce on the last only
        with model.no_sync() if quiet else contextlib.nullcontext():
            with runtime.autocast():
                loss, stats = step_fn(model, batch)
            (loss / n).backward()
        for k, v in {"loss": loss.detach(), **stats}.items():
            total[k] = total[k] + v / n if k in total else v / n
    optimizer.step()
    scheduler.step()
    loss = total.pop("loss")
    return loss, total


def fit(net: torch.nn.Module, stream, t: TrainCfg, step_fn: LossFn, runtime: Runtime, tag: str,
        folder: Path, config: dict[str, Any] | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> tuple[list[dict[str, float]], float]:
    """Train `net` for `t.epochs` epochs of `stream.samples_per_epoch` samples: SGD, cosine schedule per step.

    `config` is what a resumed run must agree with (default: `t`). Rank 0 writes one line per epoch
    to `folder/log.jsonl` (mean loss and stats, lr, images/s) and hands the same line to `on_epoch`
    (TensorBoard, say); returns (history, training wall seconds over all resumes).
    """
    d, accumulate = runtime.dist, runtime.accumulate
    micro = micro_batch(t.batch_size, d.world, accumulate, tag)
    steps = steps_per_epoch(stream.samples_per_epoch, t.batch_size)
    total = steps * t.epochs
    optimizer = make_optimizer(net, t)
    scheduler = cosine_schedule(optimizer, total)
    # the world size and accumulation set what each process reads at each step, so a resume must keep them
    config = {**(config or {"train": dataclasses.asdict(t)}), "world_size": d.world, "accumulate": accumulate}
    ckpts = Checkpoints(folder / RESUME_FILE, runtime)
    state, workers = TrainState(), runtime.workers
    if runtime.resume:
        restored = ckpts.load(net, optimizer, scheduler, config)
        if restored:
            state, workers = restored
    elif ckpts.path.is_file():
        log(f"[{tag}] starting over; {ckpts.path} (from a run that was cut short) is continued with --resume")
    model = net
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[runtime.device.index] if runtime.cuda else None)
    if runtime.compile:
        model = torch.compile(model)
    placed = stream.place(d.rank, d.world, state.step * accumulate, micro)    # the loader's batches are micro-batches
    loader_kwargs = dataclasses.replace(runtime, workers=workers).loader_kwargs()
    batches = iter(DataLoader(placed, batch_size=micro, **loader_kwargs))
    log(f"[{tag}] {t.arch}, {t.epochs} epochs x {steps} steps of a global batch of {t.batch_size}: "
        f"{t.batch_size // d.world} per process x {d.world} process(es)"
        f"{f' in {accumulate} micro-batches of {micro}' if accumulate > 1 else ''}; "
        f"lr {t.lr:g}, seed {t.seed}, on {runtime.device}")
    folder.mkdir(parents=True, exist_ok=True)
    if d.main:
        (folder / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history))
    started = time.perf_counter()
    first_bad = torch.full((), -1, dtype=torch.int64, device=runtime.device)
    local: dict[str, torch.Tensor] = {}
    progress = None
    model.train()
    while state.step < total:
        epoch = state.step // steps
        if progress is None:   # (a resumed epoch counts only its remaining steps)
            progress = Progress(f"{tag} epoch {epoch + 1}/{t.epochs}", ((epoch + 1) * steps - state.step) * t.batch_size)
        loss, stats = train_step(model, [next(batches) for _ in range(accumulate)], step_fn, optimizer, scheduler,
                                 runtime)
        state.step += 1
        first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), state.step, first_bad)
        for k, v in {"loss": loss, **stats}.items():
            local[k] = local[k] + v.float() if k in local else v.float()
        progress.advance(t.batch_size)
        end_of_epoch = state.step % steps == 0
        by_step = ckpts.due_by_step(state.step) or state.step == total
        if not (end_of_epoch or by_step or state.step % CONTROL_EVERY == 0):
            continue
        # every rank reaches this point at the same steps, so they can agree on what happens next
        flags = torch.stack([first_bad, torch.tensor(int(progress.due()), device=runtime.device),
                             torch.tensor(int(ckpts.due_by_time()), device=runtime.device)])
        bad, report, by_time = distributed.all_reduce(flags, "max").tolist()
        if bad >= 0:
            raise NonFiniteLoss(nan_message(tag, bad, total, steps, ckpts))
        if not (report or end_of_epoch or by_step or by_time):
            continue
        fold(local, state)
        done_in_epoch = state.step - epoch * steps
        if report:
            progress.report(f"loss {state.sums['loss'] / (done_in_epoch * d.world):.4f}  "
                            f"lr {scheduler.get_last_lr()[0]:.4g}")
        if end_of_epoch:
            means = {k: v / (steps * d.world) for k, v in state.sums.items()}
            means["images_per_s"] = progress.rate
            means["lr"] = scheduler.get_last_lr()[0]
            state.history.append({"epoch": epoch + 1, "step": state.step, **means})
            state.sums, progress = {}, None
            if d.main:
                with open(folder / "log.jsonl", "a") as log_file:
                    log_file.write(json.dumps(state.history[-1]) + "\n")
                if on_epoch is not None:
                    on_epoch(state.history[-1])
        if by_step or by_time:
            ckpts.save(net, optimizer, scheduler,
                       dataclasses.replace(state, wall_s=state.wall_s + time.perf_counter() - started),
                       config, workers)
    steps_by_rank = distributed.all_gather_int(state.step, runtime.device)
    if len(set(steps_by_rank)) > 1:
        raise RuntimeError(f"[{tag}] ranks finished at different steps: {steps_by_rank}")
    log(f"[{tag}] {state.step} steps" + (f" on each of {d.world} ranks" if d.world > 1 else ""))
    return state.history, state.wall_s + time.perf_counter() - started


def nan_message(tag: str, bad: int, total: int, steps: int, ckpts: Checkpoints) -> str:
    epoch, k = divmod(bad - 1, steps)
    where = f"at step {bad} of {total} (epoch {epoch + 1}, step {k + 1} of {steps})"
    if ckpts.last_step is None:
        last = "no checkpoint was written before it (pipeline.checkpoint_steps writes them more often)"
    else:
        last = f"the last good checkpoint is {ckpts.path} at step {ckpts.last_step} (--resume continues from it)"
    return (f"{tag}: the loss became non-finite {where}; {last}. The same config replays the same batches: "
            "check the data, or lower the lr (a changed config starts from step 0)")


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


def cross_entropy_step(runtime: Runtime) -> LossFn:
    """Plain cross-entropy on the batch: teachers, and the single-stage and fine-tuning baselines."""
    def step(model: torch.nn.Module, batch: tuple):
        x, y = runtime.to_device(batch[0]), batch[1].to(runtime.device, non_blocking=True)
        logits, _ = model(x)
        ce = F.cross_entropy(logits.float(), y)
        return ce, {"ce": ce.detach()}
    return step
