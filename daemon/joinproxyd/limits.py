"""Admission control for new pledge connections: pure, with time passed in.

A new circuit is refused (and the refusal counted under its reason) when there is no
registrar, when a total, per-interface or per-pledge-address cap is reached, or when the
pledge address has spent its token bucket. Limits can change on reload without touching the
circuits already admitted.
"""

from collections import OrderedDict
from dataclasses import dataclass

from .config import Limits
from .model import DropReason

MAX_TRACKED_PLEDGES = 65536  # bucket table bound: a flood of sources cannot grow it further


@dataclass
class TokenBucket:
    tokens: float
    stamp: float

    def take(self, now: float, rate: float, burst: int) -> bool:
        self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Admission:
    """Counts open circuits and decides whether one more may open."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_interface: dict[str, int] = {}
        self.per_pledge: dict[str, int] = {}
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def admit(self, interface: str, pledge: str, now: float, have_registrar: bool,
              ) -> DropReason | None:
        """None if the circuit may open (and it is then counted), else the refusal reason."""
        limits = self.limits
        if not have_registrar:
            return DropReason.NO_REGISTRAR
        if self.total >= limits.circuits_total:
            return DropReason.LIMIT_TOTAL
        if self.per_interface.get(interface, 0) >= limits.circuits_per_interface:
            return DropReason.LIMIT_INTERFACE
        if self.per_pledge.get(pledge, 0) >= limits.circuits_per_pledge:
            return DropReason.LIMIT_PLEDGE
        if not self._bucket(pledge, now).take(now, limits.new_circuits_per_second,
                                              limits.new_circuits_burst):
            return DropReason.RATE_LIMIT
        self.total += 1
        self.per_interface[interface] = self.per_interface.get(interface, 0) + 1
        self.per_pledge[pledge] = self.per_pledge.get(pledge, 0) + 1
        return None

    def release(self, interface: str, pledge: str) -> None:
        self.total -= 1
        for table, key in ((self.per_interface, interface), (self.per_pledge, pledge)):
            left = table[key] - 1
            if left:
                table[key] = left
            else:
                del table[key]

    def _bucket(self, pledge: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(pledge)
        if bucket is None:
            bucket = TokenBucket(float(self.limits.new_circuits_burst), now)
            self._buckets[pledge] = bucket
            if len(self._buckets) > MAX_TRACKED_PLEDGES:
                self._buckets.popitem(last=False)  # forget the longest-unseen pledge
        else:
            self._buckets.move_to_end(pledge)
        return bucket
