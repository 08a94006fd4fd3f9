"""The collectives the stages use (cbd_cache.system.distributed), once over a real process group, for run_gpu.sh.

torchrun with one process is a world of one, where `distributed.init` opens no group; this opens one
with the backend given (nccl on a GPU, gloo on CPU) and checks sum, max and all_gather_int on it.

    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/collectives.py nccl
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from cbd_cache.system import distributed


def main(backend: str) -> None:
    device = torch.device("cuda", distributed.from_env().local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    total = distributed.all_reduce(torch.tensor([rank + 1.0], device=device)).item()
    top = distributed.all_reduce(torch.tensor([rank], device=device), "max").item()
    ranks = distributed.all_gather_int(rank, device)
    probe = torch.ones(3, device=device)   # in a world of one `distributed` calls nothing: torch's own, once
    dist.all_reduce(probe)
    ok = probe.tolist() == [float(world)] * 3 and ranks == list(range(world)) and total == world * (world + 1) / 2
    print(f"{backend} on {device}: world {world}, sum {total}, max {top}, ranks {ranks}, all_reduce {probe.tolist()}: "
          f"{'ok' if ok else 'WRONG'}")
    distributed.barrier()
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
