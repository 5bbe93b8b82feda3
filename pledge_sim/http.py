"""A small HTTP/1.1 client over one asyncio TLS stream.

Why not aiohttp's client: BRSKI needs things a pooled client hides. The pledge must read the
server's certificate off the very connection it then sends the voucher-request on (RFC 8995
§5.2: proximity-registrar-cert is what *this* TLS session showed), it must keep one persistent
connection per trust state (§5.1), and it connects to link-local addresses with a zone
(``fe80::b:2%eth0``) that URL parsers reject. So: one object per TLS connection, requests in
sequence, Content-Length or chunked bodies, and bounded sizes.
"""

from __future__ import annotations

import _ssl  # the DER encoding constant of the chain's certificate objects
import asyncio
import contextlib
import re
import socket
import ssl
from dataclasses import dataclass, field

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024  # a certs-only PKCS#7 or a voucher is a few KiB
_STATUS = re.compile(r"[0-9]{3}")  # RFC 9112 §4: status-code = 3DIGIT
_DECIMAL = re.compile(r"[0-9]{1,18}")  # more digits is more than MAX_BODY_BYTES anyway
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")


class HttpError(Exception):
    """The server's answer is not usable HTTP/1.1, or the connection ended mid-response."""


class ClosedBeforeResponse(HttpError):
    """The server closed the connection without answering. ``first``: it was the first
    request on the connection, i.e. the server hung up right after the TLS handshake."""

    def __init__(self, first: bool) -> None:
        super().__init__("connection closed before a response")
        self.first = first


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()

    def text_excerpt(self, limit: int = 160) -> str:
        """The body as one line of text, for error messages (MASA errors are plain text)."""
        text = self.body[: limit * 2].decode("utf-8", "replace")
        line = " ".join(text.split())
        return line if len(line) <= limit else line[: limit - 1] + "…"


class Connection:
    """One TLS connection to a registrar (through a proxy), carrying requests in sequence."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 authority: str) -> None:
        self._reader = reader
        self._writer = writer
        self._authority = authority
        self._reusable = True
        self._answered = 0

    @property
    def peer_cert_der(self) -> bytes | None:
        """The server's end-entity certificate, DER, as presented in this TLS session."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        return ssl_object.getpeercert(binary_form=True)

    @property
    def server_chain_der(self) -> list[bytes] | None:
        """The certificates the server sent in this TLS session, DER, leaf first and in the
        order sent, verified or not; None when the TLS layer cannot tell."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        return None if ssl_object is None else sent_chain(ssl_object)

    @property
    def tls_version(self) -> str | None:
        ssl_object = self._writer.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.version()

    @property
    def reusable(self) -> bool:
        return self._reusable and not self._writer.is_closing()

    async def request(self, method: str, path: str, *, body: bytes = b"",
                      headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
        if not self.reusable:
            raise HttpError("connection is closed")
        head = [f"{method} {path} HTTP/1.1", f"Host: {self._authority}",
                f"Content-Length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        try:
            async with asyncio.timeout(timeout):
                await self._writer.drain()
                return await self._read_response(method)
        except TimeoutError as exc:
            self._reusable = False
            raise HttpError(f"no response to {method} {path} within {timeout:g} s") from exc
        except asyncio.IncompleteReadError as exc:
            self._reusable = False
            raise HttpError("connection closed in the middle of a response") from exc
        except asyncio.LimitOverrunError as exc:
            self._reusable = False
            raise HttpError("response header line too long") from exc

    async def _read_response(self, method: str) -> Response:
        status_line = await self._reader.readline()
        if not status_line:
            self._reusable = False
            raise ClosedBeforeResponse(first=self._answered == 0)
        parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        # ASCII digits only: str.isdigit() also passes "²", which int() then refuses.
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _STATUS.fullmatch(parts[1]):
            self._reusable = False
            raise HttpError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        headers = await self._read_headers()
        if headers.get("connection", "").lower() == "close":
            self._reusable = False
        body = await self._read_body(method, status, headers)
        self._answered += 1
        return Response(status, reason, headers, body)

    async def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        total = 0
        while True:
            line = await self._reader.readline()
            total += len(line)
            if total > MAX_HEADER_BYTES:
                raise HttpError("response headers too large")
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            if line in (b"\r\n", b"\n"):
                return headers
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise HttpError(f"malformed header line {line[:80]!r}")
            key = name.strip().lower()
            # Repeated headers join with commas (RFC 9110 §5.3).
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()

    async def _read_body(self, method: str, status: int, headers: dict[str, str]) -> bytes:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._read_chunked()
        length = headers.get("content-length")
        if length is not None:
            if not _DECIMAL.fullmatch(length) or int(length) > MAX_BODY_BYTES:
                raise HttpError(f"unusable Content-Length {length!r}")
            return await self._reader.readexactly(int(length))
        # Neither: the body runs to the end of the connection (RFC 9112 §6.3 rule 8).
        self._reusable = False
        body = await self._reader.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise HttpError("response body too large")
        return body

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = (await self._reader.readline()).split(b";")[0].strip()
            # RFC 9112 §7.1: 1*HEXDIG; int(..., 16) alone would take "0x1f", "+5" and "1_0"
            if not _CHUNK_SIZE.fullmatch(size_line):
                raise HttpError(f"bad chunk size {size_line[:20]!r}")
            size = int(size_line, 16)
            if size == 0:
                await self._read_headers()  # trailers, up to the blank line
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise HttpError("response body too large")
            body += await self._reader.readexactly(size)
            if await self._reader.readexactly(2) != b"\r\n":
                raise HttpError("chunk not followed by CRLF")

    async def close(self) -> None:
        self._reusable = False
        self._writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            async with asyncio.timeout(2):
                await self._writer.wait_closed()


def sent_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes] | None:
    """The peer's certificate chain as sent (OpenSSL's SSL_get_peer_cert_chain; on a client it
    includes the leaf). Python 3.13 has get_unverified_chain() on the object; 3.11 and 3.12 on
    the inner one. None if neither is there or its shape changed: the caller must then not
    rely on a chain at all."""
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return None
    try:
        chain = getter()
        return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]
    except Exception:  # a private API: any change of shape means "unknown", never a crash
        return None


async def connect(host: str, port: int, context: ssl.SSLContext, *,
                  timeout: float = 10.0) -> Connection:
    """Open TCP and complete the TLS handshake. ``host`` may carry a zone (``fe80::1%eth0``).

    Raises OSError (refused, unreachable), ssl.SSLError (the handshake failed) or
    TimeoutError."""
    # "": no SNI and no name check. The pledge knows no registrar name; what it trusts is the
    # pinned certificate, checked by the context (see pledge_sim.tls).
    tls = {"ssl": context, "server_hostname": "", "ssl_handshake_timeout": timeout}
    numeric = _numeric_address(host, port)
    async with asyncio.timeout(timeout):
        if numeric is None:  # a name: asyncio resolves it
            reader, writer = await asyncio.open_connection(host, port, **tls)
        else:
            family, sockaddr = numeric
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, sockaddr)
                reader, writer = await asyncio.open_connection(sock=sock, **tls)
            except BaseException:
                sock.close()
                raise
    bare = host.split("%", 1)[0]
    authority = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    return Connection(reader, writer, authority)


def _numeric_address(host: str, port: int) -> tuple[int, tuple[object, ...]] | None:
    """(family, socket address) of a numeric host, zone included; None for a name. asyncio
    takes a zoned address (a pledge's usual ``fe80::1%eth0``) for a name and resolves it in
    its thread pool: 8 % of a pledge-sim's CPU through a proxy, measured. Parsing a number
    with AI_NUMERICHOST never blocks."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    family, _type, _proto, _name, sockaddr = infos[0]
    return family, sockaddr
