"""Progress for long phases (decoding, evaluation, make's stages): elapsed time, rate and
an ETA, at most one line every `every_s` seconds so a log stays readable.

    p = Progress(len(sentences), "translate", unit="sentences")
    for batch in ...:
        ...; p.update(len(batch))
    p.done()         # "translate: 1,376/1,376 sentences | 1m32s | 15.0 sentences/s"
"""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float | None) -> str:
    """3s, 4m05s, 2h03m: the resolution a person reads an ETA at."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_seconds(elapsed: float, done: int, total: int) -> float | None:
    """Time left at the rate so far (None before the first unit is done)."""
    if done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


class Progress:
    def __init__(self, total: int, what: str, unit: str = "", out=None, every_s: float = 10.0,
                 clock=time.monotonic):
        self.total, self.what, self.unit = total, what, unit
        self.out = out if out is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        self.start = clock()
        self.count = 0
        self._last_print = self.start

    def line(self) -> str:
        elapsed = self.clock() - self.start
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.what}: {self.count:,}/{self.total:,}{unit} | {format_duration(elapsed)}"
        if self.count >= self.total:
            rate = self.count / elapsed if elapsed > 0 else 0.0
            return f"{head} | {rate:,.1f} {self.unit or 'items'}/s"
        return f"{head} | ETA {format_duration(eta_seconds(elapsed, self.count, self.total))}"

    def update(self, n: int = 1):
        self.count += n
        now = self.clock()
        if self.out is not None and self.count < self.total and (
                now - self._last_print >= self.every_s):
            self._last_print = now
            print(self.line(), file=self.out, flush=True)

    def done(self):
        if self.out is not None:
            print(self.line(), file=self.out, flush=True)
