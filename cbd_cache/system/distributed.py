"""Running under `torchrun`: the process group, this process's rank, and the few collectives the stages need.

torchrun (one node or many, with the usual MASTER_ADDR / MASTER_PORT or rendezvous settings) sets
RANK, WORLD_SIZE and LOCAL_RANK; without them the process is a world of one and nothing here talks
to anyone. The backend follows the device: NCCL when the stage runs on CUDA (one GPU per process,
cuda:LOCAL_RANK), gloo on CPU. Every collective here is a no-op in a world of one.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 may evaluate or write a checkpoint while the others wait at a barrier: allow it an hour.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a world of one without them)."""
    env = os.environ
    return Dist(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> Dist:
    """Join the process group (once per process) with the backend `device` needs; returns this rank."""
    d = from_env()
    if d.world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=TIMEOUT)
    return d


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Element-wise sum or max over ranks (in place; returns `values`)."""
    if active():
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return values


def all_gather_int(value: int, device: torch.device) -> list[int]:
    """Every rank's `value`, in rank order."""
    if not active():
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(x.item()) for x in out]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
