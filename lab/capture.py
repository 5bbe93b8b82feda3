"""Helpers for packet captures taken while a test runs."""

from __future__ import annotations

import time
from pathlib import Path


def settle(path: Path, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Wait until tcpdump has written what it caught (its file stops growing for ``quiet``
    seconds): on a loaded machine it lags behind the exchange, and packets still in its ring
    when it is interrupted are counted but never written."""
    deadline = time.monotonic() + limit
    size, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = path.stat().st_size if path.exists() else 0
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)
