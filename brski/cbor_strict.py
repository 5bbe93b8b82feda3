"""One strict entry point to cbor2 for everything the library decodes from the network.

cbor2 quirks this hides: ``cbor2.loads`` silently ignores bytes after the first item, and
besides ``CBORDecodeError`` its semantic-tag decoders can raise ValueError, TypeError,
OverflowError, RecursionError... on hostile input. Here all of that becomes DecodeError.
(Not hidden: duplicate map keys, which cbor2 collapses with the last value winning.)
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from .errors import DecodeError

MAX_SIZE = 256 * 1024  # a voucher-request with a prior request and two chains is a few KiB


def loads_exact(data: bytes, what: str, max_size: int = MAX_SIZE) -> Any:
    """Decode exactly one CBOR item that fills ``data``."""
    if not isinstance(data, bytes | bytearray):
        raise DecodeError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"{what} larger than {max_size} bytes")
    stream = io.BytesIO(bytes(data))
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # see the module docstring: any cbor2 failure is bad input
        raise DecodeError(f"{what} is not valid CBOR: {exc}") from exc
    if stream.tell() != len(data):
        raise DecodeError(f"{what} has {len(data) - stream.tell()} bytes after the CBOR item")
    return value
