"""One strict entry point to cbor2 for everything the library decodes from the network.

cbor2 quirks this hides: ``cbor2.loads`` silently ignores bytes after the first item; a stray
break byte (0xff where an item should start) comes back as a marker object instead of an
error; shared-value tags (28/29) can build cyclic structures; and besides
``CBORDecodeError`` its semantic-tag decoders can raise ValueError, TypeError,
OverflowError, RecursionError... on hostile input. Here all of that becomes DecodeError.
(Not hidden: duplicate map keys, which cbor2 collapses with the last value winning.)
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any, Final

import cbor2

from .errors import DecodeError, UsageError

MAX_SIZE = 256 * 1024  # a voucher-request with a prior request and two chains is a few KiB
_BREAK: Final = cbor2.loads(b"\xff")  # the marker cbor2 returns for a stray break byte


def loads_exact(data: bytes, what: str, max_size: int = MAX_SIZE) -> Any:
    """Decode exactly one CBOR item that fills ``data`` and holds only plain CBOR data."""
    if not isinstance(data, bytes | bytearray):
        raise UsageError(f"{what} input must be bytes, not {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"{what} of {len(data)} bytes exceeds {max_size}")
    if not data:
        raise DecodeError(f"empty {what}")
    stream = io.BytesIO(bytes(data))
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # see the module docstring: any cbor2 failure is bad input
        raise DecodeError(f"{what} is not valid CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise DecodeError(f"{len(data) - stream.tell()} bytes after the {what}")
    _check_plain(value, what)
    return value


def _check_plain(item: Any, what: str) -> None:
    seen: set[int] = set()  # mutable containers only: () and frozenset() are shared singletons
    stack = [item]
    while stack:
        node = stack.pop()
        if node is _BREAK:
            raise DecodeError(f"{what} is not valid CBOR: stray break byte")
        if isinstance(node, list | dict | set | cbor2.CBORTag):
            if id(node) in seen:
                raise DecodeError(f"{what} uses shared or cyclic CBOR values")
            seen.add(id(node))
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, cbor2.CBORTag):
            stack.append(node.value)
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend(node)
