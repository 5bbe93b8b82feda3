"""Keeping libraries' debug output out of a program's debug log, for every program of the
project (joinproxyd, the registrar, the MASA, pledge-sim).

pyroute2 dumps every netlink message at DEBUG, zeroconf and asyncio are chatty too. A
program's `debug` is about its own decisions, so these libraries log WARNING and above
unless asked for. Two holds, because one is not enough: the loggers' level (then their debug
records are not even made) and a filter on the handler (pyroute2 resets its logger's level
to 0 when imported, which may be after the program set it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

LIBRARIES = ("pyroute2", "asyncio", "zeroconf", "aiohttp", "aiocoap", "urllib3")
FLOOR = logging.WARNING


class LibraryFloor(logging.Filter):
    """Lets through library records at FLOOR and above only (and every other record)."""

    def __init__(self, quiet: Iterable[str]) -> None:
        super().__init__()
        self.quiet = tuple(quiet)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= FLOOR:
            return True
        name = record.name
        return not any(name == q or name.startswith(q + ".") for q in self.quiet)


def wanted_loud(value: str) -> set[str]:
    """The libraries a comma-separated list (an environment variable) names; "all" is all."""
    names = {n.strip() for n in value.split(",") if n.strip()}
    return set(LIBRARIES) if "all" in names else names & set(LIBRARIES)


def hold(handlers: Iterable[logging.Handler], loud: Iterable[str] = (),
         quiet: Iterable[str] = LIBRARIES) -> tuple[str, ...]:
    """Hold the `quiet` libraries (but those in `loud`) at WARNING on these handlers.
    Returns the names held. Set again after importing pyroute2 if it came later."""
    loud = set(loud)
    held = tuple(n for n in quiet if n not in loud)
    for name in quiet:
        logging.getLogger(name).setLevel(FLOOR if name in held else logging.NOTSET)
    for handler in handlers:
        for old in [f for f in handler.filters if isinstance(f, LibraryFloor)]:
            handler.removeFilter(old)
        handler.addFilter(LibraryFloor(held))
    return held
