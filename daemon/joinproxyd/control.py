"""The daemon's root-only control socket: one JSON request line in, one JSON reply out.

    {"command": "status"}    -> {"ok": true, "status": {...}}
    {"command": "circuits"}  -> {"ok": true, "circuits": [...]}

The socket is created 0600 in a 0700 directory: only root (or the daemon's user) may ask.
"""

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_REQUEST = 4096

Handler = Callable[[], Any]


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a killed daemon
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            reply = self._answer(line)
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            reply = {"ok": False, "error": "no request line received"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": "request too long"}
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": 'expected {"command": NAME}'}
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}; "
                                          f"known: {', '.join(sorted(self.handlers))}"}
        return {"ok": True, command: handler()}

    async def close(self) -> None:
        if self.server is None:
            return  # never made (start failed): nothing of ours to remove
        self.server.close()
        await self.server.wait_closed()
        self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
