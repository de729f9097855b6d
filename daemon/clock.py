"""Wall time derived from trio's clock.

The daemon reads the system clock once, at start, and from then on only trio's clock, so
every time-based rule runs the same on `MockClock` in tests and in the load test's fast mode.
"""

from __future__ import annotations

import time

import trio


class WallClock:
    """Epoch seconds = the epoch read at start + the trio time elapsed since."""

    def __init__(self, epoch: float | None = None) -> None:
        self._epoch = time.time() if epoch is None else epoch
        self._origin = trio.current_time()

    def now(self) -> float:
        return self._epoch + (trio.current_time() - self._origin)

    def deadline_for(self, wall_time: float) -> float:
        """The trio deadline at which the wall clock shows `wall_time`."""
        return self._origin + (wall_time - self._epoch)

    def uptime(self) -> float:
        return trio.current_time() - self._origin
