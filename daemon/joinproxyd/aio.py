"""Two asyncio idioms that Python 3.11 gets subtly wrong if written the obvious way.

``asyncio.wait_for`` in 3.11 can swallow a cancellation that arrives just as the awaited
thing completes (fixed in 3.12): a loop that waits on "woken or timed out" would then keep
running after stop() cancelled it. ``asyncio.timeout`` counts cancellations and does not.
And ``with suppress(CancelledError): await task`` after ``task.cancel()`` also swallows a
cancellation aimed at the *caller*; waiting through ``asyncio.wait`` does not.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def woken_or_timeout(event: asyncio.Event, timeout: float | None) -> None:
    """Return when `event` is set or after `timeout` seconds (None: no limit)."""
    if timeout is None:
        await event.wait()
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has finished; a cancellation of the caller still
    propagates."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait([task])
