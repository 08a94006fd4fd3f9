"""Running under `torchrun`: the process group, this process's rank, and the few collectives the stages need.

torchrun (one node or many, with the usual MASTER_ADDR / MASTER_PORT or rendezvous settings) sets
RANK, WORLD_SIZE and LOCAL_RANK; without them the process is a world of one and nothing here talks
to anyone. The backend follows the device: NCCL when the stage runs on CUDA (one GPU per process,
cuda:LOCAL_RANK), gloo on CPU. Every collective here is a no-op in a world of one.

A stalled rank (SIGSTOPped, hung, its machine lost) would hold the others in their next collective.
So every rank beats a counter on the rendezvous store from a thread of its own (`Watch`), and a rank
that sees another's counter stand still for `pipeline.rank_timeout_minutes` prints one line naming
it and exits 1 (torchrun then ends the job; a training run continues from its resume point when run
again). Collectives time out a minute later, for a rank that is alive but stuck. `barrier` waits on
the store, not in a collective: it waits as long as rank 0 alone needs (prepare, evaluation) while
the watch gives up on a rank that stops answering.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cbd_cache.errors import stalled_line

MARGIN = datetime.timedelta(minutes=1)   # collectives time out this long after the watch would have given up


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


def init(device: torch.device, timeout_minutes: float = 10.0) -> Dist:
    """Join the process group (once per process) with the backend `device` needs, and start watching the
    other ranks (`Watch`); returns this rank."""
    global _watch
    d = from_env()
    if d.world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        limit = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, timeout=limit + MARGIN)
        _watch = Watch(d, limit.total_seconds())
        _watch.start()
    return d


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Watch(threading.Thread):
    """Beats this rank's counter on the rendezvous store and gives up on a rank whose counter stands still
    for `limit_s` seconds: one line naming it, then exit 1. Also holds the store `barrier` waits on."""

    def __init__(self, d: Dist, limit_s: float):
        super().__init__(name="cbd-rank-watch", daemon=True)
        self.d, self.limit_s = d, limit_s
        self.every = min(10.0, limit_s / 5)
        env = os.environ
        self.prefix = f"cbd/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                   timeout=datetime.timedelta(seconds=limit_s), wait_for_workers=False)
        self.barriers = 0
        self.stopped = threading.Event()

    def key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def run(self) -> None:
        others = [r for r in range(self.d.world) if r != self.d.rank]
        seen = {r: (-1, time.monotonic()) for r in others}
        try:
            while not self.stopped.wait(self.every):
                self.store.add(self.key("beat", self.d.rank), 1)
                now = time.monotonic()
                for r in others:
                    beat = self.store.add(self.key("beat", r), 0)
                    if beat != seen[r][0] or self.store.add(self.key("done", r), 0):
                        seen[r] = (beat, now)
                    elif now - seen[r][1] > self.limit_s and not self.stopped.is_set():
                        self.give_up(stalled_line(r, self.d.world, self.d.rank, now - seen[r][1]))
        except Exception as e:   # the store itself stopped answering (its host stopped or is gone)
            if not self.stopped.is_set():
                self.give_up(stalled_line(None, self.d.world, self.d.rank, self.limit_s, str(e)))

    def give_up(self, line: str) -> None:
        print(f"cbd-cache: error: {line}", file=sys.stderr, flush=True)
        os._exit(1)

    def barrier(self) -> None:
        self.barriers += 1
        key, wait = self.key("barrier", self.barriers), 0.01
        try:
            self.store.add(key, 1)
            while self.store.add(key, 0) < self.d.world:
                time.sleep(wait)
                wait = min(2 * wait, 0.5)
        except Exception as e:   # the store stopped answering for `limit_s`
            self.give_up(stalled_line(None, self.d.world, self.d.rank, self.limit_s, str(e)))

    def stop(self) -> None:
        """This rank is done: the others stop watching it."""
        self.stopped.set()
        try:
            self.store.set_timeout(datetime.timedelta(seconds=10))
            self.store.add(self.key("done", self.d.rank), 1)
        except Exception:   # the job is ending anyway
            pass


_watch: Watch | None = None


def barrier() -> None:
    """Every rank gets here before any goes on (on the store: no time limit while every rank answers)."""
    if active() and _watch is not None:
        _watch.barrier()


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
    global _watch
    if _watch is not None:
        _watch.stop()
        _watch = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
