"""RFC 8974 extended tokens for aiocoap 0.4.17's UDP message codec.

aiocoap reads the TKL nibble as the token length and writes ``len(token) & 0x0F`` (protocols.md
§9.2), so a token of 13 bytes or more is mangled both ways. A CoJP JRC behind a stateless join
proxy must accept and echo such tokens (RFC 9031 §7.1: the proxy's sealed state, 38..46 bytes
from joinproxyd). :func:`install` replaces the two methods with ones that take the token length
from brski.coap_datagram (the one place the wire format lives); everything after the token is
left to aiocoap as before. Idempotent; a process that never calls it keeps aiocoap as shipped.
"""

from __future__ import annotations

import struct
from typing import Any

from aiocoap import error
from aiocoap.message import Direction, Message
from aiocoap.numbers.types import Type

from brski.coap_datagram import read_token, token_length_field
from brski.errors import DecodeError, UsageError

_installed = False
# aiocoap's own decoder, kept for tests that show what the fix changes.
stock_decode = Message.decode


def _decode(cls: type[Message], rawdata: bytes, remote: Any = None) -> Message:
    try:
        (vttkl, code, mid) = struct.unpack("!BBH", rawdata[:4])
    except struct.error:
        raise error.UnparsableMessage("Incoming message too short for CoAP") from None
    if (vttkl & 0xC0) >> 6 != 1:
        raise error.UnparsableMessage("Fatal Error: Protocol Version must be 1")
    try:
        token, offset = read_token(bytes(rawdata))
    except DecodeError as exc:
        raise error.UnparsableMessage(str(exc)) from None
    msg = Message(code=code)
    msg.mid = mid
    msg.mtype = Type((vttkl & 0x30) >> 4)
    msg.token = token
    msg.payload = msg.opt.decode(rawdata[offset:])
    msg.remote = remote
    msg.direction = Direction.INCOMING
    return msg


def _encode(self: Message) -> bytes:
    assert self.direction == Direction.OUTGOING
    if self.code is None or self.mtype is None or self.mid is None:
        raise TypeError("Fatal Error: Code, Message Type and Message ID must not be None.")
    try:
        tkl, extension = token_length_field(len(self.token))
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    rawdata = bytes([(self.version << 6) + ((self.mtype & 0x03) << 4) + tkl])
    rawdata += struct.pack("!BH", self.code, self.mid) + extension + self.token
    rawdata += self.opt.encode()
    if len(self.payload) > 0:
        rawdata += b"\xff" + self.payload
    return rawdata


def install() -> None:
    """Make aiocoap's UDP codec read and write RFC 8974 extended tokens."""
    global _installed
    if _installed:
        return
    Message.decode = classmethod(_decode)  # type: ignore[method-assign,assignment]
    Message.encode = _encode  # type: ignore[method-assign]
    _installed = True
