"""Progress lines for curation's long steps (listing, embedding, near dedup, k-means,
level-1 assignment, retrieval).

A step that takes hours at web scale and a second on the demo pool should say where it
stands in the first case and nothing in the second: :class:`Progress` gives a line at most
every ``every_s`` seconds, each with what is done, the rate and the time left, so work
that is over sooner logs none (embedding also logs its first and last chunk, through
:meth:`Progress.due`).
"""
from __future__ import annotations

import time
from collections.abc import Callable

PROGRESS_EVERY_S = 10.0  # the default interval between two lines


def is_long(seconds: float) -> bool:
    """Whether a step that took ``seconds`` is worth a line of its own when it ends."""
    return seconds >= PROGRESS_EVERY_S


class Progress:
    """``progress(done)`` after each piece of work: ``done`` of ``total`` ``unit`` so far.

    Steps whose lines say more than that (listing, which has no total; embedding, which also
    counts chunks) ask :meth:`due` whether a line is due and word it themselves, with
    :meth:`rate` and :meth:`left` (which needs a total). ``done`` counts from ``start_at``
    (work an earlier attempt did), so the rate is of this attempt's work."""

    def __init__(self, log: Callable[[str], None] | None, what: str, total: int | None, unit: str,
                 every_s: float | None = None, start_at: int = 0):
        self.log, self.what, self.total, self.unit, self.start_at = log, what, total, unit, start_at
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.start = self.last = time.monotonic()

    def due(self, always: bool = False) -> bool:
        """Whether to log a line now: one every ``every_s`` at most, or ``always`` (the first or
        last piece of a step that says so); a True answer counts as the line given."""
        now = time.monotonic()
        if self.log is None or not (always or now - self.last >= self.every_s):
            return False
        self.last = now
        return True

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def rate(self, done: int) -> float:
        """``unit`` per second so far."""
        return (done - self.start_at) / max(self.seconds(), 1e-9)

    def left(self, done: int) -> str:
        """The time left at the rate so far, in words."""
        rate = self.rate(done)
        if self.total is None or rate <= 0:
            return "time left unknown"
        return f"about {(self.total - done) / rate:,.0f} s left"

    def __call__(self, done: int) -> None:
        if (self.total is not None and done >= self.total) or not self.due():
            return
        of = "" if self.total is None else f"/{self.total:,}"
        self.log(f"{self.what}: {done:,}{of} {self.unit} in {self.seconds():,.0f} s, {self.left(done)}")
