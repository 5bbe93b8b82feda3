"""The SZTP device's checks of bootstrapping data (RFC 8572 §5.3, §5.4), without I/O.

``accept(output, trusted=..., ...)`` takes a get-bootstrapping-data output (or the same three
artifacts from removable media) and returns the conveyed information the device may act on,
or raises ``Refused(code, reason)``. The order is RFC 8572 §5.4's, and the first failure stops:

1. ownership voucher: signature to the manufacturer's MASA trust anchor, serial-number is the
   device's, the nonce is the one sent (a device that sent one; §5.4 lists no nonce check, it
   is our inference, protocols.md §8.3), assertion acceptable, pinned-domain-cert taken;
2. owner certificate: path-validated to the pinned-domain-cert;
3. conveyed information: signed by the owner certificate's key.

Unsigned data is acceptable only from a trusted source, except unsigned redirect-information
(§5.3); from an untrusted one a redirect's trust anchors are dropped (§5.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import cms, sztp
from brski.chain import verify_chain
from brski.errors import DecodeError, SignatureError, ValidationError

from .voucher_check import VoucherRejected, accept_voucher


class Refused(Exception):
    """``code`` is short and stable for reports and tests, ``reason`` says it in words."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Accepted:
    information: sztp.ConveyedInformation
    signed: bool
    pinned: x509.Certificate | None  # the owner's domain trust anchor (signed data)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def accept(output: sztp.GetBootstrappingDataOutput, *, trusted: bool, serial: str,
           masa_anchors: Sequence[x509.Certificate], nonce: bytes | None,
           now: datetime) -> Accepted:
    signed_parts = output.ownership_voucher is not None
    pinned = None
    owner = None
    if signed_parts:
        assert output.owner_certificate is not None and output.ownership_voucher is not None
        # 1. the ownership voucher
        try:
            voucher = accept_voucher(output.ownership_voucher, anchors=masa_anchors,
                                     serial=serial, nonce=nonce, now=now,  # type: ignore[arg-type]
                                     accept_nonceless=nonce is None)
        except VoucherRejected as exc:
            raise Refused(f"voucher-{exc.code}", exc.reason) from exc
        pinned = voucher.pinned
        # 2. the owner certificate, to the pinned-domain-cert
        try:
            owner_certs = sztp.parse_degenerate(output.owner_certificate, "owner-certificate")
        except DecodeError as exc:
            raise Refused("owner-certificate", str(exc)) from exc
        owner = _end_entity(owner_certs)
        try:
            verify_chain(owner, owner_certs, [pinned], now)
        except SignatureError as exc:
            raise Refused("owner-certificate", f"owner certificate does not chain to the "
                                               f"voucher's pinned-domain-cert: {exc}") from exc
        _key_usage_ok(owner)
    # 3. the conveyed information
    try:
        conveyed = sztp.unwrap_conveyed(output.conveyed_information)
    except DecodeError as exc:
        raise Refused("conveyed-information", str(exc)) from exc
    if signed_parts:
        if conveyed.signed is None:
            raise Refused("owner-signature", "an ownership voucher came with unsigned conveyed "
                                             "information")
        try:
            signer = cms.verify_signature(conveyed.signed)
        except SignatureError as exc:
            raise Refused("owner-signature", f"conveyed information signature: {exc}") from exc
        assert owner is not None
        if signer.public_key() != owner.public_key():
            raise Refused("owner-signature", "conveyed information is not signed by the owner "
                                             f"certificate ({owner.subject.rfc4514_string()}) "
                                             f"but by {signer.subject.rfc4514_string()}")
    elif conveyed.signed is not None:
        raise Refused("no-ownership-voucher", "signed conveyed information without an "
                                              "ownership voucher and owner certificate")
    try:
        info = sztp.decode_conveyed(conveyed.data, conveyed.encoding)
    except (DecodeError, ValidationError) as exc:
        raise Refused("conveyed-information", str(exc)) from exc
    if not signed_parts and not trusted:
        if isinstance(info, sztp.OnboardingInformation):
            raise Refused("unsigned-onboarding", "unsigned onboarding information from an "
                                                 "untrusted source (RFC 8572 §5.3)")
        # §5.5: an untrusted redirect's trust anchors are not to be used
        info = sztp.RedirectInformation(tuple(replace(s, trust_anchor=None)
                                              for s in info.servers))
    return Accepted(info, signed_parts, pinned)


def _end_entity(certs: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate that issued nothing else in the bag (the owner certificate)."""
    issuers = {c.issuer.public_bytes() for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject.public_bytes() not in issuers]
    if len(leaves) != 1:
        raise Refused("owner-certificate", f"owner-certificate CMS holds {len(leaves)} end "
                                           "certificates, not one")
    return leaves[0]


def _key_usage_ok(cert: x509.Certificate) -> None:
    # §3.2: key usage absent or digitalSignature
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.digital_signature:
        raise Refused("owner-certificate", "owner certificate's key usage lacks "
                                           "digitalSignature (RFC 8572 §3.2)")


def trust_anchors(cms_der: bytes) -> list[x509.Certificate]:
    """A redirect's trust-anchor (certs-only CMS) as certificates."""
    try:
        return sztp.parse_degenerate(cms_der, "trust-anchor")
    except DecodeError as exc:
        raise Refused("trust-anchor", str(exc)) from exc


__all__ = ["Accepted", "Refused", "accept", "trust_anchors"]
