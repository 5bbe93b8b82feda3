"""systemd notification (sd_notify): readiness and status for all three of our daemons.

Shared by joinproxyd, brski-registrar and brski-masa.

Messages are built by pure functions; a Notifier sends them and never raises. Without
NOTIFY_SOCKET (not started by systemd) every send is a no-op. joinproxyd adds its watchdog on
top (``joinproxyd.sdnotify``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


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

    def send(self, message: bytes) -> bool:
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def close_socket(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
