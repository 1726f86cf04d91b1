"""Progress lines for the long steps of curation (near dedup, k-means, level-1 assignment).

A step that takes hours at web scale and a second on the demo pool should say where it
stands in the first case and nothing in the second: :class:`Progress` logs a line at most
every ``every_s`` seconds, each with what is done, the rate and the time left, so work
that is over sooner logs none.
"""
from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_EVERY_S = 10.0  # the default interval between two lines


def is_long(seconds: float) -> bool:
    """Whether a step that took ``seconds`` is worth a line of its own when it ends."""
    return seconds >= PROGRESS_EVERY_S


class Progress:
    """``progress(done)`` after each piece of work: ``done`` of ``total`` ``unit`` so far."""

    def __init__(self, log: Callable[[str], None] | None, what: str, total: int, unit: str,
                 every_s: float | None = None):
        self.log, self.what, self.total, self.unit = log, what, total, unit
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.start = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.log is None or now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = f"about {(self.total - done) / rate:,.0f} s left" if rate > 0 else "time left unknown"
        self.log(f"{self.what}: {done:,}/{self.total:,} {self.unit} in {now - self.start:,.0f} s, {left}")
