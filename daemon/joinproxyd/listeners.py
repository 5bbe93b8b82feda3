"""Which of the daemon's listening sockets are bound, which are not and why, and when to try
again.

A listener that cannot bind (the port is taken by another process, the address is not
there yet) is not an error to die of: it is retried with backoff (1 s doubling to 30 s), each
failure is counted in joinproxyd_listener_errors_total{interface,mode,reason}, and the first
failure and the recovery are logged once (retries in between at debug level). Until it binds,
what it would serve is not announced and not reported as served, and READY=1 waits for it.

Pure bookkeeping plus one timer per failed listener: the owner tries the bind, reports the
result here, and is woken (``on_retry``) when the next attempt is due.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .metrics import Metrics

FIRST_DELAY = 1.0
MAX_DELAY = 30.0

# errno -> the reason label; anything else is "error"
_REASONS = {
    errno.EADDRINUSE: "address-in-use",
    errno.EADDRNOTAVAIL: "address-not-available",
    errno.EACCES: "permission",
    errno.EPERM: "permission",
    errno.ENODEV: "no-device",
}


def bind_reason(exc: BaseException) -> str:
    return _REASONS.get(getattr(exc, "errno", None) or 0, "error")


def backoff(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` consecutive failures (>= 1)."""
    return min(MAX_DELAY, FIRST_DELAY * 2 ** (attempts - 1))


@dataclass
class Failure:
    where: str  # what was being bound, for humans: "[fe80::1%join0]:8443"
    reason: str  # the metric label
    detail: str  # the kernel's words
    attempts: int
    next_attempt: float  # monotonic


Key = tuple[str, str]  # (interface, mode); interface "" for listeners not on a join link


class Listeners:
    def __init__(self, metrics: Metrics, log: logging.Logger,
                 on_retry: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.log = log
        self.on_retry = on_retry
        self.clock = clock
        self.failures: dict[Key, Failure] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def due(self, interface: str, mode: str, where: str | None = None) -> bool:
        """May a bind be attempted now? Not before its backoff has passed, unless what is to
        be bound changed (a reload gave the link another port, the address changed)."""
        failure = self.failures.get((interface, mode))
        return (failure is None or self.clock() >= failure.next_attempt
                or (where is not None and where != failure.where))

    def failed(self, interface: str, mode: str, where: str, exc: BaseException) -> float:
        """A bind failed: count it, log it (once per reason), schedule the retry. Returns
        the seconds until the next attempt."""
        key = (interface, mode)
        reason = bind_reason(exc)
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        old = self.failures.get(key)
        if old is not None and old.where != where:
            old = None  # something else is being bound now: a first failure again
        attempts = old.attempts + 1 if old is not None else 1
        delay = backoff(attempts)
        self.failures[key] = Failure(where, reason, detail, attempts, self.clock() + delay)
        self.metrics.listener_errors.labels(interface, mode, reason).inc()
        extra = {"INTERFACE": interface, "MODE": mode, "REASON": reason}
        if old is None or old.reason != reason:
            self.log.error("%s: cannot listen on %s: %s; not served until it can, "
                           "retrying with backoff (next in %g s)", mode, where, detail, delay,
                           extra=extra)
        else:
            self.log.debug("%s: listening on %s failed again (attempt %d): %s; next in %g s",
                           mode, where, attempts, detail, delay, extra=extra)
        self._schedule(key, delay)
        return delay

    def bound(self, interface: str, mode: str) -> None:
        failure = self.failures.pop((interface, mode), None)
        self._cancel((interface, mode))
        if failure is not None:
            self.log.info("%s: listening on %s after %d failed attempt%s", mode,
                          failure.where, failure.attempts, "" if failure.attempts == 1 else "s",
                          extra={"INTERFACE": interface, "MODE": mode})

    def forget(self, interface: str, mode: str) -> None:
        """The listener is no longer wanted (its link went, a reload removed it)."""
        self.failures.pop((interface, mode), None)
        self._cancel((interface, mode))

    def failure(self, interface: str, mode: str) -> Failure | None:
        return self.failures.get((interface, mode))

    def describe(self, interface: str, mode: str) -> str | None:
        failure = self.failures.get((interface, mode))
        if failure is None:
            return None
        wait = math.ceil(max(0.0, failure.next_attempt - self.clock()))
        return (f"{mode}: cannot listen on {failure.where}: {failure.detail} "
                f"({failure.attempts} attempt{'' if failure.attempts == 1 else 's'}, "
                f"next in {wait} s)")

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{"interface": i, "mode": m, "address": f.where, "reason": f.reason,
                 "error": f.detail, "attempts": f.attempts,
                 "retry_in": round(max(0.0, f.next_attempt - now), 1)}
                for (i, m), f in sorted(self.failures.items())]

    def close(self) -> None:
        for key in list(self._timers):
            self._cancel(key)

    def _schedule(self, key: Key, delay: float) -> None:
        self._cancel(key)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.on_retry()

    def _cancel(self, key: Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
