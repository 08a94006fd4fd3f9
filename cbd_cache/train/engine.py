"""The training engine shared by teachers, students and baselines: `fit` (the one training loop) and `predict`.

`fit` runs the same way alone or under torchrun: each rank wraps the model in DistributedDataParallel,
reads its own slots of the stream, and takes the same number of steps. `batch_size` is the global
batch, as in the paper: each of N processes takes batch_size / N per step, in `pipeline.accumulate`
micro-batches, so the steps per epoch and the lr schedule do not depend on N or on accumulation. Rank 0 logs and writes the
resume checkpoint (`resume.pt` in the run folder: model, optimiser, schedule, step, RNG states,
stats, config; written then renamed) every `checkpoint_steps` steps or `checkpoint_minutes` minutes.
A run cut short (killed, preempted) continues from it, when run again, to the same final step on the
same batches; a config that differs from the checkpoint's is refused with the keys that differ.
SIGTERM or SIGINT lets the step finish, writes the resume point and raises `Interrupted` (exit 143 /
130). A non-finite loss, parameter or buffer stops every rank, naming the step, the tensor and the lr.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from cbd_cache.config import TrainCfg
from cbd_cache.errors import ConfigError, Interrupted, NonFiniteLoss
from cbd_cache.models.checkpoints import floating, max_abs
from cbd_cache.system import distributed
from cbd_cache.system.logs import Progress, log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.signals import StopRequests
from cbd_cache.train.resume import Checkpoints, TrainState
from cbd_cache.train.steps import LossFn
from cbd_cache.workdir import LOG, RESUME

CONTROL_EVERY = 10   # steps between the ranks' agreement on stopping, reporting and checkpointing


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
    ckpts = Checkpoints(folder / RESUME, runtime)
    state, workers = TrainState(), runtime.workers
    restored = ckpts.load(net, optimizer, scheduler, config)    # a run cut short continues where it stopped
    if restored:
        state, workers = restored
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
        (folder / LOG).write_text("".join(json.dumps(h) + "\n" for h in state.history))
    started = time.perf_counter()
    # the parameters and the buffers (BatchNorm's running_var can overflow while the loss, from batch
    # statistics, stays finite): checked after every step, on the device, without a sync
    watched = floating(net.state_dict(keep_vars=True))
    tensors = [v.detach() for v in watched.values()]
    first_bad = torch.full((), -1, dtype=torch.int64, device=runtime.device)    # the step
    bad_what = torch.full((), -1, dtype=torch.int64, device=runtime.device)     # -1: the loss, else a tensor
    local: dict[str, torch.Tensor] = {}
    progress = None
    model.train()
    with StopRequests() as stop:
        while state.step < total:
            epoch = state.step // steps
            if progress is None:   # (a resumed epoch counts only its remaining steps)
                progress = Progress(f"{tag} epoch {epoch + 1}/{t.epochs}", ((epoch + 1) * steps - state.step) * t.batch_size)
            loss, stats = train_step(model, [next(batches) for _ in range(accumulate)], step_fn, optimizer, scheduler,
                                     runtime)
            state.step += 1
            finite = torch.isfinite(max_abs(tensors))
            loss_bad = ~torch.isfinite(loss)
            now_bad = (loss_bad | ~finite.all()) & (first_bad < 0)
            bad_what = torch.where(now_bad, torch.where(loss_bad, -1, (~finite).int().argmax()), bad_what)
            first_bad = torch.where(now_bad, state.step, first_bad)
            for k, v in {"loss": loss, **stats}.items():
                local[k] = local[k] + v.float() if k in local else v.float()
            progress.advance(t.batch_size)
            end_of_epoch = state.step % steps == 0
            by_step = ckpts.due_by_step(state.step) or state.step == total
            # alone, a signal stops at this step's end; under torchrun, at the next step the ranks agree on
            asked = stop.signum and d.world == 1
            if not (end_of_epoch or by_step or asked or state.step % CONTROL_EVERY == 0):
                continue
            # every rank reaches this point at the same steps, so they can agree on what happens next
            flags = torch.stack([first_bad, torch.tensor(int(progress.due()), device=runtime.device),
                                 torch.tensor(int(ckpts.due_by_time()), device=runtime.device),
                                 torch.tensor(stop.signum, device=runtime.device)])
            bad, report, by_time, signum = distributed.all_reduce(flags, "max").tolist()
            if bad >= 0:
                what = int(bad_what)
                name = list(watched)[what] if what >= 0 else ""
                tensor = "the loss" if what < 0 else (f"buffer {name}" if name in dict(net.named_buffers())
                                                      else f"parameter {name}")
                lr = t.lr * scheduler.lr_lambdas[0](bad - 1)
                raise NonFiniteLoss(nan_message(tag, bad, total, steps, ckpts, tensor, lr))
            if not (report or end_of_epoch or by_step or by_time or signum):
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
                    with open(folder / LOG, "a") as log_file:
                        log_file.write(json.dumps(state.history[-1]) + "\n")
                    if on_epoch is not None:
                        on_epoch(state.history[-1])
            if by_step or by_time or signum:
                ckpts.save(net, optimizer, scheduler,
                           dataclasses.replace(state, wall_s=state.wall_s + time.perf_counter() - started),
                           config, workers)
            if signum:
                log(f"[{tag}] stopped at step {state.step} of {total} by {signal.Signals(signum).name}")
                raise Interrupted(signum, str(ckpts.path))
    steps_by_rank = distributed.all_gather_int(state.step, runtime.device)
    if len(set(steps_by_rank)) > 1:
        raise RuntimeError(f"[{tag}] ranks finished at different steps: {steps_by_rank}")
    log(f"[{tag}] {state.step} steps" + (f" on each of {d.world} ranks" if d.world > 1 else ""))
    return state.history, state.wall_s + time.perf_counter() - started


def nan_message(tag: str, bad: int, total: int, steps: int, ckpts: Checkpoints, tensor: str, lr: float) -> str:
    epoch, k = divmod(bad - 1, steps)
    where = f"at step {bad} of {total} (epoch {epoch + 1}, step {k + 1} of {steps}), lr {lr:.4g}"
    if ckpts.last_step is None:
        last = "no checkpoint was written before it (pipeline.checkpoint_steps writes them more often)"
    else:
        last = f"the last good checkpoint is {ckpts.path} at step {ckpts.last_step} (a re-run continues from it)"
    return (f"{tag}: training diverged: {tensor} became non-finite {where}; nothing was saved as finished; "
            f"{last}. The same config replays the same batches: check the data, or lower the lr")
