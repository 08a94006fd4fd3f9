"""Progress lines on stderr: `log` for one line, `Progress` for long work (done/total, rate, eta)."""
from __future__ import annotations

import os
import sys
import time


def log(message: str) -> None:
    """A progress line on stderr; under torchrun only rank 0 speaks (errors still surface from every rank)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Prints `[tag] done/total unit  N unit/s  eta` at most every `every_s` seconds, and at the end."""

    def __init__(self, tag: str, total: int, unit: str = "img", every_s: float = 10.0):
        self.tag, self.total, self.unit, self.every_s = tag, total, unit, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every_s or self.done >= self.total

    def report(self, extra: str = "") -> None:
        self.last = time.perf_counter()
        log(self.line(extra))

    def update(self, n: int, extra: str = "") -> None:
        self.advance(n)
        if self.due():
            self.report(extra)

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def line(self, extra: str = "") -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / max(self.total, 1)
        tail = f"  {extra}" if extra else ""
        return (f"[{self.tag}] {self.done}/{self.total} {self.unit} ({pct:.0f}%)  {rate:,.0f} {self.unit}/s  "
                f"eta {format_seconds(eta)}{tail}")
