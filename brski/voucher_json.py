"""Vouchers and voucher-requests in JSON (RFC 7951 encoding of the YANG data, RFC 8366 §5.3).

``{"ietf-voucher:voucher": {...}}`` / ``{"ietf-voucher-request:voucher": {...}}``; binaries in
base64, dates as yang:date-and-time strings, the assertion by name. Member names may carry
their own module prefix (RFC 7951 §4). Decoding keeps the received text of binaries and dates
and the member order, so decode -> encode reproduces the input byte for byte when it was
compact JSON (no whitespace), as every published example is.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, overload

from .errors import DecodeError, ValidationError
from .json_strict import loads_strict
from .voucher_model import (
    LEAF_BY_NAME,
    VOUCHER_MODULE,
    VOUCHER_REQUEST_MODULE,
    Assertion,
    Leaf,
    LeafType,
    VoucherArtifact,
    WireForm,
    artifact_class,
    b64decode_lenient,
    build,
    ignored_in,
    parse_datetime,
)

MAX_SIZE = 256 * 1024  # an RVR with a prior PVR and two chains is a few KiB
A = TypeVar("A", bound=VoucherArtifact)


@overload
def decode_json(data: bytes | str, expect: type[A]) -> A: ...
@overload
def decode_json(data: bytes | str, expect: None = None) -> VoucherArtifact: ...
def decode_json(data: bytes | str, expect: type[VoucherArtifact] | None = None) -> Any:
    """Parse a JSON voucher or voucher-request; ``expect`` restricts it to one class.

    Raises DecodeError (not JSON, wrong types) or ValidationError (leaf of the wrong module,
    no serial-number, unknown assertion). Call ``validate()`` for the remaining rules.
    """
    if len(data) > MAX_SIZE:
        raise DecodeError(f"JSON voucher larger than {MAX_SIZE} bytes")
    doc = loads_strict(data, "JSON voucher")
    if not isinstance(doc, dict) or len(doc) != 1:
        raise DecodeError("a voucher is a JSON object with exactly one member")
    ((top, container),) = doc.items()
    cls = artifact_class(top)
    if cls is None:
        raise DecodeError(f"unknown top-level member {top[:60]!r}")
    if expect is not None and cls is not expect:
        raise ValidationError(f"expected {expect.MODULE}:voucher, got {top}")
    if not isinstance(container, dict):
        raise DecodeError(f"{top} is not a JSON object")

    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    unknown: list[tuple[str, Any]] = []
    members = _MEMBERS[cls.IS_REQUEST]
    for member, raw in container.items():
        known = members.get(member)
        if known is None:
            leaf = _leaf_for(member, cls.MODULE)
            if leaf is None or ignored_in(cls, leaf):
                unknown.append((member, raw))
                continue
            known = leaf, leaf.type in (LeafType.BINARY, LeafType.DATETIME)
        leaf, keep_text = known
        if leaf.name in values:
            raise DecodeError(f"{leaf.name} given twice")
        values[leaf.name] = _from_json(leaf, raw)
        if keep_text:
            texts[leaf.name] = raw
    wire = WireForm(texts=texts, order=tuple(container), unknown_json=tuple(unknown))
    return build(cls, values, wire)


def encode_json(artifact: VoucherArtifact) -> bytes:
    """Compact RFC 7951 JSON. Members keep the order they were received in; new ones follow
    in SID order. Unknown members decoded from JSON are re-emitted in place."""
    artifact.check_types()
    return encode_checked_json(artifact)


def encode_checked_json(artifact: VoucherArtifact) -> bytes:
    """``encode_json`` for an artifact whose types were just checked (``validate()`` does
    that: signing validates first, and checking twice costs a signer time for nothing)."""
    present = artifact.present()
    unknown = dict(artifact.wire.unknown_json)
    body: dict[str, Any] = {}
    for member in artifact.wire.order:
        if member in unknown:
            body[member] = unknown[member]
            continue
        leaf = _leaf_for(member, artifact.MODULE)
        if leaf is not None and leaf.name in present:
            body[member] = _to_json(artifact, leaf, present.pop(leaf.name))
    for name, value in present.items():
        body[name] = _to_json(artifact, LEAF_BY_NAME[name], value)
    return _ENCODER.encode({artifact.top_name: body}).encode("utf-8")


# One encoder for every call: json.dumps with arguments builds a new one each time. Compact,
# UTF-8 text as it is (RFC 8259 §8.1), keys in the order given.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _leaf_for(member: str, module: str) -> Leaf | None:
    """A member name, plain or qualified with the container's own module, as a leaf."""
    prefix, sep, local = member.partition(":")
    if sep:
        if prefix != module:
            return None  # another module's data, e.g. "extension:..." (rfc8366bis §8.6)
        member = local
    return LEAF_BY_NAME.get(member)


# Member name (plain or qualified with the module) -> (leaf, keep its text) for the leaves an
# artifact kind reads (key: IS_REQUEST), worked out once; other names take _leaf_for's way.
_MEMBERS: dict[bool, dict[str, tuple[Leaf, bool]]] = {
    request: {
        name: (leaf, leaf.type in (LeafType.BINARY, LeafType.DATETIME))
        for leaf in LEAF_BY_NAME.values()
        if leaf.in_request or not request  # as ignored_in: a request reads its own leaves
        for name in (leaf.name, f"{module}:{leaf.name}")
    }
    for request, module in ((False, VOUCHER_MODULE), (True, VOUCHER_REQUEST_MODULE))
}


def _from_json(leaf: Leaf, raw: Any) -> Any:
    kind = leaf.type
    if kind is LeafType.BOOLEAN:
        if not isinstance(raw, bool):
            raise DecodeError(f"{leaf.name} must be a JSON boolean")
        return raw
    if kind is LeafType.EXTENSIONS:
        # RFC 7951 §6.1 writes uint64 as a string; accept bare numbers from lax encoders.
        if not isinstance(raw, list) or not all(_is_extension_item(i) for i in raw):
            raise DecodeError("extensions must be a list of strings or uint64")
        return tuple(raw)
    if not isinstance(raw, str):
        raise DecodeError(f"{leaf.name} must be a JSON string")
    if kind is LeafType.ASSERTION:
        return Assertion.from_yang_name(raw)
    if kind is LeafType.BINARY:
        return b64decode_lenient(raw)
    if kind is LeafType.DATETIME:
        return parse_datetime(raw)
    return raw


def _to_json(artifact: VoucherArtifact, leaf: Leaf, value: Any) -> Any:
    if leaf.type is LeafType.ASSERTION:
        return value.yang_name
    if leaf.type in (LeafType.BINARY, LeafType.DATETIME):
        return artifact.wire_text(leaf.name)
    if leaf.type is LeafType.EXTENSIONS:
        return list(value)
    return value


def _is_extension_item(item: Any) -> bool:
    if isinstance(item, bool):
        return False
    return isinstance(item, str) or (isinstance(item, int) and 0 <= item < 2**64)


__all__ = ["MAX_SIZE", "decode_json", "encode_checked_json", "encode_json"]
