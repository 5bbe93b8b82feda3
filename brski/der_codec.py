"""Minimal DER (X.690 §10) writing and strict reading, for the fixed structures of brski.cms.

Only definite, minimal lengths and single-byte tags are read; anything else is a DerError, and
the caller decides what that means (brski.cms then lets asn1crypto judge the input).
"""

from __future__ import annotations

from functools import lru_cache

SEQUENCE, SET, INTEGER, OCTET_STRING, OID, UTC_TIME, GENERALIZED_TIME = (
    0x30, 0x31, 0x02, 0x04, 0x06, 0x17, 0x18,
)  # fmt: skip


class DerError(ValueError):
    """Input outside the strict DER subset this reader handles."""


# --- writing --------------------------------------------------------------------------------


def tlv(tag: int, *contents: bytes) -> bytes:
    body = b"".join(contents)
    return head(tag, len(body)) + body


def head(tag: int, n: int) -> bytes:
    """The tag and length octets of an element whose contents are ``n`` bytes long (a writer
    that knows the sizes joins headers and contents once instead of nesting tlv calls)."""
    if n < 0x80:
        return bytes((tag, n))
    size = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + n.to_bytes(size, "big")


def integer(value: int) -> bytes:
    size = value.bit_length() // 8 + 1  # room for the sign bit
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


@lru_cache(maxsize=64)
def oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return tlv(OID, bytes(out))


def set_of(*members: bytes) -> bytes:
    return tlv(SET, *sorted(members))  # X.690 §11.6: SET OF in ascending encoding order


# --- reading --------------------------------------------------------------------------------


def read(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the element at ``pos``."""
    if pos + 2 > end:
        raise DerError("truncated")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise DerError("multi-byte tag")
    pos += 2
    if first < 0x80:
        length = first
    else:
        size = first & 0x7F
        if size == 0 or size > 4 or pos + size > end:
            raise DerError("indefinite or oversized length")
        length = int.from_bytes(data[pos : pos + size], "big")
        if length < 0x80 or data[pos] == 0:
            raise DerError("non-minimal length")
        pos += size
    if pos + length > end:
        raise DerError("truncated")
    return tag, pos, pos + length


def items(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The elements that fill ``data[start:end]`` exactly: (tag, start of the element, start of
    its contents, end)."""
    # read() inlined: this loop runs for every element of every CMS message.
    out = []
    append = out.append
    while start < end:
        if start + 2 > end:
            raise DerError("truncated")
        tag, first = data[start], data[start + 1]
        if tag & 0x1F == 0x1F:
            raise DerError("multi-byte tag")
        cstart = start + 2
        if first < 0x80:
            length = first
        else:
            size = first & 0x7F
            if size == 0 or size > 4 or cstart + size > end:
                raise DerError("indefinite or oversized length")
            length = int.from_bytes(data[cstart : cstart + size], "big")
            if length < 0x80 or data[cstart] == 0:
                raise DerError("non-minimal length")
            cstart += size
        cend = cstart + length
        if cend > end:
            raise DerError("truncated")
        append((tag, start, cstart, cend))
        start = cend
    return out
