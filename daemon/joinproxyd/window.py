"""The operator's join window, and the recent refusals per pledge.

RFC 8995 lets an operator stop admitting pledges. Joining is open while a registrar is
healthy, a join link is served and the window is open; the window is the operator's part
(`joinproxyctl window open|close`). It is runtime state: at start it takes the
configuration's ``daemon.join_window`` ("open" by default), a reload applies that key only
when its value changed (the operator's latest word wins), and a restart forgets whatever
joinproxyctl set.

A closed window refuses new circuits (counted as drop reason ``window-closed``), keeps
nat66's new flows from being translated, withdraws ipip's proxy NDP entries (no per-pledge
state there: see relays/ipip.py) and stops the announcements; what is established stays.

Refusals: every refusal a relay counts for a known pledge address is also kept in a bounded
ring (RING_SIZE entries, oldest forgotten first) for `joinproxyctl refusals`, grouped per
pledge when asked.
"""

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

RING_SIZE = 256
STATES = ("open", "closed")


@dataclass
class JoinWindow:
    """Whether the operator lets new pledges in, who said so last and when (wall clock)."""

    open: bool = True
    by: str = "configuration"
    since: float = 0.0

    def set(self, open_: bool, by: str, now: float | None = None) -> bool:
        """Open or close; False if it already was (nothing changes, nothing to log)."""
        if open_ == self.open:
            return False
        self.open, self.by = open_, by
        self.since = time.time() if now is None else now
        return True

    @property
    def state(self) -> str:
        return "open" if self.open else "closed"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "by": self.by, "since": self.since}


@dataclass(frozen=True)
class Refusal:
    pledge: str  # the address as the relay saw it (a link-local one scoped: fe80::1%join0)
    reason: str
    interface: str
    mode: str
    at: float  # wall clock


def pledge_key(address: str) -> str:
    """The address without brackets, port or scope, lower case: what `--pledge` and
    `drop` compare ("[fd00::1]:443" and "fe80::1%join0" name fd00::1 and fe80::1)."""
    text = address.strip().lower()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    return text.split("%", 1)[0]


class RefusalLog:
    """The last RING_SIZE refusals, oldest first."""

    def __init__(self, size: int = RING_SIZE) -> None:
        self.entries: deque[Refusal] = deque(maxlen=size)

    def add(self, pledge: str, reason: str, interface: str, mode: str,
            now: float | None = None) -> None:
        self.entries.append(Refusal(pledge, reason, interface, mode,
                                    time.time() if now is None else now))

    def by_pledge(self, pledge: str | None = None) -> list[dict[str, Any]]:
        """Per pledge address (and interface): how many refusals the ring still holds, the
        last reason, time, interface and mode, and every reason seen with its count; the
        most recent first. ``pledge`` keeps one address (any of its spellings)."""
        wanted = pledge_key(pledge) if pledge is not None else None
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for entry in self.entries:
            key = (pledge_key(entry.pledge), entry.interface)
            if wanted is not None and key[0] != wanted:
                continue
            group = groups.setdefault(key, {"pledge": entry.pledge, "count": 0,
                                            "reasons": {}})
            group["count"] += 1
            group["reasons"][entry.reason] = group["reasons"].get(entry.reason, 0) + 1
            group.update(last_reason=entry.reason, last_time=entry.at,
                         interface=entry.interface, mode=entry.mode)
        return sorted(groups.values(), key=lambda g: g["last_time"], reverse=True)
