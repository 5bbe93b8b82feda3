"""CoAP Content-Format numbers of cBRSKI and EST-coaps, and the EST-coaps certificate payloads.

Numbers (RFC 9148 §9.1, cBRSKI §15; RFC 7252 §12.3 for 0/40/50/60)::

    836 application/voucher+cose      rv request and response
     60 application/cbor              vs/es telemetry (50 application/json is allowed too)
    281 application/pkcs7-mime; smime-type=certs-only   crts, sen, sren (the default, §5.3)
    287 application/pkix-cert         one certificate, DER
     62 application/multipart-core    crts: CBOR array [287, h'cert', 287, h'cert', ...]
    286 application/pkcs10           sen/sren request
    285 application/csrattrs         att

EST-coaps payloads are binary DER (RFC 9148 §5.3: no base64). Sans-IO.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .cbor_strict import loads_exact
from .errors import DecodeError, UsageError
from .est import decode_certs_only, encode_certs_only

CF_TEXT: Final = 0
CF_LINK_FORMAT: Final = 40
CF_JSON: Final = 50
CF_CBOR: Final = 60
CF_MULTIPART_CORE: Final = 62
CF_PKCS7_CERTS_ONLY: Final = 281
CF_CSRATTRS: Final = 285
CF_PKCS10: Final = 286
CF_PKIX_CERT: Final = 287
CF_VOUCHER_COSE: Final = 836

CERT_FORMATS: Final = (CF_PKCS7_CERTS_ONLY, CF_PKIX_CERT, CF_MULTIPART_CORE)
MAX_CERTS_PAYLOAD: Final = 64 * 1024


def encode_certs(certs: Sequence[x509.Certificate], content_format: int) -> bytes:
    """``certs`` as a crts/sen/sren payload. 287 carries exactly one certificate."""
    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    if content_format == CF_PKCS7_CERTS_ONLY:
        return encode_certs_only(certs)
    if content_format == CF_PKIX_CERT:
        if len(ders) != 1:
            raise UsageError(f"application/pkix-cert carries one certificate, not {len(ders)}")
        return ders[0]
    if content_format == CF_MULTIPART_CORE:
        return cbor2.dumps([item for der in ders for item in (CF_PKIX_CERT, der)])
    raise UsageError(f"Content-Format {content_format} is not a certificate format")


def decode_certs(payload: bytes, content_format: int) -> list[x509.Certificate]:
    """The certificates of a crts/sen/sren payload; DecodeError with the reason."""
    if len(payload) > MAX_CERTS_PAYLOAD:
        raise DecodeError(f"certificate payload of {len(payload)} bytes exceeds "
                          f"{MAX_CERTS_PAYLOAD}")
    if content_format == CF_PKCS7_CERTS_ONLY:
        return decode_certs_only(payload)
    if content_format == CF_PKIX_CERT:
        ders = [payload]
    elif content_format == CF_MULTIPART_CORE:
        items = loads_exact(payload, "multipart-core", MAX_CERTS_PAYLOAD)
        if not isinstance(items, list) or len(items) % 2:
            raise DecodeError("multipart-core is not an array of format/value pairs")
        if any(cf != CF_PKIX_CERT or not isinstance(der, bytes)
               for cf, der in zip(items[::2], items[1::2], strict=True)):
            raise DecodeError("multipart-core item is not a 287 (pkix-cert) byte string")
        ders = items[1::2]
    else:
        raise DecodeError(f"Content-Format {content_format} is not a certificate format")
    try:
        return [x509.load_der_x509_certificate(der) for der in ders]
    except ValueError as exc:
        raise DecodeError(f"not a DER certificate: {exc}") from exc


def looks_like_cose_sign1(payload: bytes) -> bool:
    """Whether ``payload`` starts as a COSE_Sign1 does: tag 18 (0xd2) or a 4-array (0x84).
    Tells a body in another format (e.g. JSON labelled 836) from a broken COSE one."""
    return payload[:1] in (b"\xd2", b"\x84")
