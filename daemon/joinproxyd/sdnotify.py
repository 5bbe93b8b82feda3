"""systemd notification for joinproxyd: the shared sd_notify messages and sender
(``service_notify``), plus the watchdog the models lack.

The watchdog ping is sent from a task on the event loop, and only when the daemon's liveness
check passes, so a hung loop or a dead relay is exactly what makes systemd restart us.
"""

import asyncio
from collections.abc import Callable

import service_notify
from service_notify import (  # noqa: F401  (the daemon's callers use them from here)
    ready,
    reloading,
    status,
    stopping,
    watchdog,
    watchdog_interval,
)

from .aio import cancel_and_wait


class Notifier(service_notify.Notifier):
    _task: asyncio.Task[None] | None = None

    def start_watchdog(self, alive: Callable[[], bool]) -> None:
        if self.interval is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._ping(alive, self.interval), name="watchdog")

    async def _ping(self, alive: Callable[[], bool], interval: float) -> None:
        while True:
            if alive():
                self.send(watchdog())
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self.close_socket()
