"""One training run, whatever it trains: seed -> build -> fit -> evaluate -> save (`finish_run`: evaluate -> save).

Teachers, students and cRT differ only in what they hand in: the module to build (a network, or
cRT's classifier), the stream, the step function, and how the trained module becomes the network
that is saved and evaluated. Under torchrun every rank trains; rank 0 evaluates and writes the run
folder (`runs.save_run`: run.json last, so a crash never leaves a run that looks finished).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from cbd_cache.config import Config, TrainCfg
from cbd_cache.data.manifest import Manifest
from cbd_cache.models.checkpoints import network_spec
from cbd_cache.models.networks import Network
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.seeding import seed_everything
from cbd_cache.train.engine import fit
from cbd_cache.train.evaluation import evaluate_network
from cbd_cache.train.runs import RunPlan, save_run
from cbd_cache.train.steps import LossFn
from cbd_cache.train.summaries import Summaries, write_evaluation


def train_model(plan: RunPlan, t: TrainCfg, build: Callable[[], torch.nn.Module], stream, step_fn: LossFn,
                runtime: Runtime, cfg: Config, manifest: Manifest, meta: dict[str, Any], *, arch: str = "",
                network: Callable[[torch.nn.Module], Network] = lambda model: model, splits: tuple[str, ...] = (),
                in_process: bool = False) -> Path:
    """Train `build()` (built after seeding with `t.seed`) on `stream` with `step_fn`; evaluate `network(model)`
    on the held-out split (and `splits`, logged first); save it with `meta` plus its accuracies and time.

    `arch` is the saved network's architecture (default `t.arch`); `in_process` loads the data in this
    process (in-memory streams, where loader processes only cost).
    """
    seed_everything(t.seed)
    model = runtime.prepare_model(build())
    summaries = Summaries(plan.folder, cfg.pipeline.tensorboard)
    loader_runtime = dataclasses.replace(runtime, workers=0) if in_process else runtime
    history, wall_s = fit(model, stream, t, step_fn, loader_runtime, plan.tag, plan.folder, plan.recipe,
                          summaries.epoch)
    summaries.close()
    if not runtime.dist.main:   # under torchrun rank 0 evaluates and writes the run folder
        return plan.checkpoint
    return finish_run(plan, network(model), arch or t.arch, t.gamma, cfg, manifest, runtime, meta, history, wall_s,
                      splits)


def finish_run(plan: RunPlan, net: Network, arch: str, gamma: float, cfg: Config, manifest: Manifest,
               runtime: Runtime, meta: dict[str, Any], history: list[dict], wall_s: float,
               splits: tuple[str, ...] = (), report_extra: dict[str, Any] | None = None) -> Path:
    """Evaluate `net` on the held-out split (and `splits`, logged first), then save the run folder (run.json last).

    A run that trains nothing (post-hoc rebalancing) comes here directly, with an empty history;
    `report_extra` goes into its eval.json (say, the tau it chose on val).
    """
    held_out = manifest.eval_split
    reports = {s: evaluate_network(net, manifest, cfg, runtime, s) for s in (held_out, *splits)}
    spec = network_spec(net, arch, manifest.channels, manifest.num_classes, gamma)
    meta = {**meta, **{f"{s}_top1": reports[s]["top1"] for s in splits}, "test_top1": reports[held_out]["top1"],
            "train_wall_s": wall_s}
    ckpt = save_run(plan.folder, net, spec, meta, plan.identity, history, {**reports[held_out], **(report_extra or {})},
                    manifest.class_names)
    write_evaluation(plan.folder, cfg.pipeline.tensorboard, reports, history[-1]["step"] if history else 0)
    log(f"[{plan.tag}] done in {wall_s:.0f}s: "
        + ", ".join(f"{s} top-1 {reports[s]['top1']:.2f}, ECE {reports[s]['ece']:.2f}" for s in (*splits, held_out)))
    return ckpt
