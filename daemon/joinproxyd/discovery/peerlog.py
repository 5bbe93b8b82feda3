"""Warnings about misbehaving peers, at most one per reason per period.

A peer that sends junk is worth a WARNING (the house logging policy), but a peer that sends
junk a thousand times a second must not flood the journal: the drop counters carry the
volume, the log carries the first example and how many were suppressed after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class PeerWarnings:
    def __init__(self, log: logging.Logger, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.period = period
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, reason: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.period:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            self.log.debug(message, *args)
            return
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        if suppressed:
            message += " (%d more like it since the last warning)"
            args = (*args, suppressed)
        self.log.warning(message, *args, extra={"REASON": reason})
