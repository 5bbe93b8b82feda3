"""EST payloads (RFC 7030, with the RFC 8951 clarifications) as BRSKI uses them.

* ``/cacerts``, ``/simpleenroll``, ``/simplereenroll`` answer with a "certs-only" CMS
  SignedData (PKCS#7, no signers) — ``encode_certs_only`` / ``decode_certs_only``;
* ``/simpleenroll`` and ``/simplereenroll`` take a PKCS#10 CSR — ``decode_csr_body``;
* ``/csrattrs`` answers with ``CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID`` (RFC 7030
  §4.5.2) — ``encode_csrattrs`` / ``decode_csrattrs``.

Transfer encoding: RFC 8951 §3 settles that these HTTP bodies are base64 (RFC 4648 §4) of the
DER, whatever Content-Transfer-Encoding says, and that receivers tolerate whitespace in it.
``encode_base64`` writes 64-character lines (what openssl and curl-based tools expect);
``decode_base64`` ignores all whitespace. BRSKI keeps ``requestvoucher`` binary (RFC 8995
§6), so none of this applies there.

Sans-IO; decoders raise only ``DecodeError`` (or ``ValidationError`` for a CSR whose
signature does not verify).
"""

from __future__ import annotations

import binascii
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .der_kind import describe, refusal
from .errors import DecodeError, UsageError, ValidationError

MEDIA_CERTS_ONLY: Final = "application/pkcs7-mime; smime-type=certs-only"
MEDIA_PKCS7: Final = "application/pkcs7-mime"
MEDIA_PKCS10: Final = "application/pkcs10"
MEDIA_CSRATTRS: Final = "application/csrattrs"
# A CSR or a certs-only bundle of a few certificates is a few KiB; refuse anything far larger.
MAX_BODY: Final = 256 * 1024

OID_ECDSA_WITH_SHA256: Final = "1.2.840.10045.4.3.2"
OID_ECDSA_WITH_SHA384: Final = "1.2.840.10045.4.3.3"

_BASE64: Final = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_WHITESPACE: Final = re.compile(rb"[ \t\r\n]+")


def encode_base64(der: bytes) -> bytes:
    """Base64 of ``der`` in 64-character lines, each ending in CRLF-free ``\\n``."""
    text = binascii.b2a_base64(der, newline=False)
    return b"".join(text[i:i + 64] + b"\n" for i in range(0, len(text), 64))


def decode_base64(body: bytes) -> bytes:
    """Strict base64 once whitespace is removed (RFC 8951 §3)."""
    if not isinstance(body, bytes | bytearray):
        raise UsageError("EST body must be bytes")
    if len(body) > MAX_BODY:
        raise DecodeError(f"EST body of {len(body)} bytes exceeds {MAX_BODY}")
    compact = _WHITESPACE.sub(b"", bytes(body))
    if not compact:
        raise DecodeError("empty EST body")
    if not _BASE64.fullmatch(compact) or len(compact) % 4:
        raise DecodeError("EST body is not base64")
    try:
        return binascii.a2b_base64(compact, strict_mode=True)
    except binascii.Error as exc:
        raise DecodeError("EST body is not valid base64 (padding in the wrong place)") from exc


# --- certs-only ---------------------------------------------------------------------------


def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """DER of a degenerate SignedData carrying ``certs`` (RFC 7030 §4.1.3). ``certificates``
    is a SET OF, so DER sorts them: do not rely on their order."""
    if not certs or not all(isinstance(c, x509.Certificate) for c in certs):
        raise UsageError("certs-only needs at least one x509.Certificate")
    return pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)


def decode_certs_only(der: bytes) -> list[x509.Certificate]:
    """The certificates of a certs-only SignedData (DER)."""
    if len(der) > MAX_BODY:
        raise DecodeError(f"PKCS#7 of {len(der)} bytes exceeds {MAX_BODY}")
    got = describe(bytes(der))
    if got.startswith(("a DER SEQUENCE followed by", "a DER SEQUENCE cut short")):
        # cryptography would warn and re-read it as BER, extra bytes and all
        raise DecodeError(f"expected a PKCS#7 certs-only structure (RFC 7030 §4.1.3), got {got}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "falling back to parsing as BER"
            certs = pkcs7.load_der_pkcs7_certificates(bytes(der))
    except Exception as exc:  # ValueError for junk; other types for unsupported structures
        raise DecodeError(refusal("a PKCS#7 certs-only structure (RFC 7030 §4.1.3)",
                                  bytes(der), rule="after the base64 was removed")) from exc
    if not certs:
        raise DecodeError("PKCS#7 certs-only structure holds no certificate")
    return certs


# --- CSRs ---------------------------------------------------------------------------------


def encode_csr_body(csr: x509.CertificateSigningRequest) -> bytes:
    """The body of a simpleenroll request: base64 of the CSR's DER."""
    return encode_base64(csr.public_bytes(serialization.Encoding.DER))


def decode_csr_body(body: bytes) -> x509.CertificateSigningRequest:
    """A simpleenroll/simplereenroll body as a CSR whose self-signature verifies.

    RFC 8951 base64 is the standard; a raw DER body (first byte 0x30, which is not a base64
    character) and a PEM body are accepted too, since some EST clients send them.
    """
    if not isinstance(body, bytes | bytearray):
        raise UsageError("EST body must be bytes")
    body = bytes(body)
    if len(body) > MAX_BODY:
        raise DecodeError(f"CSR body of {len(body)} bytes exceeds {MAX_BODY}")
    if body.lstrip().startswith(b"-----BEGIN"):
        try:
            csr = x509.load_pem_x509_csr(body)
        except Exception as exc:  # ValueError, InvalidVersion
            raise DecodeError(_csr_refusal(exc, body)) from exc
    else:
        der = body if body[:1] == b"\x30" else decode_base64(body)
        try:
            csr = x509.load_der_x509_csr(der)
        except Exception as exc:  # ValueError, InvalidVersion
            raise DecodeError(_csr_refusal(exc, der)) from exc
    _read_everything(csr)
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # an algorithm cryptography cannot check
        raise ValidationError(f"CSR signature algorithm {_signature_oid(csr)} cannot be "
                              "checked") from exc
    if not valid:
        raise ValidationError("CSR signature does not verify (proof of possession failed)")
    return csr


def _csr_refusal(exc: Exception, data: bytes) -> str:
    if isinstance(exc, x509.InvalidVersion):
        return (f"PKCS#10 request with version field {exc.parsed_version}: the only version "
                "is v1, written 0 (RFC 2986 §4.1)")
    if data.lstrip().startswith(b"-----BEGIN CERTIFICATE REQUEST"):
        return "PEM CERTIFICATE REQUEST whose content is not a PKCS#10 request"
    return refusal("a PKCS#10 request (RFC 2986)", data)


def _read_everything(csr: x509.CertificateSigningRequest) -> None:
    """cryptography parses a CSR's parts lazily and raises ValueError or TypeError when one is
    first read — in the CA, long after this decoder said yes. Read every part a CA uses now."""
    def subject() -> None:
        for attribute in csr.subject:
            attribute.value  # noqa: B018 - reading is the check
        csr.subject.rfc4514_string()

    parts = (
        ("subject", subject),
        ("attributes", lambda: [a.value for a in csr.attributes]),
        ("extensions", lambda: [e.value for e in csr.extensions]),
        ("public key", csr.public_key),
    )
    for name, read in parts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. a 3-letter country name
                read()
        except Exception as exc:  # ValueError, TypeError, UnsupportedAlgorithm, ...
            raise DecodeError(f"the CSR's {name} cannot be read: {_PART_PROBLEMS[name]}") from exc


_PART_PROBLEMS: Final = {
    "subject": "a name attribute has an ASN.1 type X.520 does not allow there, or text that "
               "is not valid in its string type (e.g. a UTF8String that is not UTF-8)",
    "attributes": "an attribute is malformed",
    "extensions": "an extension is malformed, unknown in a critical way or repeated",
    "public key": "the key is malformed or of an unsupported type",
}


def _signature_oid(csr: x509.CertificateSigningRequest) -> str:
    try:
        return csr.signature_algorithm_oid.dotted_string
    except Exception:
        return "(unreadable)"


# --- CSR attributes -----------------------------------------------------------------------


class _AnySet(core.SetOf):
    _child_spec = core.Any


class _Attribute(core.Sequence):
    _fields: ClassVar = [("type", core.ObjectIdentifier), ("values", _AnySet)]


class _AttrOrOID(core.Choice):
    _alternatives: ClassVar = [("oid", core.ObjectIdentifier), ("attribute", _Attribute)]


class _CsrAttrs(core.SequenceOf):
    _child_spec = _AttrOrOID


@dataclass(frozen=True)
class CsrAttribute:
    """One AttrOrOID: a bare OID (``values`` None), or an attribute type with the DER of
    each of its values."""

    oid: str
    values: tuple[bytes, ...] | None = None


def encode_csrattrs(items: Sequence[CsrAttribute]) -> bytes:
    """DER of CsrAttrs. An empty list is legal (RFC 7030 §4.5.2: SIZE (0..MAX)).

    Written by hand rather than with asn1crypto's ``dump(force=True)``, which parses every
    attribute value again and fails on values it cannot interpret (a UTF8String that is not
    UTF-8, a REAL) although they are well-formed DER the decoder accepted. Values are opaque
    DER here; DER sorts a SET OF by encoding, and so does the decoder."""
    out = []
    for item in items:
        try:
            oid = core.ObjectIdentifier(item.oid).dump()
        except (ValueError, TypeError) as exc:
            raise UsageError(f"csrattrs item {item.oid!r} is not a dotted OID") from exc
        if item.values is None:
            out.append(oid)
            continue
        if not item.values:
            raise UsageError(f"attribute {item.oid} needs at least one value")
        for value in item.values:
            if not isinstance(value, bytes) or _tlv_length(value) != len(value):
                raise UsageError(f"attribute {item.oid}: a value is not one DER item")
        out.append(_der(0x30, oid + _der(0x31, b"".join(sorted(item.values)))))
    return _der(0x30, b"".join(out))


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _tlv_length(der: bytes) -> int | None:
    try:
        return len(core.Any.load(der, strict=True).dump())
    except Exception:  # any parse failure means "not one DER item"
        return None


def decode_csrattrs(der: bytes) -> list[CsrAttribute]:
    if len(der) > MAX_BODY:
        raise DecodeError(f"csrattrs of {len(der)} bytes exceeds {MAX_BODY}")
    try:
        parsed = _CsrAttrs.load(bytes(der), strict=True)
        out = []
        for choice in parsed:
            if choice.name == "oid":
                out.append(CsrAttribute(choice.chosen.dotted))
            else:
                attr = choice.chosen
                values = tuple(sorted(v.dump() for v in attr["values"]))  # DER order
                if not values:
                    raise ValueError("attribute with no values")
                out.append(CsrAttribute(attr["type"].dotted, values))
    except Exception as exc:  # asn1crypto raises ValueError, TypeError, OverflowError, ...
        raise DecodeError(refusal("a CsrAttrs SEQUENCE of OIDs and attributes (RFC 7030 "
                                  "§4.5.2)", bytes(der))) from exc
    return out


__all__ = [
    "MEDIA_CERTS_ONLY",
    "MEDIA_CSRATTRS",
    "MEDIA_PKCS7",
    "MEDIA_PKCS10",
    "OID_ECDSA_WITH_SHA256",
    "OID_ECDSA_WITH_SHA384",
    "CsrAttribute",
    "decode_base64",
    "decode_certs_only",
    "decode_csr_body",
    "decode_csrattrs",
    "encode_base64",
    "encode_certs_only",
    "encode_csr_body",
    "encode_csrattrs",
]
