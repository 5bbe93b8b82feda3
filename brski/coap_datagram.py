"""CoAP over UDP messages as a proxy sees them (RFC 7252 §3), with extended tokens (RFC 8974).

A stateless proxy (RFC 9031 §7.1, relays/cojp.py) rewrites a few header fields and options and
passes everything else on untouched, so this codec keeps options as an ordered list of
(number, raw value) pairs and the payload as bytes: nothing is interpreted that the proxy does
not need, and a message re-encodes byte for byte (options are written in their number order,
as the wire must carry them).

Why not aiocoap's message codec: aiocoap 0.4.17 reads the TKL nibble as the token length and
writes ``len(token) & 0x0F``, so tokens of 13 bytes or more (RFC 8974, which RFC 9031 §7.1
requires of the JRC and of proxies for the sealed state) are mis-encoded (protocols.md §6.4).

Token length (RFC 8974 §2.1): TKL 0..12 is the length; 13 means one extension byte follows the
header with length - 13; 14 means two bytes with length - 269; 15 is a message format error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .errors import DecodeError, UsageError

VERSION = 1
PAYLOAD_MARKER = 0xFF
MAX_TOKEN = 65804  # RFC 8974: 14 + 0xFFFF + 269 - 14
_HEADER = struct.Struct(">BBH")


class MessageType(IntEnum):
    CON = 0
    NON = 1
    ACK = 2
    RST = 3


class OptionNumber(IntEnum):
    """The options a CoJP proxy looks at (RFC 7252 §12.2, RFC 8613 §2)."""

    URI_HOST = 3
    OSCORE = 9
    URI_PATH = 11
    PROXY_URI = 35
    PROXY_SCHEME = 39


def code_class(code: int) -> int:
    return code >> 5


def is_request(code: int) -> bool:
    return code_class(code) == 0 and code != 0


def is_response(code: int) -> bool:
    return 2 <= code_class(code) <= 5


@dataclass(frozen=True, slots=True)
class CoapDatagram:
    """One CoAP message as carried in one UDP datagram."""

    mtype: MessageType
    code: int
    message_id: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = field(default=())
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF or not 0 <= self.message_id <= 0xFFFF:
            raise UsageError("CoAP code is one byte, message ID two")
        if not isinstance(self.token, bytes) or len(self.token) > MAX_TOKEN:
            raise UsageError(f"CoAP token must be bytes of at most {MAX_TOKEN}")
        if any(not 0 <= n <= 0xFFFF + 269 or not isinstance(v, bytes) for n, v in self.options):
            raise UsageError("CoAP options are (number, bytes) pairs")

    def option(self, number: int) -> list[bytes]:
        return [value for n, value in self.options if n == number]

    def without(self, *numbers: int) -> tuple[tuple[int, bytes], ...]:
        return tuple((n, v) for n, v in self.options if n not in numbers)

    def encode(self) -> bytes:
        tkl, extension = token_length_field(len(self.token))
        out = bytearray(_HEADER.pack(VERSION << 6 | self.mtype << 4 | tkl, self.code,
                                     self.message_id))
        out += extension + self.token
        previous = 0
        # sorted() is stable: repeated options keep their order, as they must
        for number, value in sorted(self.options, key=lambda item: item[0]):
            delta, dext = _nibble(number - previous)
            size, sext = _nibble(len(value))
            out.append(delta << 4 | size)
            out += dext + sext + value
            previous = number
        if self.payload:
            out.append(PAYLOAD_MARKER)
            out += self.payload
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> CoapDatagram:
        """Parse one datagram; anything RFC 7252 §3 / RFC 8974 call a format error raises
        DecodeError (an empty message with a token or options, TKL 15, nibble 15 outside
        the payload marker, a marker with no payload, truncation)."""
        if len(data) < 4:
            raise DecodeError(f"CoAP message of {len(data)} bytes is shorter than its header")
        first, code, mid = _HEADER.unpack_from(data)
        if first >> 6 != VERSION:
            raise DecodeError(f"CoAP version {first >> 6}, not 1")
        token, pos = read_token(data)
        tkl = len(token)
        options: list[tuple[int, bytes]] = []
        number = 0
        payload = b""
        while pos < len(data):
            byte = data[pos]
            pos += 1
            if byte == PAYLOAD_MARKER:
                payload = data[pos:]
                if not payload:
                    raise DecodeError("CoAP payload marker with no payload")
                break
            delta, pos = _extended(data, pos, byte >> 4)
            size, pos = _extended(data, pos, byte & 0x0F)
            number += delta
            options.append((number, _need(data, pos, size)))
            pos += size
        if code == 0 and (tkl or options or payload):
            raise DecodeError("empty CoAP message with a token, options or payload")
        return cls(MessageType((first >> 4) & 3), code, mid, token, tuple(options), payload)


def token_length_field(length: int) -> tuple[int, bytes]:
    """The TKL nibble and the extension bytes for a token of ``length`` (RFC 8974 §2.1)."""
    if not 0 <= length <= MAX_TOKEN:
        raise UsageError(f"a CoAP token has 0..{MAX_TOKEN} bytes, not {length}")
    return _nibble(length)


def read_token(data: bytes) -> tuple[bytes, int]:
    """The token of a CoAP-over-UDP message and the offset just after it (RFC 8974 §2.1)."""
    if len(data) < 4:
        raise DecodeError(f"CoAP message of {len(data)} bytes is shorter than its header")
    tkl, pos = data[0] & 0x0F, 4
    if tkl == 15:
        raise DecodeError("CoAP TKL 15 is reserved (RFC 8974)")
    if tkl == 13:
        tkl, pos = _need(data, pos, 1)[0] + 13, pos + 1
    elif tkl == 14:
        tkl, pos = int.from_bytes(_need(data, pos, 2), "big") + 269, pos + 2
    return _need(data, pos, tkl), pos + tkl


def retokened(data: bytes, mtype: MessageType, message_id: int, token: bytes) -> bytes:
    """``data`` (a CoAP message) with another type, message ID and token, its code, options
    and payload copied as they are: what a proxy does to a response it only routes, without
    parsing (and so without re-checking) the options it never looks at. The old token must
    be well-formed (DecodeError otherwise)."""
    _, offset = read_token(data)
    tkl, extension = token_length_field(len(token))
    return bytes([VERSION << 6 | mtype << 4 | tkl, data[1]]) + message_id.to_bytes(2, "big") \
        + extension + token + data[offset:]


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, (value - 269).to_bytes(2, "big")


def _need(data: bytes, pos: int, size: int) -> bytes:
    if pos + size > len(data):
        raise DecodeError("CoAP message is truncated")
    return bytes(data[pos:pos + size])


def _extended(data: bytes, pos: int, nibble: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        return _need(data, pos, 1)[0] + 13, pos + 1
    if nibble == 14:
        return int.from_bytes(_need(data, pos, 2), "big") + 269, pos + 2
    raise DecodeError("CoAP option nibble 15 outside the payload marker")


def ping(message_id: int) -> bytes:
    """A CoAP ping (RFC 7252 §4.3): an empty confirmable message. Every CoAP endpoint answers
    it with a Reset of the same message ID, without touching any resource or security state,
    which makes it the cheapest proof that a CoAP server (a JRC) is there."""
    return CoapDatagram(MessageType.CON, 0, message_id).encode()


def answers_ping(data: bytes, message_id: int) -> bool:
    """Whether ``data`` is the Reset (or an empty ACK, which RFC 7252 §4.3 also lets a CoAP
    endpoint send) that answers :func:`ping` with this message ID."""
    try:
        answer = CoapDatagram.decode(data)
    except DecodeError:
        return False
    return (answer.code == 0 and answer.message_id == message_id
            and answer.mtype in (MessageType.RST, MessageType.ACK))
