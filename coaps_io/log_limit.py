"""Log lines a flood cannot multiply: the first of a kind per window, then one summary.

A UDP socket can be sent thousands of bad datagrams a second; one log line each would turn a
flood into a disk-filling attack. The counters (metrics) still see every event.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_INTERVAL = 60.0
# Refusals name a client each: enough lines to see who is refused, not a flood's worth.
REFUSAL_LOG_BURST = 20


@dataclass
class _Window:
    start: float
    level: int
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    """``allow(key)`` is true for the first ``burst`` events of ``key`` in each ``interval``;
    later ones are counted and summarised in one line when the window ends (``flush``)."""

    def __init__(self, logger: logging.Logger, *, interval: float = DEFAULT_INTERVAL,
                 burst: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or burst < 1:
            raise ValueError("interval must be > 0 and burst ≥ 1")
        self._log, self.interval, self.burst, self._clock = logger, interval, burst, clock
        self._windows: dict[str, _Window] = {}

    def allow(self, key: str, level: int = logging.WARNING) -> bool:
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval:
            self._summarise(key, window, now)
            window = None
        if window is None:
            window = self._windows[key] = _Window(now, level)
        if window.logged < self.burst:
            window.logged += 1
            return True
        window.suppressed += 1
        return False

    def flush(self) -> None:
        """Summarise and close the windows that have ended (call it now and then)."""
        now = self._clock()
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._summarise(key, window, now)
                del self._windows[key]

    def _summarise(self, key: str, window: _Window, now: float) -> None:
        if window.suppressed:
            self._log.log(window.level, "%s: %d more in the last %.0f s (not logged one by one)",
                          key, window.suppressed, now - window.start)
