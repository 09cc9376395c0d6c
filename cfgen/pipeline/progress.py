"""The generation job's periodic progress line (beside Ray Data's own progress bars).

    generate: 1,234 / 20,000 keys done, 3 failed, 4.1 counterfactuals/s, 1h16m left

Counts are keys of the plan (`cfgen.pipeline.plan`); the rate is this run's, so a resumed job does not claim the
work an earlier run did.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("cfgen")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    def __init__(self, planned: int, done: int = 0, failed: int = 0, every_s: float = 30.0, clock=time.monotonic):
        self.planned, self.done, self.failed = planned, done, failed
        self.every_s, self.clock = every_s, clock
        self.started = clock()
        self._last = self.started
        self._done_at_start = done + failed
        self.lines: list[str] = []

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def rate(self) -> float:
        return (self.done + self.failed - self._done_at_start) / max(self.elapsed, 1e-9)

    def text(self, label: str = "") -> str:
        rate = self.rate()
        left = self.planned - self.done - self.failed
        eta = f", {_duration(left / rate)} left" if rate > 0 and left > 0 else ""
        head = f"generate{' ' + label if label else ''}:"
        return (f"{head} {self.done:,} / {self.planned:,} keys done, {self.failed:,} failed, "
                f"{rate:.2f} counterfactuals/s{eta}")

    def update(self, done: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        self.line()

    def line(self, label: str = "", force: bool = False) -> str | None:
        now = self.clock()
        if not force and label == "" and now - self._last < self.every_s:
            return None
        self._last = now
        text = self.text(label)
        self.lines.append(text)
        log.info("%s", text)
        return text
