"""One training run, whatever it trains: seed -> build -> fit -> evaluate -> save.

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
    net = network(model)
    held_out = manifest.eval_split
    reports = {s: evaluate_network(net, manifest, cfg, runtime, s) for s in (held_out, *splits)}
    spec = network_spec(net, arch or t.arch, manifest.channels, manifest.num_classes, t.gamma)
    meta = {**meta, **{f"{s}_top1": reports[s]["top1"] for s in splits}, "test_top1": reports[held_out]["top1"],
            "train_wall_s": wall_s}
    ckpt = save_run(plan.folder, net, spec, meta, plan.identity, history, reports[held_out], manifest.class_names)
    write_evaluation(plan.folder, cfg.pipeline.tensorboard, reports, history[-1]["step"])
    log(f"[{plan.tag}] done in {wall_s:.0f}s: "
        + ", ".join(f"{s} top-1 {reports[s]['top1']:.2f}" for s in (*splits, held_out)))
    return ckpt
