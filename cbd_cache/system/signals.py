"""SIGTERM (what SLURM and Kubernetes send on preemption) and SIGINT (Ctrl-C), as the shell counts them.

Outside training either one raises `Interrupted` at once; the CLI prints one line and exits 128 + the
signal number (143, 130). Inside `fit` they only ask it to stop (`StopRequests`): it finishes the step,
writes its resume point and then raises `Interrupted`. A second signal while it stops raises at once.
"""
from __future__ import annotations

import signal
import threading

from cbd_cache.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """SIGTERM and SIGINT raise `Interrupted` (the CLI's default, in the main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _raise)


def loader_worker_signals(worker_id: int = 0) -> None:
    """A loader worker leaves SIGTERM and Ctrl-C to its parent (a SLURM step signals every process): the parent
    finishes its step and then stops the workers, which must still be serving it; and no worker prints a
    traceback. (`worker_init_fn` of every DataLoader.)"""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopRequests:
    """While entered, SIGTERM and SIGINT set `signum` instead of raising: the loop stops at a step's end."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _ask(self, signum, frame) -> None:
        if self.signum:      # a second signal: stop now
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._ask) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
