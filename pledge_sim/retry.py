"""When to try again: exponential backoff and Retry-After, as pure functions of their inputs.

RFC 8995 §4.1: per-proxy exponential backoff, doubling up to a maximum of one hour.
RFC 8995 §5.3 (RFC 7030 §4.2.3): a 202 carries Retry-After; the pledge MUST cap it at 60 s and
resend the same signed voucher-request. A simulator run wants minutes, not hours, so the cap
of the backoff is a parameter (the CLI defaults it lower than the RFC's hour).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRY_AFTER_CAP = 60.0  # seconds, RFC 8995 §5.3
RFC_BACKOFF_CAP = 3600.0  # seconds, RFC 8995 §4.1
_DELAY_SECONDS = re.compile(r"[0-9]+")  # RFC 9110 §10.2.3: delay-seconds = 1*DIGIT (ASCII)
DEFAULT_RETRY_AFTER = 1.0  # a 202 without (or with an unusable) Retry-After


@dataclass
class Backoff:
    """Doubling delays with +-``jitter`` spread, so that a crowd of pledges that failed
    together does not retry together. ``rng`` returns a float in [0, 1)."""

    rng: Callable[[], float]
    initial: float = 0.5
    cap: float = 30.0
    jitter: float = 0.25
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.cap:
            raise ValueError("backoff needs 0 < initial <= cap")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self._next = self.initial

    def delay(self) -> float:
        """The next delay; each call doubles the base up to the cap."""
        base = self._next
        self._next = min(self._next * 2, self.cap)
        spread = 1 + self.jitter * (2 * self.rng() - 1)
        return min(base * spread, self.cap)

    def reset(self) -> None:
        """After progress: the next failure starts from the initial delay again."""
        self._next = self.initial


def retry_after_seconds(value: str | None, now: datetime) -> float:
    """Seconds to wait for a Retry-After header (delay-seconds or HTTP-date, RFC 9110
    §10.2.3), capped at 60 s. A missing or unreadable value means a short default wait."""
    if value is None:
        return DEFAULT_RETRY_AFTER
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):  # not str.isdigit(): it passes "²", int() refuses it
        # many digits: far beyond the cap (and int() refuses more than 4,300 of them)
        seconds = RETRY_AFTER_CAP if len(text.lstrip("0")) > 12 else float(int(text))
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):  # whatever a peer wrote
            return DEFAULT_RETRY_AFTER
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)
