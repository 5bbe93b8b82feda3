"""systemd notification (sd_notify protocol), with the watchdog the models lack.

Messages are built by pure functions; one Notifier sends them and never raises. Without
NOTIFY_SOCKET (not started by systemd) every send is a no-op. The watchdog ping is sent from
a task on the event loop, and only when the daemon's liveness check passes, so a hung loop
or a dead relay is exactly what makes systemd restart us.
"""

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

from .aio import cancel_and_wait


def ready(status: str) -> bytes:
    return f"READY=1\nSTATUS={status}".encode()


def status(text: str) -> bytes:
    return f"STATUS={text}".encode()


def reloading() -> bytes:
    return b"RELOADING=1"


def stopping() -> bytes:
    return b"STOPPING=1"


def watchdog() -> bytes:
    return b"WATCHDOG=1"


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of WatchdogSec), or None if no watchdog is asked of us."""
    usec = env.get("WATCHDOG_USEC")
    owner = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner.isdigit() and int(owner) != pid:
        return None
    return int(usec) / 2_000_000


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        self.sock: socket.socket | None = None
        if address.startswith(("/", "@")):
            # A leading '@' names a socket in the abstract namespace.
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.interval = watchdog_interval(env, os.getpid())
        self._task: asyncio.Task[None] | None = None

    def send(self, message: bytes) -> bool:
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto(message, self.address)
        except OSError:
            return False
        return True

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
        if self.sock is not None:
            self.sock.close()
            self.sock = None
