"""Vouchers and voucher-requests in CBOR with SIDs (RFC 9254 via rfc8366bis; cBRSKI §9.1).

The top-level key is the absolute SID of the container (2451 voucher, 2501 voucher-request);
inner keys are deltas from it (``nonce`` = 2458 - 2451 = 7). Binaries are byte strings, dates
text strings, the assertion a small integer. On input we also accept names instead of SIDs,
at either level and mixed (cBRSKI §9.1: a MASA MUST accept both), absolute SIDs as tag 47,
and the assertion by name. We always emit SIDs in ascending order.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import cbor2

from .cbor_strict import MAX_SIZE, SHORT_HEADS, loads_exact
from .cbor_strict import dumps as cbor_dumps
from .cbor_strict import head as cbor_head
from .errors import DecodeError, ValidationError
from .voucher_model import (
    LEAF_BY_NAME,
    LEAVES,
    Assertion,
    Leaf,
    LeafType,
    Voucher,
    VoucherArtifact,
    VoucherRequest,
    artifact_class,
    build,
    cbor_wire_form,
    ignored_in,
    parse_datetime,
)

SID_TAG = 47  # RFC 9254 §3.2: an absolute SID used where a delta is expected
A = TypeVar("A", bound=VoucherArtifact)


@overload
def decode_cbor(data: bytes, expect: type[A]) -> A: ...
@overload
def decode_cbor(data: bytes, expect: None = None) -> VoucherArtifact: ...
def decode_cbor(data: bytes, expect: type[VoucherArtifact] | None = None) -> Any:
    """Parse a CBOR voucher or voucher-request (SID keys, names, or both)."""
    doc = loads_exact(data, "CBOR voucher")
    if not isinstance(doc, dict) or len(doc) != 1:
        raise DecodeError("a CBOR voucher is a map with exactly one entry")
    ((top, container),) = doc.items()
    # a tuple: ``int | str`` would build a new union object on every call
    cls = artifact_class(top) if isinstance(top, (int, str)) else None
    if cls is None:
        raise DecodeError(f"unknown top-level key {str(top)[:60]!r}")
    if expect is not None and cls is not expect:
        raise ValidationError(f"expected {expect.MODULE}:voucher, got {cls.MODULE}:voucher")
    if not isinstance(container, dict):
        raise DecodeError("voucher container is not a CBOR map")

    by_sid = _BY_SID[cls.IS_REQUEST]
    by_delta = _BY_DELTA[cls.IS_REQUEST]
    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    unknown: list[tuple[Any, Any]] = []
    for key, raw in container.items():
        # the usual key, a delta SID of a leaf this kind reads (bool is not int here)
        known = by_delta.get(key) if type(key) is int else None
        if known is not None:
            leaf, name, plain = known
            if name in values:
                raise DecodeError(f"{name} given twice (by SID and by name)")
            # the usual value, of the leaf's exact type: a byte or text string as it is
            values[name] = raw if type(raw) is plain else _from_cbor(leaf, raw)
            if leaf.type is LeafType.DATETIME:
                texts[name] = raw
            continue
        leaf = _leaf_for(key, cls, by_sid)
        if leaf is None or ignored_in(cls, leaf):
            unknown.append((key, raw))
            continue
        if leaf.name in values:
            raise DecodeError(f"{leaf.name} given twice (by SID and by name)")
        values[leaf.name] = _from_cbor(leaf, raw)
        if leaf.type is LeafType.DATETIME:
            texts[leaf.name] = raw
    return build(cls, values, cbor_wire_form(texts, tuple(unknown)))


def encode_cbor(artifact: VoucherArtifact) -> bytes:
    """``{top SID: {delta: value, ...}}`` in ascending delta order, as the cBRSKI examples.
    Unknown entries decoded from CBOR follow, unchanged."""
    artifact.check_types()
    return encode_checked_cbor(artifact)


def encode_checked_cbor(artifact: VoucherArtifact) -> bytes:
    """``encode_cbor`` for an artifact whose types were just checked (``validate()`` does
    that: signing validates first, and checking twice costs a signer time for nothing)."""
    if not artifact.wire.unknown_cbor:
        try:
            return _encode_known(artifact)
        except UnicodeEncodeError:
            pass  # a lone surrogate: the general path below reports it
    top = artifact.TOP_SID
    body: dict[Any, Any] = {}
    for leaf, attr, delta, _ in _ENCODE_PLAN[artifact.IS_REQUEST]:  # SID order
        value = getattr(artifact, attr)
        if value is None or value == ():
            continue
        body[delta] = value if type(value) is bytes or type(value) is str \
            else _to_cbor(artifact, leaf, value)
    for key, value in artifact.wire.unknown_cbor:
        body.setdefault(key, value)
    try:
        return cbor_dumps({top: body})
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:  # unknown_cbor odd values
        raise DecodeError(f"cannot re-encode voucher: {exc}") from exc


def _encode_known(artifact: VoucherArtifact) -> bytes:
    """The same bytes as the general path for an artifact without unknown entries, put
    together entry by entry: strings, the assertion and dates directly, the rest (boolean,
    extensions) through ``_to_cbor``."""
    fields = artifact.__dict__  # a plain dataclass: every field is in it (as check_types)
    parts: list[bytes] = []
    count = 0
    for leaf, attr, _, key in _ENCODE_PLAN[artifact.IS_REQUEST]:
        value = fields[attr]
        if value is None:
            continue
        kind = type(value)
        if kind is bytes:
            size = len(value)
            parts += (key, _BSTR_HEADS[size] if size < 24 else cbor_head(2, size), value)
        elif kind is str:
            raw = value.encode("utf-8")
            size = len(raw)
            parts += (key, _TSTR_HEADS[size] if size < 24 else cbor_head(3, size), raw)
        elif kind is Assertion:
            parts += (key, _ASSERTION_CBOR[value])
        elif leaf.type is LeafType.DATETIME:
            raw = artifact.wire_text(leaf.name).encode("utf-8")  # type: ignore[union-attr]
            size = len(raw)
            parts += (key, _TSTR_HEADS[size] if size < 24 else cbor_head(3, size), raw)
        elif value != ():
            parts += (key, cbor_dumps(_to_cbor(artifact, leaf, value)))
        else:
            continue
        count += 1
    return b"".join((_TOP_HEADS[artifact.IS_REQUEST], cbor_head(5, count), *parts))


_BY_SID: dict[bool, dict[int | None, Leaf]] = {
    request: {leaf.sid(request): leaf for leaf in LEAVES} for request in (False, True)
}


# delta SID -> (leaf, name, exact Python type its value has on the wire when plain: bytes or
# str, else None), for the leaves each kind reads (a voucher-only leaf in a request is
# ignored, RFC 8995 §3.4: not listed, so it takes the long way and is kept as unknown).
_PLAIN_ON_WIRE = {LeafType.BINARY: bytes, LeafType.STRING: str}
_BY_DELTA: dict[bool, dict[int, tuple[Leaf, str, type | None]]] = {
    request: {sid - top: (leaf, leaf.name, _PLAIN_ON_WIRE.get(leaf.type))
              for sid, leaf in _BY_SID[request].items()
              if sid is not None and (leaf.in_request if request else leaf.in_voucher)}
    for request, top in ((False, Voucher.TOP_SID), (True, VoucherRequest.TOP_SID))
}
# (leaf, attribute, delta SID, the delta's CBOR encoding) of each kind's leaves in SID order,
# and the head of the one-entry top map with its SID key, for encode_cbor.
_ENCODE_PLAN: dict[bool, tuple[tuple[Leaf, str, int, bytes], ...]] = {
    request: tuple((leaf, leaf.attr, delta, cbor_head(0, delta))
                   for leaf in (VoucherRequest if request else Voucher).leaves()
                   for delta in (leaf.sid(request) - top,))  # type: ignore[operator]
    for request, top in ((False, Voucher.TOP_SID), (True, VoucherRequest.TOP_SID))
}
_TOP_HEADS: dict[bool, bytes] = {
    request: cbor_head(5, 1) + cbor_head(0, cls.TOP_SID)
    for request, cls in ((False, Voucher), (True, VoucherRequest))
}


def _leaf_for(key: Any, cls: type[VoucherArtifact], by_sid: dict[int | None, Leaf]) -> Leaf | None:
    if type(key) is int:  # not bool: CBOR true must not read as delta 1
        return by_sid.get(cls.TOP_SID + key)
    if isinstance(key, cbor2.CBORTag) and key.tag == SID_TAG and type(key.value) is int:
        return by_sid.get(key.value)
    if isinstance(key, str):
        prefix, sep, local = key.partition(":")
        if sep and prefix != cls.MODULE:
            return None
        return LEAF_BY_NAME.get(local if sep else key)
    return None


def _from_cbor(leaf: Leaf, raw: Any) -> Any:
    kind = leaf.type
    if kind is LeafType.ASSERTION:
        if type(raw) is int:
            member = _ASSERTION_BY_INT.get(raw)  # Assertion(raw) is slower, same member
            return member if member is not None else Assertion.from_int(raw)
        if isinstance(raw, str):  # name-keyed maps sometimes carry the name, too
            return Assertion.from_yang_name(raw)
        raise DecodeError("assertion must be an integer")
    if kind is LeafType.BINARY:
        if not isinstance(raw, bytes):
            raise DecodeError(f"{leaf.name} must be a byte string")
        return raw
    if kind is LeafType.BOOLEAN:
        if not isinstance(raw, bool):
            raise DecodeError(f"{leaf.name} must be a boolean")
        return raw
    if kind is LeafType.EXTENSIONS:
        if not isinstance(raw, list) or not all(_is_extension_item(i) for i in raw):
            raise DecodeError("extensions must be an array of uint64 or text")
        return tuple(raw)
    if not isinstance(raw, str):
        raise DecodeError(f"{leaf.name} must be a text string")
    if kind is LeafType.DATETIME:
        return parse_datetime(raw)
    return raw


_ASSERTION_BY_INT = {int(member): member for member in Assertion}
_ASSERTION_CBOR = {member: cbor_head(0, int(member)) for member in Assertion}
# one-byte heads of short byte and text strings (a head() call costs more than the lookup)
_BSTR_HEADS, _TSTR_HEADS = SHORT_HEADS[2], SHORT_HEADS[3]


def _to_cbor(artifact: VoucherArtifact, leaf: Leaf, value: Any) -> Any:
    if leaf.type is LeafType.ASSERTION:
        return int(value)
    if leaf.type is LeafType.DATETIME:
        return artifact.wire_text(leaf.name)
    if leaf.type is LeafType.EXTENSIONS:
        return list(value)
    return value


def _is_extension_item(item: Any) -> bool:
    return isinstance(item, str) or (type(item) is int and 0 <= item < 2**64)


__all__ = ["MAX_SIZE", "decode_cbor", "encode_cbor"]
