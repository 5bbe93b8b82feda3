"""The registrar's side of a voucher request, apart from HTTP (RFC 8995 §5.2, §5.3, §5.5).

``check_pledge_request`` applies the registrar's checks to a pledge voucher-request (PVR):
its CMS signature is the IDevID's that authenticated the TLS connection, its serial-number is
that IDevID's, its assertion is "proximity" and its proximity-registrar-cert is the
registrar's own TLS certificate (else 401: someone in the middle, §5.3). ``build_rvr`` makes
the registrar voucher-request (RVR) from it: serial-number parsed from the IDevID (§5.5: never
copied from the PVR), the pledge's nonce as the pledge wrote it, idevid-issuer, and the whole
signed PVR as prior-signed-voucher-request.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import certs
from brski.errors import BrskiError, DecodeError, SignatureError, ValidationError
from brski.signed_voucher import verify_voucher_request_cms
from brski.voucher import Assertion, VoucherRequest, WireForm

from .web import Refusal


@dataclass(frozen=True)
class PledgeRequest:
    """A pledge voucher-request that passed the registrar's checks."""

    pvr: VoucherRequest
    signed: bytes  # the CMS exactly as received
    idevid: x509.Certificate
    serial: str

    @property
    def sha256(self) -> bytes:
        """Identifies a retry: the pledge resends the same signed PVR (RFC 8995 §5.6)."""
        return hashlib.sha256(self.signed).digest()

    @property
    def nonce_text(self) -> str | None:
        return self.pvr.wire_text("nonce")


def check_pledge_request(
    body: bytes,
    idevid: x509.Certificate,
    own_cert: x509.Certificate,
    manufacturer_cas: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> PledgeRequest:
    try:
        pvr, signer = verify_voucher_request_cms(body, manufacturer_cas, now,
                                                 extra_certs=[idevid])
    except SignatureError as exc:
        raise Refusal(403, f"pledge voucher-request signature: {exc}") from exc
    except (DecodeError, ValidationError) as exc:
        raise Refusal(400, f"not a valid pledge voucher-request: {exc}") from exc
    if _der(signer) != _der(idevid):
        raise Refusal(403, "the pledge voucher-request is not signed with the IDevID that "
                           "authenticated this TLS connection")
    try:
        serial = certs.serial_number(idevid)
    except BrskiError as exc:
        raise Refusal(403, f"IDevID: {exc}") from exc
    if pvr.serial_number != serial:
        raise Refusal(403, f"voucher-request serial-number {pvr.serial_number!r} is not the "
                           f"IDevID's {serial!r}")
    if pvr.assertion is not Assertion.PROXIMITY:
        raise Refusal(401, "voucher-request assertion must be \"proximity\"", close=True)
    if pvr.proximity_registrar_cert is None:
        raise Refusal(401, "voucher-request has no proximity-registrar-cert", close=True)
    if pvr.proximity_registrar_cert != _der(own_cert):
        # RFC 8995 §5.3: the pledge saw another TLS server certificate: a man in the middle.
        raise Refusal(401, "proximity-registrar-cert is not this registrar's TLS certificate",
                      close=True)
    return PledgeRequest(pvr, bytes(body), idevid, serial)


def build_rvr(req: PledgeRequest, now: datetime.datetime) -> VoucherRequest:
    nonce_text = req.nonce_text
    return VoucherRequest(
        assertion=Assertion.PROXIMITY,
        created_on=now,
        serial_number=req.serial,
        nonce=req.pvr.nonce,
        idevid_issuer=idevid_issuer(req.idevid),
        prior_signed_voucher_request=req.signed,
        wire=WireForm(texts={"nonce": nonce_text} if nonce_text else {}),
    )


def idevid_issuer(idevid: x509.Certificate) -> bytes:
    """rfc8366bis §6.1: the IDevID's authorityKeyIdentifier extnValue, encoded as the cBRSKI
    example does (OCTET STRING header included; protocols.md open question 6)."""
    return idevid_issuer_forms(idevid)[0]


def idevid_issuer_forms(idevid: x509.Certificate) -> tuple[bytes, bytes]:
    """(with, without) the OCTET STRING header: a MASA accepts either. Without an AKI the
    structure is built from the pledge's key identifier (RFC 5280 §4.2.1.2 method 1)."""
    try:
        aki = idevid.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(idevid.public_key())  # type: ignore[arg-type]
        aki = x509.AuthorityKeyIdentifier(ski.digest, None, None)
    der = aki.public_bytes()
    return _octet_string(der), der


def _octet_string(content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([0x04, n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x04, 0x80 | len(length)]) + length + content


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)
