"""The constrained pledge's payloads (cBRSKI, EST-coaps), sans-IO: no CoAP, no DTLS here.

What a pledge builds and checks when it enrolls over CoAPS; the transport is the caller's.
Wire formats and signatures are ``brski``'s (voucher CBOR, COSE, certs-only PKCS#7); this
module is the pledge's policy, as ``voucher_check`` and ``est`` are for the HTTPS pledge:

* the COSE-signed pledge voucher-request (cBRSKI §8.1/§9.2): assertion "proximity", a fresh
  nonce, the serial-number, and the registrar the pledge saw in the DTLS handshake as its
  certificate, its SubjectPublicKeyInfo or that SPKI's SHA-256 — no x5bag (the registrar
  authenticates the pledge by its DTLS client certificate and ignores one);
* the COSE voucher (RFC 8995 §5.6.1 as cBRSKI §6.8 changes it): the registrar strips the
  MASA's x5bag before forwarding, so the pledge verifies the signature with a MASA signing
  certificate it was given at manufacture (chained to its MASA trust anchor), or with the
  anchor's own key when the MASA signs with it (as the cBRSKI examples do); then serial-number,
  nonce, assertion and a pinned-domain-cert;
* EST-coaps answers (RFC 9148 §5): ``application/pkix-cert`` (CF 287, one DER certificate)
  and ``application/pkcs7-mime; smime-type=certs-only`` (CF 281, DER, not base64 as over
  HTTPS); the CSR goes out as DER ``application/pkcs10`` (CF 286);
* the join proxy a CoRE discovery answer names (cBRSKI §10: ``<>;brski-jp=PORT`` on the
  answer's source address; the legacy ``rt=brski.jp`` link carries its own);
* the registrar the pledge talked to must chain to the voucher's pinned-domain-cert (RFC 8995
  §5.6.2: provisional to validated) before EST goes on;
* the §6.7.1 shortcut: when the pinned domain CA is a root that signed the LDevID, the
  enrollment is complete without ``/crts``; otherwise the pledge must fetch ``/crts``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from ipaddress import IPv6Address

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from brski import certs, cose, linkformat
from brski import est as codec
from brski.chain import load_certificate, verify_chain
from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.signed_voucher import sign_voucher_cose, verify_voucher_cose
from brski.voucher import Assertion, Voucher, VoucherRequest

from .est import EstError, build_csr, check_ldevid
from .identity import PledgeIdentity
from .voucher_check import (
    AcceptedVoucher,
    VoucherRejected,
    check_claims,
    clockless_time,
    new_nonce,
)

# RFC 9148 §8.1 / cBRSKI: CoAP Content-Format numbers.
CF_PKCS7_CERTS = 281  # application/pkcs7-mime; smime-type=certs-only
CF_CSRATTRS = 285
CF_PKCS10 = 286
CF_PKIX_CERT = 287
CF_VOUCHER_COSE = 836  # application/voucher+cose

__all__ = [
    "CF_PKCS7_CERTS",
    "CF_PKCS10",
    "CF_PKIX_CERT",
    "CF_VOUCHER_COSE",
    "Proximity",
    "accept_voucher_cose",
    "build_cose_pvr",
    "build_csr_der",
    "check_registrar_pinned",
    "decode_est_certs",
    "enrolled_ldevid",
    "join_proxies",
    "new_nonce",
]


class Proximity(enum.Enum):
    """How the PVR names the registrar the pledge saw (cBRSKI §8.1 allows all three)."""

    CERT = "cert"  # proximity-registrar-cert: the DER certificate, as over HTTPS
    PUBK = "pubk"  # proximity-registrar-pubk: its SubjectPublicKeyInfo
    PUBK_SHA256 = "pubk-sha256"  # proximity-registrar-pubk-sha256: 32 bytes, the smallest


def build_cose_pvr(identity: PledgeIdentity, registrar_cert: x509.Certificate, nonce: bytes,
                   now: datetime | None,
                   proximity: Proximity = Proximity.PUBK_SHA256) -> bytes:
    """The COSE_Sign1 pledge voucher-request (CF 836), signed with the IDevID, no x5bag.
    ``registrar_cert``: the end-entity certificate the registrar showed in the DTLS handshake;
    ``now``: None for a pledge without a clock, which omits created-on (a SHOULD, RFC 8995
    §5.2; the cBRSKI example PVR has none)."""
    if not nonce:
        raise UsageError("a pledge voucher-request needs a nonce")
    fields: dict[str, bytes] = {}
    if proximity is Proximity.CERT:
        fields["proximity_registrar_cert"] = registrar_cert.public_bytes(
            serialization.Encoding.DER)
    elif proximity is Proximity.PUBK:
        fields["proximity_registrar_pubk"] = certs.spki_der(registrar_cert)
    else:
        fields["proximity_registrar_pubk_sha256"] = certs.spki_sha256(registrar_cert)
    request = VoucherRequest(serial_number=identity.serial, assertion=Assertion.PROXIMITY,
                             created_on=now, nonce=nonce, **fields)
    return sign_voucher_cose(request, identity.key)


def _verify(data: bytes, msg: cose.Sign1, anchors: Sequence[x509.Certificate],
            masa_signers: Sequence[x509.Certificate],
            at: datetime) -> tuple[Voucher, x509.Certificate | None]:
    if msg.x5bag or not masa_signers:
        # x5bag still there (not stripped), or the MASA signs with an anchor's own key: the
        # library tries those certificates and chains the one that verifies to the anchors.
        return verify_voucher_cose(data, anchors, at)
    last: SignatureError | None = None
    for signer in masa_signers:
        try:
            return verify_voucher_cose(data, anchors, at, signer=signer)
        except SignatureError as exc:
            last = exc
    try:  # a MASA that signs with its anchor key directly is still acceptable
        return verify_voucher_cose(data, anchors, at)
    except SignatureError:
        assert last is not None
        raise last from None


def accept_voucher_cose(
    data: bytes,
    *,
    anchors: Sequence[x509.Certificate],
    masa_signers: Sequence[x509.Certificate] = (),
    serial: str,
    nonce: bytes,
    now: datetime | None,
    accept_nonceless: bool = False,
) -> AcceptedVoucher:
    """Verify a COSE voucher (x5bag stripped or not) as this pledge must.

    ``anchors``: the manufacturer-installed MASA trust anchors; ``masa_signers``: MASA signing
    certificates installed beside them (each must chain to an anchor). ``now``: trusted time,
    or None for a pledge without a clock (RFC 8995 §2.6.1). Raises VoucherRejected only.
    """
    if not anchors:
        raise UsageError("a pledge needs at least one MASA trust anchor")
    try:
        msg = cose.decode(data)
        at = now or clockless_time([*msg.x5bag, *masa_signers, *anchors])
        voucher, signer = _verify(data, msg, anchors, masa_signers, at)
    except SignatureError as exc:
        raise VoucherRejected("signature", f"voucher signature rejected: {exc}") from exc
    except DecodeError as exc:
        raise VoucherRejected("malformed", f"voucher is malformed: {exc}") from exc
    except ValidationError as exc:
        code = "expired" if "expired" in str(exc) else "invalid"
        raise VoucherRejected(code, f"voucher is invalid: {exc}") from exc
    assert signer is not None  # only a bare public key as signer gives None; we pass certs
    check_claims(voucher, serial, nonce, accept_nonceless)
    if voucher.pinned_domain_cert is None:
        # A pubk pin cannot anchor the DTLS handshake for EST here (it needs a certificate).
        raise VoucherRejected("pinned-domain-cert", "voucher has no pinned-domain-cert "
                              "(this pledge does not use pinned-domain-pubk pins)")
    try:
        pinned = load_certificate(voucher.pinned_domain_cert, "pinned-domain-cert")
    except DecodeError as exc:
        raise VoucherRejected("pinned-domain-cert", str(exc)) from exc
    return AcceptedVoucher(voucher, signer, pinned)


def join_proxies(payload: bytes, source_host: str) -> list[tuple[str, int]]:
    """Where to open DTLS, from a ``/.well-known/core?brski-jp=*`` (or legacy
    ``?rt=brski.jp``) answer that came from ``source_host`` (with its ``%scope`` for a
    link-local address). Links of a variant this
    pledge does not speak (a ``var`` attribute) are left out. DecodeError for a malformed
    answer; an empty list when it offers nothing usable."""
    found = []
    zone = source_host.partition("%")[2]
    for link in linkformat.parse_join_ports(payload):
        if any(name == "var" for name, _ in link.params):
            continue
        if link.address is None:
            host = source_host
        else:
            host = str(link.address)
            # The legacy form names a link-local address without a zone: it is on the link
            # the answer came from, and unusable without that link.
            if zone and isinstance(link.address, IPv6Address) and link.address.is_link_local:
                host = f"{host}%{zone}"
        if (host, link.port) not in found:
            found.append((host, link.port))
    return found


def check_registrar_pinned(registrar_chain: Sequence[x509.Certificate],
                           pinned: x509.Certificate, now: datetime | None) -> None:
    """The DTLS server the pledge enrolled through must chain to the pinned domain cert (which
    may be the registrar's own certificate). ``registrar_chain``: leaf first, as the handshake
    showed it. VoucherRejected("registrar-not-pinned") otherwise: the pledge must drop this
    registrar, report voucher status and try another proxy."""
    if not registrar_chain:
        raise VoucherRejected("registrar-not-pinned", "no registrar certificate to check")
    leaf, rest = registrar_chain[0], list(registrar_chain[1:])
    at = now or clockless_time([leaf, pinned])
    try:
        verify_chain(leaf, [c for c in rest if c != pinned], [pinned], at)
    except SignatureError as exc:
        raise VoucherRejected("registrar-not-pinned",
                              f"the registrar does not chain to the pinned domain cert: {exc}"
                              ) from exc


# -- EST-coaps -----------------------------------------------------------------------------------

def build_csr_der(serial: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The CSR as EST-coaps carries it: DER PKCS#10 (CF 286), the same request as over HTTPS."""
    return codec.decode_base64(build_csr(serial, key))


def decode_est_certs(payload: bytes, content_format: int | None) -> list[x509.Certificate]:
    """The certificates of an EST-coaps answer: CF 287 (one DER certificate) or CF 281 (DER
    certs-only PKCS#7). Anything else, or a body that is not what its format says: EstError."""
    if content_format == CF_PKIX_CERT:
        try:
            return [load_certificate(bytes(payload), "EST-coaps application/pkix-cert")]
        except DecodeError as exc:
            raise EstError(str(exc)) from exc
    if content_format == CF_PKCS7_CERTS:
        try:
            return codec.decode_certs_only(bytes(payload))
        except DecodeError as exc:
            raise EstError(str(exc)) from exc
    raise EstError(f"EST-coaps answer with Content-Format {content_format}, expected "
                   f"{CF_PKIX_CERT} or {CF_PKCS7_CERTS}")


def enrolled_ldevid(
    issued: Sequence[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    pinned: x509.Certificate,
    crts: Sequence[x509.Certificate] | None,
    now: datetime | None,
) -> tuple[x509.Certificate, list[x509.Certificate]] | None:
    """The LDevID and its validated chain, or None when ``/crts`` is still needed.

    cBRSKI §6.7.1: with ``crts`` None, the pinned domain CA alone is tried — if it is a root
    that signed the LDevID, enrollment is done; else None (fetch ``/crts`` and call again).
    With ``crts``, the LDevID must chain to a root among them. EstError otherwise.
    """
    if crts is not None:
        return check_ldevid(issued, key, crts, now)
    public = key.public_key()
    mine = [c for c in issued if c.public_key() == public]
    if not mine:
        raise EstError("simpleenroll returned no certificate for our key")
    if pinned.issuer != pinned.subject or mine[0].issuer != pinned.subject:
        return None
    at = now or clockless_time([mine[0], pinned])
    try:
        return mine[0], verify_chain(mine[0], [], [pinned], at)
    except SignatureError as exc:
        raise EstError(f"LDevID does not chain to the pinned domain CA: {exc}") from exc

