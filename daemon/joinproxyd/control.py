"""The daemon's root-only control socket: one JSON request line in, one JSON reply out.

    {"command": "status"}    -> {"ok": true, "status": {...}}
    {"command": "circuits"}  -> {"ok": true, "circuits": [...]}
    {"command": "window", "args": {"state": "close"}} -> {"ok": true, "window": {...}}
    {"command": "trace"}     -> one JSON line per event (the first describes the trace), until
                                the client closes its end
    anything refused         -> {"ok": false, "error": "one line"}

The socket is created 0600 in a 0700 directory: only root (or the daemon's user) may ask.
Who asked (the peer's uid and pid, SO_PEERCRED) is given to the handlers, so that a change
made through the socket is logged with who made it.
"""

import asyncio
import contextlib
import inspect
import json
import os
import pwd
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REQUEST = 4096


class ControlError(Exception):
    """A request the daemon refuses (bad argument, nothing to act on): its text is the
    one-line error joinproxyctl prints."""


@dataclass(frozen=True)
class Request:
    args: dict[str, Any] = field(default_factory=dict)
    uid: int | None = None
    pid: int | None = None

    @property
    def who(self) -> str:
        """The peer as a log line names it: "uid 0 (root), pid 1234"."""
        if self.uid is None:
            return "an unknown peer"
        try:
            name = f" ({pwd.getpwuid(self.uid).pw_name})"
        except KeyError:
            name = ""
        return f"uid {self.uid}{name}, pid {self.pid}"


# A handler takes no argument (a view) or the Request; it may be a coroutine function.
Handler = Callable[..., Any]


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int | None, int | None]:
    """(uid, pid) of the process at the other end of the unix socket."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None, None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return uid, pid


async def _stream(command: str, items: AsyncIterator[Any], reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    """A streaming command (``trace``): the first item as the reply ({"ok": true, command:
    item}), then one JSON line per item until the generator ends or the client closes its
    end (Ctrl-C), which ends the generator (and releases what it holds)."""
    first = True
    eof = asyncio.ensure_future(reader.read(1))  # any byte or EOF from the client ends it
    try:
        while True:
            nxt = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({nxt, eof}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                return
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            line = {"ok": True, command: item} if first else item
            first = False
            writer.write(json.dumps(line).encode() + b"\n")
            await writer.drain()
    finally:
        eof.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await eof
        await items.aclose()  # type: ignore[attr-defined]


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
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            reply = {"ok": False, "error": "no request line received"}
        else:
            reply = await self._answer(line, *peer_credentials(writer))
        stream = next(((key, value) for key, value in reply.items()
                       if key != "ok" and isinstance(value, AsyncIterator)), None)
        try:
            if stream is not None:
                await _stream(*stream, reader, writer)
            else:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes, uid: int | None = None,
                      pid: int | None = None) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": "request too long"}
        try:
            request = json.loads(line)
            command = request["command"]
            args = request.get("args", {})
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"ok": False, "error": 'expected {"command": NAME}'}
        if not isinstance(args, dict):
            return {"ok": False, "error": '"args" must be an object'}
        handler = self.handlers.get(command) if isinstance(command, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown command {command!r}; "
                                          f"known: {', '.join(sorted(self.handlers))}"}
        try:
            if inspect.signature(handler).parameters:
                result = handler(Request(args, uid, pid))
            else:
                result = handler()
            if inspect.isawaitable(result):
                result = await result
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, command: result}

    async def close(self) -> None:
        if self.server is None:
            return  # never made (start failed): nothing of ours to remove
        self.server.close()
        await self.server.wait_closed()
        self.server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
