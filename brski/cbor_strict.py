"""One strict CBOR decoder for everything the library decodes from the network.

Not cbor2's decoder, on purpose. cbor2 5.9's C decoder leaks about 1.5 KB for every text string
that is not valid UTF-8 (upstream bug), so a 3-byte GRASP datagram ``81 61 ff`` grows a daemon
without bound. It also collapses duplicate map keys (last value wins), reads ``7.0`` and ``true``
as the keys 7 and 1, turns tags into Python objects whose ``repr()`` can raise (a bignum of more
than 4,300 digits), and builds cyclic values from shared-value tags. The formats we parse use a
small part of CBOR, so this module decodes RFC 8949 well-formedness in plain Python and keeps:

- integers (at most 64 bits, as the wire allows), byte strings, UTF-8 text (checked strictly),
  arrays, maps, false/true/null/undefined, simple values and floats;
- every tag as ``cbor2.CBORTag(tag, value)``, unresolved (bignums included: a format that wants
  an integer then refuses the tag, with its own message);
- maps with integer, text or byte-string keys (or a tag around an integer or text, for RFC 9254
  SIDs) and no key twice.

Everything else raises DecodeError; nothing else escapes. ``cbor2`` is still used to encode.
``bench/cbor_decode.py`` measures the cost against cbor2's C decoder.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import cbor2

from .errors import DecodeError, UsageError

MAX_SIZE = 256 * 1024  # a voucher-request with a prior request and two chains is a few KiB
MAX_DEPTH: Final = 64  # nesting of arrays, maps and tags; our formats use fewer than 8
_BREAK: Final = object()  # returned by _item for the 0xff that ends an indefinite-length item
_SIMPLE: Final = {20: False, 21: True, 22: None, 23: cbor2.undefined}
_KEY_TYPES: Final = (int, str, bytes)


class _Reader:
    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, reason: str) -> DecodeError:
        return DecodeError(f"{self.what} is not valid CBOR: {reason} at byte {self.pos}")

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            raise self.fail(f"{count} bytes announced, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def head(self) -> tuple[int, int, int | None]:
        """(major type, additional info, argument); argument None for indefinite length."""
        if self.pos >= len(self.data):
            raise self.fail("truncated")
        initial = self.data[self.pos]
        self.pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info <= 27:
            return major, info, int.from_bytes(self.take(1 << (info - 24)), "big")
        if info == 31 and major in (2, 3, 4, 5, 7):
            return major, info, None
        raise self.fail(f"reserved additional information {info} for major type {major}")

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        # head() inlined for the one-byte heads that make up most of a message (hot path)
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] & 0x1F < 24:
            initial = data[pos]
            self.pos = pos + 1
            major, info, arg = initial >> 5, initial & 0x1F, initial & 0x1F
        else:
            major, info, arg = self.head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg  # type: ignore[operator]
        if major in (2, 3):
            raw = self.take(self._count(arg)) if arg is not None else self._chunks(major)
            return raw if major == 2 else self._text(raw)
        if major == 4:
            if arg is None:
                items = []
                while (value := self.item(depth + 1)) is not _BREAK:
                    items.append(value)
                return items
            return [self._value(depth + 1) for _ in range(self._count(arg))]
        if major == 5:
            return self._map(arg, depth + 1)
        if major == 6:
            return cbor2.CBORTag(arg, self._value(depth + 1))
        return self._simple(info, arg)

    def _value(self, depth: int) -> Any:
        value = self.item(depth)
        if value is _BREAK:
            raise self.fail("stray break byte")
        return value

    def _count(self, announced: int) -> int:
        # Every element takes at least one byte: refuse a count the input cannot hold before
        # allocating anything for it.
        if announced > len(self.data) - self.pos:
            raise self.fail(f"length {announced} exceeds the {len(self.data) - self.pos} "
                            "bytes left")
        return announced

    def _chunks(self, major: int) -> bytes:
        parts = []
        while True:
            chunk_major, _, arg = self.head()
            if chunk_major == 7 and arg is None:
                return b"".join(parts)
            if chunk_major != major or arg is None:
                raise self.fail("indefinite-length string with a chunk of another kind")
            part = self.take(self._count(arg))
            if major == 3:
                self._text(part)  # RFC 8949 §3.2.3: every chunk is valid UTF-8 on its own
            parts.append(part)

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")  # strict: also refuses encoded surrogates
        except UnicodeDecodeError as exc:
            raise self.fail(f"text string is not UTF-8 ({exc.reason})") from None

    def _map(self, arg: int | None, depth: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        remaining = None if arg is None else self._count(arg)
        while remaining is None or remaining > 0:
            at = self.pos
            key = self.item(depth)
            if key is _BREAK:
                if remaining is None:
                    return result
                raise self.fail("stray break byte")
            if not _is_key(key):
                self.pos = at
                raise self.fail(f"map key of type {_kind(key)}; only integers, text and "
                                "byte strings are keys here")
            if key in result:
                self.pos = at
                raise self.fail(f"map key {_short(key)} appears twice")
            result[key] = self._value(depth)
            if remaining is not None:
                remaining -= 1
        return result

    def _simple(self, info: int, arg: int | None) -> Any:
        if arg is None:
            return _BREAK
        if info == 25:
            return struct.unpack(">e", arg.to_bytes(2, "big"))[0]
        if info == 26:
            return struct.unpack(">f", arg.to_bytes(4, "big"))[0]
        if info == 27:
            return struct.unpack(">d", arg.to_bytes(8, "big"))[0]
        if info == 24 and arg < 32:
            raise self.fail(f"simple value {arg} in two bytes (RFC 8949 §3.3)")
        if arg in _SIMPLE:
            return _SIMPLE[arg]
        return cbor2.CBORSimpleValue(arg)


def _is_key(key: Any) -> bool:
    if type(key) in _KEY_TYPES:
        return True
    # a tag around an integer or text: RFC 9254 absolute SIDs (tag 47); not bignums (bytes)
    return isinstance(key, cbor2.CBORTag) and type(key.value) in (int, str)


def _kind(value: Any) -> str:
    if value is _BREAK:
        return "break"
    if isinstance(value, cbor2.CBORTag):
        return f"tag {value.tag}"
    return {bool: "boolean", float: "float", list: "array", dict: "map"}.get(
        type(value), type(value).__name__
    )


def _short(key: Any) -> str:
    text = key.value if isinstance(key, cbor2.CBORTag) else key
    return repr(text if not isinstance(text, str | bytes) else text[:40])


class _Unusual(Exception):
    """Input the fast path leaves to ``_Reader``: invalid, or valid but less common."""


_UNUSUAL = _Unusual()
_WIDTHS = {24: 1, 25: 2, 26: 4, 27: 8}


def _fast_item(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """(value, position after it) for the common shapes: integers, byte and text strings,
    definite-length arrays and maps with integer, text or byte-string keys, and tags. Exactly
    what ``_Reader.item`` makes of the same input; anything else (floats, simple values,
    indefinite lengths, tag keys, and every malformation) raises ``_Unusual``, IndexError or
    UnicodeDecodeError, and ``_Reader`` decodes the input instead: this path accepts nothing
    the reader refuses, with the same depth limit and the same count checks."""
    if depth > MAX_DEPTH:
        raise _UNUSUAL
    initial = data[pos]
    pos += 1
    major, arg = initial >> 5, initial & 0x1F
    if arg >= 24:
        width = _WIDTHS.get(arg)
        if width is None or pos + width > len(data):
            raise _UNUSUAL
        arg = int.from_bytes(data[pos:pos + width], "big")
        pos += width
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major == 2 or major == 3:
        end = pos + arg
        if end > len(data):
            raise _UNUSUAL
        raw = data[pos:end]
        return (raw if major == 2 else raw.decode("utf-8")), end
    if major == 4:
        if arg > len(data) - pos:  # every element takes at least one byte
            raise _UNUSUAL
        items = []
        for _ in range(arg):
            value, pos = _fast_item(data, pos, depth + 1)
            items.append(value)
        return items, pos
    if major == 5:
        if arg > len(data) - pos:
            raise _UNUSUAL
        result: dict[Any, Any] = {}
        for _ in range(arg):
            key, pos = _fast_item(data, pos, depth + 1)
            if type(key) not in _KEY_TYPES or key in result:
                raise _UNUSUAL
            result[key], pos = _fast_item(data, pos, depth + 1)
        return result, pos
    if major == 6:
        value, pos = _fast_item(data, pos, depth + 1)
        return cbor2.CBORTag(arg, value), pos
    raise _UNUSUAL


def loads_exact(data: bytes, what: str, max_size: int = MAX_SIZE) -> Any:
    """Decode exactly one CBOR item that fills ``data``."""
    if not isinstance(data, bytes | bytearray):
        raise UsageError(f"{what} input must be bytes, not {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"{what} of {len(data)} bytes exceeds {max_size}")
    if not data:
        raise DecodeError(f"empty {what}")
    data = bytes(data)
    try:
        value, end = _fast_item(data, 0, 0)
        if end == len(data):
            return value
    except (_Unusual, IndexError, UnicodeDecodeError):
        pass  # the reader below decodes it again and says what is wrong, if anything
    reader = _Reader(data, what)
    value = reader.item(0)
    if value is _BREAK:
        raise DecodeError(f"{what} is not valid CBOR: stray break byte")
    if reader.pos != len(data):
        raise DecodeError(f"{len(data) - reader.pos} bytes after the {what}")
    return value
