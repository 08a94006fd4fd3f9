"""One writer per folder: an advisory `fcntl.flock` on a lock file, released when its holder exits or dies.

A second writer refuses at once, naming the holder's pid, rather than waiting: a wait of hours behind
a training run reads as a hang, and what the second one would do next (skip a finished run, or train
another config) is clearer rerun than queued. Only a lock held for moments (creating a cache, writing
one shard of its shared views) is waited for. A SIGKILLed holder leaves the file but not the lock.
"""
from __future__ import annotations

import fcntl
import os
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cbd_cache.errors import Busy


@contextmanager
def hold(lock: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold `lock` (created if needed) for the block, or raise Busy naming the holder (`wait`: wait for it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise Busy(f"{what} is in use by process {pid} (lock file {shlex.quote(str(lock))}); "
                       "wait for it to finish, or stop it, then run the same command again") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()   # closing releases the lock

