"""One writer per folder: an advisory `fcntl.flock` on a lock file, released when its holder exits or dies.

A second writer refuses at once, naming the holder's pid, rather than waiting: a wait of hours behind
a training run reads as a hang, and what the second one would do next (skip a finished run, or train
another config) is clearer rerun than queued. Only a lock held for moments (creating a cache, writing
one shard of its shared views) is waited for. A SIGKILLed holder leaves the file but not the lock.
A process forked while the lock is held (a prepare's reader, a loader worker) closes its copy of the
lock file at once, so the lock is its holder's alone and ends with it.
"""
from __future__ import annotations

import fcntl
import os
import shlex
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cbd_cache.errors import Busy

_held: set = set()    # the lock files this process holds open


def _close_in_child() -> None:
    for f in _held:
        f.close()      # the child's copy of the descriptor: the parent keeps its lock
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


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
        _held.add(f)
        yield
    finally:
        _held.discard(f)
        f.close()   # closing releases the lock

