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

Everything else raises DecodeError; nothing else escapes. ``bench/cbor_decode.py`` measures
the cost against cbor2's C decoder.

``dumps`` encodes: the plain values our formats write (integers, byte and text strings, lists,
dicts, booleans, null) it puts together itself, byte for byte what ``cbor2.dumps`` writes
(definite lengths, shortest heads, dict order kept); anything else goes to ``cbor2.dumps``.
A call into cbor2's encoder costs more than encoding a voucher by hand.
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
_FAST_SIMPLE: Final = {0xF4: False, 0xF5: True, 0xF6: None, 0xF7: cbor2.undefined}


def _fast_item(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """(value, position after it) for the common shapes: integers, byte and text strings,
    false/true/null/undefined, definite-length arrays and maps with integer, text or
    byte-string keys, and tags. Exactly what ``_Reader.item`` makes of the same input;
    anything else (floats, other simple values, indefinite lengths, tag keys, and every
    malformation) raises ``_Unusual``, IndexError or UnicodeDecodeError, and ``_Reader``
    decodes the input instead: this path accepts nothing the reader refuses, with the same
    depth limit and the same count checks."""
    if depth > MAX_DEPTH:
        raise _UNUSUAL
    initial = data[pos]
    pos += 1
    major, arg = initial >> 5, initial & 0x1F
    if arg >= 24:  # one or two bytes read directly; past the end is an IndexError
        if arg == 24:
            arg = data[pos]
            pos += 1
        elif arg == 25:
            arg = data[pos] << 8 | data[pos + 1]
            pos += 2
        else:
            arg, pos = _long_argument(data, pos, arg)
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
    if major == 6:
        value, pos = _fast_item(data, pos, depth + 1)
        return cbor2.CBORTag(arg, value), pos
    if major == 7:
        if initial in _FAST_SIMPLE:
            return _FAST_SIMPLE[initial], pos
        raise _UNUSUAL
    # An array's elements, or a map's keys and values, all one level deeper. An element that
    # is an integer or a string (most of them) is decoded right here, without a call: the
    # same steps as above, written out once for array elements, map keys and map values.
    size = len(data)
    if arg > size - pos:  # every element takes at least one byte (_Reader._count)
        raise _UNUSUAL
    if arg and depth >= MAX_DEPTH:  # the elements would be nested too deep
        raise _UNUSUAL
    depth += 1
    if major == 4:
        items: list[Any] = []
        append = items.append
        for _ in range(arg):
            initial = data[pos]
            if initial >= 0x80:  # array, map, tag or simple value
                value, pos = _fast_item(data, pos, depth)
                append(value)
                continue
            pos += 1
            n = initial & 0x1F
            if n >= 24:
                if n == 24:
                    n = data[pos]
                    pos += 1
                elif n == 25:
                    n = data[pos] << 8 | data[pos + 1]
                    pos += 2
                else:
                    n, pos = _long_argument(data, pos, n)
            if initial < 0x20:
                append(n)
            elif initial < 0x40:
                append(-1 - n)
            else:
                end = pos + n
                if end > size:
                    raise _UNUSUAL
                append(data[pos:end] if initial < 0x60 else data[pos:end].decode("utf-8"))
                pos = end
        return items, pos
    result: dict[Any, Any] = {}
    for _ in range(arg):
        initial = data[pos]
        if initial >= 0x80:
            key, pos = _fast_item(data, pos, depth)
            if type(key) not in _KEY_TYPES:
                raise _UNUSUAL  # tag keys (SIDs) and refused keys: the reader sorts them out
        else:
            pos += 1
            n = initial & 0x1F
            if n >= 24:
                if n == 24:
                    n = data[pos]
                    pos += 1
                elif n == 25:
                    n = data[pos] << 8 | data[pos + 1]
                    pos += 2
                else:
                    n, pos = _long_argument(data, pos, n)
            if initial < 0x20:
                key = n
            elif initial < 0x40:
                key = -1 - n
            else:
                end = pos + n
                if end > size:
                    raise _UNUSUAL
                key = data[pos:end] if initial < 0x60 else data[pos:end].decode("utf-8")
                pos = end
        if key in result:
            raise _UNUSUAL  # a key twice
        initial = data[pos]
        if initial >= 0x80:
            result[key], pos = _fast_item(data, pos, depth)
            continue
        pos += 1
        n = initial & 0x1F
        if n >= 24:
            if n == 24:
                n = data[pos]
                pos += 1
            elif n == 25:
                n = data[pos] << 8 | data[pos + 1]
                pos += 2
            else:
                n, pos = _long_argument(data, pos, n)
        if initial < 0x20:
            result[key] = n
        elif initial < 0x40:
            result[key] = -1 - n
        else:
            end = pos + n
            if end > size:
                raise _UNUSUAL
            result[key] = data[pos:end] if initial < 0x60 else data[pos:end].decode("utf-8")
            pos = end
    return result, pos


def _long_argument(data: bytes, pos: int, info: int) -> tuple[int, int]:
    """The 4- or 8-byte argument of a head (additional information 26, 27) and the position
    after it; anything else is for the reader."""
    if info > 27:
        raise _UNUSUAL
    end = pos + (1 << (info - 24))
    if end > len(data):
        raise _UNUSUAL
    return int.from_bytes(data[pos:end], "big"), end


def loads_exact(data: bytes, what: str, max_size: int = MAX_SIZE) -> Any:
    """Decode exactly one CBOR item that fills ``data``."""
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray):
            raise UsageError(f"{what} input must be bytes, not {type(data).__name__}")
        data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"{what} of {len(data)} bytes exceeds {max_size}")
    if not data:
        raise DecodeError(f"empty {what}")
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


# --- encoding -------------------------------------------------------------------------------

# the one-byte heads (argument below 24) of each major type, worked out once
SHORT_HEADS: Final = tuple(tuple(bytes((major << 5 | n,)) for n in range(24))
                            for major in range(8))
_SIMPLE_BYTES: Final = {False: b"\xf4", True: b"\xf5", None: b"\xf6"}


def head(major: int, n: int) -> bytes:
    """A CBOR head (RFC 8949 §3) with the shortest argument, as cbor2 writes it."""
    if n < 24:
        return SHORT_HEADS[major][n]
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25, n >> 8, n & 0xFF))
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


def dumps(value: Any) -> bytes:
    """``cbor2.dumps(value)``, the same bytes and the same errors; plain values are encoded
    here (see the module docstring)."""
    out: list[bytes] = []
    try:
        _plain(value, out.append)
    except (_Unusual, UnicodeEncodeError, RecursionError):
        return cbor2.dumps(value)  # or its error, as before
    return b"".join(out)


def _plain(value: Any, put: Any) -> None:
    kind = type(value)  # exact types: subclasses (IntEnum, ...) are cbor2's to encode
    if kind is bytes:
        put(head(2, len(value)))
        put(value)
    elif kind is str:
        raw = value.encode("utf-8")  # strict: a lone surrogate raises, and cbor2 says so
        put(head(3, len(raw)))
        put(raw)
    elif kind is int:
        if value >= 0:
            if value >= 1 << 64:
                raise _UNUSUAL  # a bignum (tag 2)
            put(head(0, value))
        else:
            if value < -(1 << 64):
                raise _UNUSUAL  # a bignum (tag 3)
            put(head(1, -1 - value))
    elif kind is dict:
        put(head(5, len(value)))
        for key, item in value.items():
            _plain(key, put)
            _plain(item, put)
    elif kind is list:
        put(head(4, len(value)))
        for item in value:
            _plain(item, put)
    elif kind is bool or value is None:
        put(_SIMPLE_BYTES[value])
    else:
        raise _UNUSUAL
