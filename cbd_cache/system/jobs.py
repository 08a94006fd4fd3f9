"""Several processes at once, one per slot: `train-teacher --jobs` and `sweep --jobs` (one GPU per process where there are GPUs)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from cbd_cache.errors import JobsFailed
from cbd_cache.system.runtime import cpu_count


def gpus_for(device: str) -> int:
    """The GPUs jobs are dealt over: none when the pipeline runs on the CPU."""
    return torch.cuda.device_count() if device != "cpu" else 0


def threads_per_job(jobs: int) -> int:
    """An equal share of the cores, never above an OMP_NUM_THREADS the caller set."""
    share = max(1, cpu_count() // jobs)
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(cap)) if cap.isdigit() and int(cap) > 0 else share


def _prctl():
    """libc's prctl, looked up in the parent: a forked child should call it, not load a library."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):     # not Linux
        return None


PRCTL, PR_SET_PDEATHSIG = _prctl(), 1
GRACE_S = 10         # a job that got the signal too (Ctrl-C in a terminal, a SLURM step) stops by itself within it
STOP_WAIT_S = 60     # then a SIGTERMed job has this long to save its resume point before SIGKILL


def terminate_with_parent() -> None:
    """In a job, before it starts: SIGTERM when the parent dies, even by SIGKILL (a job saves its resume point)."""
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_all(procs: Sequence[subprocess.Popen], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return all(p.poll() is not None for p in procs)


@contextlib.contextmanager
def stopping_on_interrupt(running: dict[int, tuple[int, subprocess.Popen, float]]):
    """On Ctrl-C, SIGTERM or any error in the parent, stop the running jobs before it leaves: those that got
    the signal too stop by themselves; the others (a signal sent to the parent alone) are sent SIGTERM after
    `GRACE_S`. Each saves its resume point. Left running, they would train on holding their run locks, and
    the next call would be refused."""
    try:
        yield
    except BaseException:
        procs = [proc for _, proc, _ in running.values()]
        if not wait_all(procs, GRACE_S):
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            if not wait_all(procs, STOP_WAIT_S):
                for proc in procs:
                    proc.kill()
                    proc.wait()
        raise


def run_parallel(commands: list[list[str]], jobs: int, gpus: int, logs: Sequence[Path] | None = None,
                 deadline: float | None = None, on_done: Callable[[int, float], None] | None = None) -> bool:
    """Run the commands `jobs` at a time, each its own process on its own slot: the process in slot j
    sees only GPU j mod `gpus` (when there are GPUs) and `threads_per_job` CPU threads.

    With `logs`, command i writes its stdout and stderr to logs[i]. A failure does not stop the
    others; once all are done, raises JobsFailed naming each failed one (and its log). `on_done(i,
    seconds)` follows each success. Past `deadline` (time.time()) no new command starts: returns False.
    """
    threads = threads_per_job(jobs)
    running: dict[int, tuple[int, subprocess.Popen, float]] = {}
    failed: list[str] = []
    pending = list(range(len(commands)))
    stopped = False
    with contextlib.ExitStack() as files, stopping_on_interrupt(running):
        while pending or running:
            for slot, (i, proc, started) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    if proc.returncode != 0:
                        where = f"; log {logs[i]}" if logs else ""
                        failed.append(f"`{' '.join(commands[i][-4:])}` exited {proc.returncode}{where}")
                    elif on_done is not None:
                        on_done(i, time.perf_counter() - started)
            if pending and deadline is not None and time.time() >= deadline:
                stopped, pending = True, []
            free = [j for j in range(jobs) if j not in running]
            while pending and free:
                slot, i = free.pop(0), pending.pop(0)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                out = None
                if logs:
                    logs[i].parent.mkdir(parents=True, exist_ok=True)
                    out = files.enter_context(open(logs[i], "w"))
                proc = subprocess.Popen(commands[i], env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        preexec_fn=terminate_with_parent)
                running[slot] = (i, proc, time.perf_counter())
            time.sleep(0.2)
    if failed:
        raise JobsFailed(f"{len(failed)} of {len(commands)} parallel jobs failed: {'; '.join(failed)}")
    return not stopped
