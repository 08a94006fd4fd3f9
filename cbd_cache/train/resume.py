"""A run's resume checkpoint (`resume.pt`): when one is due, writing it on rank 0, reading it back.

It holds the model, optimiser, schedule, step, RNG states, the epoch's running sums and the run's
config; a resumed run continues to the same final step on the same batches, and a config that
differs from the checkpoint's is refused with the keys that differ.
"""
from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbd_cache.errors import ConfigError, FileDamaged
from cbd_cache.models.checkpoints import read_torch, refuse_non_finite
from cbd_cache.system import distributed
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.storage import atomic_write_bytes


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
            model = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            refuse_non_finite(self.path, model, "it is not written; the previous resume point is kept")
            torch.save({"step": state.step, "config": config, "loader_workers": workers, "model": model,
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "history": state.history, "sums": state.sums, "wall_s": state.wall_s,
                        "rng": rng_state()}, buf)
            atomic_write_bytes(self.path, buf.getvalue())
        self.last_step, self.last_time = state.step, time.perf_counter()

    def load(self, net: torch.nn.Module, optimizer, scheduler, config: dict) -> tuple[TrainState, int] | None:
        """Restore a run from the checkpoint, if there is one; refuse one written for another config."""
        if not self.path.is_file():
            return None
        # on the CPU: RNG states must stay there; the model and optimiser copy their tensors to their device
        ckpt = read_torch(self.path)
        start_over = f"remove {self.path} to start over from step 0"
        try:
            diff = config_diff(ckpt["config"], config)
            if diff:
                raise ConfigError(f"cannot resume {self.path}: the config differs from the checkpoint's in "
                                  f"{'; '.join(diff)}. Restore those values, or {start_over}")
            refuse_non_finite(self.path, ckpt["model"], start_over)
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            state = TrainState(ckpt["step"], ckpt["history"], ckpt["sums"], ckpt["wall_s"])
            workers = int(ckpt["loader_workers"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise FileDamaged(f"{self.path} does not hold a resume point of this run ({type(e).__name__}: "
                              f"{str(e)[:120]}); {start_over}") from None
        steps = distributed.all_gather_int(state.step, self.runtime.device)
        if len(set(steps)) > 1:
            raise RuntimeError(f"ranks read different resume checkpoints (steps {steps}): put the workdir on "
                               "storage every node sees")
        self.last_step = state.step
        log(f"[resume] {self.path}: continuing from step {state.step}")
        return state, workers
