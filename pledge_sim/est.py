"""The pledge's EST steps (RFC 7030 as profiled by RFC 8995 §5.9), sans-IO.

Every payload (base64 certs-only PKCS#7, PKCS#10, CsrAttrs) is read and written by
``brski.est``; this module is the pledge's policy: which key, which subject, and when an
issued certificate is acceptable.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from brski import est as codec
from brski.chain import verify_chain
from brski.errors import DecodeError, SignatureError

from .voucher_check import clockless_time


class EstError(Exception):
    """An EST answer the pledge cannot use."""


def decode_certs_only(body: bytes) -> list[x509.Certificate]:
    """Certificates from an EST certs-only body (base64 of the DER, RFC 8951)."""
    try:
        return codec.decode_certs_only(codec.decode_base64(body))
    except DecodeError as exc:
        raise EstError(str(exc)) from exc


def decode_csrattrs(body: bytes) -> list[codec.CsrAttribute]:
    try:
        return codec.decode_csrattrs(codec.decode_base64(body))
    except DecodeError as exc:
        raise EstError(f"csrattrs: {exc}") from exc


def new_ldevid_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(serial: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A base64 PKCS#10 naming the pledge by serialNumber (the registrar may substitute the
    IDevID's subject; RFC 8995 §5.9.3 leaves the subject to the registrar)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
            x509.NameAttribute(NameOID.COMMON_NAME, f"pledge {serial}"),
        ]))
        .sign(key, hashes.SHA256())
    )
    return codec.encode_csr_body(csr)


def check_ldevid(
    issued: Sequence[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    cacerts: Sequence[x509.Certificate],
    now: datetime | None,
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The LDevID among ``issued`` (the one with our public key) and its validated chain up to
    a ``cacerts`` root. ``now``: trusted time or None (see voucher_check.clockless_time)."""
    mine = [c for c in issued if c.public_key() == key.public_key()]
    if not mine:
        raise EstError("simpleenroll returned no certificate for our key")
    ldevid = mine[0]
    roots = [c for c in cacerts if c.issuer == c.subject] or list(cacerts)
    intermediates = [c for c in [*issued, *cacerts] if c is not ldevid and c not in roots]
    at = now or clockless_time([ldevid, *intermediates, *roots])
    try:
        chain = verify_chain(ldevid, intermediates, roots, at)
    except SignatureError as exc:
        raise EstError(f"LDevID does not chain to the domain's cacerts: {exc}") from exc
    return ldevid, chain


def pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
