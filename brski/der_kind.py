"""Say in a peer's terms what a body that failed to parse actually is.

Parsers' own messages (``ParseError { kind: UnexpectedTag ... }``, ``Extra data - 2605 bytes``)
name their internals, not the mistake. A refusal should say what was expected and what came:
"expected a PKCS#10 request, got an X.509 certificate"; "got base64 text where binary DER was
expected". ``refusal(expected, data)`` builds that sentence; ``describe(data)`` is its second half.
"""

from __future__ import annotations

import re
import warnings
from typing import Final

from asn1crypto import cms as acms
from cryptography import x509

_BASE64_TEXT: Final = re.compile(rb"[A-Za-z0-9+/\-_]+={0,2}")
_WHITESPACE: Final = re.compile(rb"[ \t\r\n]+")
_PEM_LABEL: Final = re.compile(rb"-----BEGIN ([A-Z0-9 #]{1,40})-----")
_CMS_TYPES: Final = {
    "1.2.840.113549.1.7.1": "a CMS data structure",
    "1.2.840.113549.1.7.2": "a CMS SignedData structure",
    "1.2.840.113549.1.7.3": "a CMS EnvelopedData structure",
}


def refusal(expected: str, data: bytes, *, rule: str = "") -> str:
    """``expected ..., got ...`` for DER input; ``rule`` names the text that says the body is
    binary (e.g. "RFC 8995 §5.2"), quoted when base64 text came instead."""
    got = describe(data)
    if got == "base64 text":
        where = f", {rule}" if rule else ""
        return f"expected {expected}: got base64 text where binary DER was expected{where}"
    return f"expected {expected}, got {got}"


def describe(data: bytes) -> str:
    """A short phrase for what ``data`` looks like."""
    if not data:
        return "an empty body"
    text = bytes(data)
    stripped = text.strip()
    if stripped.startswith(b"-----BEGIN"):
        match = _PEM_LABEL.match(stripped)
        return f"PEM text ({match.group(1).decode()})" if match else "PEM text"
    if text[0] != 0x30 and _BASE64_TEXT.fullmatch(_WHITESPACE.sub(b"", stripped) or b"-"):
        return "base64 text"
    if text[0] != 0x30:
        return f"bytes that are not DER (a SEQUENCE starts with 0x30, this with 0x{text[0]:02x})"
    length = _der_length(text)
    if length is None:
        return "a DER SEQUENCE with a malformed length"
    if length > len(text):
        return f"a DER SEQUENCE cut short ({len(text)} of {length} bytes)"
    if length < len(text):
        return f"a DER SEQUENCE followed by {len(text) - length} extra bytes"
    return _kind_of_sequence(text)


def _der_length(data: bytes) -> int | None:
    """Total length (header included) of the DER item at the start of ``data``."""
    if len(data) < 2:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count:
        return None  # indefinite length is BER, not DER
    return 2 + count + int.from_bytes(data[2:2 + count], "big")


def _kind_of_sequence(der: bytes) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            x509.load_der_x509_certificate(der)
            return "an X.509 certificate"
        except Exception:
            pass
        try:
            x509.load_der_x509_csr(der)
            return "a PKCS#10 request"
        except Exception:
            pass
        try:
            info = acms.ContentInfo.load(der, strict=True)
            dotted = info["content_type"].dotted
            return _CMS_TYPES.get(dotted, f"a CMS structure of content type {dotted}")
        except Exception:
            pass
    return "a DER SEQUENCE of another kind"
