"""Several processes at once, one per slot: `train-teacher --jobs` (one GPU per process where there are GPUs)."""
from __future__ import annotations

import os
import subprocess
import time

from .runtime import cpu_count


class JobsFailed(RuntimeError):
    """Some of the parallel processes exited non-zero (their own errors are above in the log)."""


def run_parallel(commands: list[list[str]], jobs: int, gpus: int) -> None:
    """Run the commands `jobs` at a time, each its own process on its own slot: the process in slot j
    sees only GPU j mod `gpus` (when there are GPUs) and an equal share of the CPU threads. Raises if any fails."""
    threads = max(1, cpu_count() // jobs)
    running: dict[int, tuple[list[str], subprocess.Popen]] = {}
    failed: list[str] = []
    pending = list(commands)
    while pending or running:
        for slot, (command, proc) in list(running.items()):
            if proc.poll() is not None:
                del running[slot]
                if proc.returncode != 0:
                    failed.append(f"`{' '.join(command[-4:])}` exited {proc.returncode}")
        free = [j for j in range(jobs) if j not in running]
        while pending and free:
            slot = free.pop(0)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            command = pending.pop(0)
            running[slot] = (command, subprocess.Popen(command, env=env))
        time.sleep(0.2)
    if failed:
        raise JobsFailed(f"{len(failed)} of {len(commands)} parallel jobs failed: {'; '.join(failed)}")
