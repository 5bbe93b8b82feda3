"""The pledge's side of vouchers: build the voucher-request, accept or reject the voucher.

Sans-IO: the nonce comes from an injected ``rng``, the time is an argument. Wire formats and
signatures are all ``brski.signed_voucher``'s; this module is the pledge's *policy*:

RFC 8995 §5.2 (the pledge voucher-request): assertion "proximity", a fresh nonce per attempt,
proximity-registrar-cert = the end-entity certificate the TLS server showed, serial-number;
CMS-signed with the IDevID.

RFC 8995 §5.6.1 (voucher verification): the signature chains to the manufacturer-installed
MASA trust anchor, serial-number is ours, the nonce is the one we sent, a pinned-domain-cert is
present. RFC 8995 §2.6.1: only a pledge with a trusted clock checks times (expires-on,
certificate validity); without one, it checks at a time inside the certificates' own validity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from brski import cms
from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.signed_voucher import check_voucher, sign_voucher_cms, verify_voucher_cms
from brski.voucher import Assertion, Voucher, VoucherRequest

from .identity import PledgeIdentity

NONCE_BYTES = 16  # within rfc8366bis' 8..32; RFC 8995 §5.2: cryptographically strong random
ACCEPTED_ASSERTIONS = frozenset({Assertion.VERIFIED, Assertion.LOGGED, Assertion.PROXIMITY})


class VoucherRejected(Exception):
    """The voucher must not be used. ``code`` is short and stable (for reports and tests);
    the message says why in words."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class AcceptedVoucher:
    voucher: Voucher
    signer: x509.Certificate
    pinned: x509.Certificate  # the registrar's domain trust anchor from now on

    @property
    def assertion(self) -> str:
        a = self.voucher.assertion
        return a.yang_name if a is not None else "-"


def new_nonce(rng: Callable[[int], bytes]) -> bytes:
    nonce = rng(NONCE_BYTES)
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise UsageError(f"rng({NONCE_BYTES}) must return {NONCE_BYTES} bytes")
    return nonce


def build_pvr(identity: PledgeIdentity, proximity_cert_der: bytes, nonce: bytes,
              now: datetime) -> bytes:
    """The CMS-signed pledge voucher-request (``application/voucher-cms+json``)."""
    request = VoucherRequest(
        serial_number=identity.serial,
        assertion=Assertion.PROXIMITY,
        created_on=now,
        nonce=nonce,
        proximity_registrar_cert=proximity_cert_der,
    )
    return sign_voucher_cms(request, identity.key, [identity.cert], now)


def clockless_time(certs: Sequence[x509.Certificate]) -> datetime:
    """A time inside every given certificate's validity, when there is one: the latest
    notBefore. A pledge without a trusted clock uses it so that validity periods are not held
    against it (RFC 8995 §2.6.1), while signatures and chaining are still checked in full."""
    if not certs:
        raise UsageError("no certificates to take a time from")
    return max(c.not_valid_before_utc for c in certs)


def check_claims(voucher: Voucher, serial: str, nonce: bytes | None,
                 accept_nonceless: bool) -> None:
    """What a pledge checks of any voucher, CMS or COSE, once its signature holds: its serial
    number, its nonce (none only where nonceless vouchers are accepted) and its assertion."""
    try:
        check_voucher(voucher, serial_number=serial)
    except ValidationError as exc:
        raise VoucherRejected("serial", str(exc)) from exc
    if voucher.nonce is None:
        if not accept_nonceless:
            raise VoucherRejected("nonce", "voucher has no nonce, and this pledge sent one")
    else:
        try:
            check_voucher(voucher, nonce=nonce)
        except ValidationError as exc:
            raise VoucherRejected("nonce", str(exc)) from exc
    if voucher.assertion is not None and voucher.assertion not in ACCEPTED_ASSERTIONS:
        raise VoucherRejected("assertion", f"assertion {voucher.assertion.yang_name!r} is "
                                           "not acceptable to this pledge")


def accept_voucher(
    data: bytes,
    *,
    anchors: Sequence[x509.Certificate],
    serial: str,
    nonce: bytes,
    now: datetime | None,
    accept_nonceless: bool = False,
) -> AcceptedVoucher:
    """Verify a CMS voucher as this pledge must. ``now``: the trusted time, or None for a
    pledge without a trusted clock. Raises VoucherRejected; nothing else for bad input."""
    if not anchors:
        raise UsageError("a pledge needs at least one MASA trust anchor")
    try:
        at = now
        if at is None:
            signed = cms.parse(data)
            at = clockless_time([*signed.certificates, *anchors])
        voucher, signer = verify_voucher_cms(data, anchors, at)
    except SignatureError as exc:
        raise VoucherRejected("signature", f"voucher signature rejected: {exc}") from exc
    except DecodeError as exc:
        raise VoucherRejected("malformed", f"voucher is malformed: {exc}") from exc
    except ValidationError as exc:
        code = "expired" if "expired" in str(exc) else "invalid"
        raise VoucherRejected(code, f"voucher is invalid: {exc}") from exc
    check_claims(voucher, serial, nonce, accept_nonceless)
    if voucher.pinned_domain_cert is None:
        # RFC 8995 §5.6.1: fail gracefully. Only a certificate can serve as a TLS anchor here.
        raise VoucherRejected("pinned-domain-cert", "voucher has no pinned-domain-cert")
    try:
        pinned = x509.load_der_x509_certificate(voucher.pinned_domain_cert)
    except ValueError as exc:
        raise VoucherRejected("pinned-domain-cert",
                              f"pinned-domain-cert is not a certificate: {exc}") from exc
    return AcceptedVoucher(voucher, signer, pinned)
