"""Vouchers and voucher-requests: the data model and both payload encodings, in one import.

    from brski import voucher
    v = voucher.decode_json(data)            # or decode_cbor / decode_payload
    v.validate(now=now)                      # RFC 8366 / 8995 / rfc8366bis rules
    voucher.encode_cbor(v)                   # SID-keyed CBOR for cBRSKI

* ``Voucher`` and ``VoucherRequest`` (frozen dataclasses, one per YANG module, built from the
  single leaf table ``LEAVES`` with every leaf's SID) — see ``voucher_model``.
* JSON (RFC 7951) — ``voucher_json``; CBOR with SIDs (RFC 9254) — ``voucher_cbor``.
* Signing and verification (CMS for JSON, COSE_Sign1 for CBOR) — ``signed_voucher``.

Decoders raise only ``DecodeError`` / ``ValidationError``; wrong Python types in a hand-built
artifact raise ``UsageError`` at encoding time.
"""

from .errors import DecodeError
from .voucher_cbor import decode_cbor, encode_cbor
from .voucher_json import decode_json, encode_json
from .voucher_model import (
    LEAF_BY_NAME,
    LEAVES,
    NONCE_MAX,
    NONCE_MIN,
    VOUCHER_MODULE,
    VOUCHER_REQUEST_MODULE,
    VOUCHER_REQUEST_SID,
    VOUCHER_SID,
    Assertion,
    Leaf,
    LeafType,
    Voucher,
    VoucherArtifact,
    VoucherRequest,
    WireForm,
    b64decode_lenient,
    b64encode,
    format_datetime,
    parse_datetime,
)


def decode_payload(data: bytes, expect: type[VoucherArtifact] | None = None) -> VoucherArtifact:
    """An unsigned voucher payload in either encoding: JSON starts with ``{`` (after optional
    whitespace), anything else is taken as CBOR."""
    if not isinstance(data, bytes | bytearray):
        raise DecodeError("voucher payload must be bytes")
    if bytes(data).lstrip()[:1] == b"{":
        return decode_json(bytes(data), expect)
    return decode_cbor(bytes(data), expect)


__all__ = [
    "LEAF_BY_NAME",
    "LEAVES",
    "NONCE_MAX",
    "NONCE_MIN",
    "VOUCHER_MODULE",
    "VOUCHER_REQUEST_MODULE",
    "VOUCHER_REQUEST_SID",
    "VOUCHER_SID",
    "Assertion",
    "Leaf",
    "LeafType",
    "Voucher",
    "VoucherArtifact",
    "VoucherRequest",
    "WireForm",
    "b64decode_lenient",
    "b64encode",
    "decode_cbor",
    "decode_json",
    "decode_payload",
    "encode_cbor",
    "encode_json",
    "format_datetime",
    "parse_datetime",
]
