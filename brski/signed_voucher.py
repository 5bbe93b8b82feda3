"""Signed vouchers and voucher-requests: the API the pledge, registrar and MASA use.

JSON in CMS (RFC 8995, ``application/voucher-cms+json``)::

    data = sign_voucher_cms(voucher, key, certs, signing_time)            # MASA
    data = sign_voucher_cms(request, key, certs, signing_time)            # pledge / registrar
    voucher, signer = verify_voucher_cms(data, anchors, now, serial_number=sn, nonce=n)
    request, signer = verify_voucher_request_cms(data, anchors, now)

CBOR in COSE_Sign1 (cBRSKI, ``application/voucher+cose``)::

    data = sign_voucher_cose(artifact, key, x5bag=certs, kid=None)
    voucher, signer = verify_voucher_cose(data, anchors, now, signer=None, serial_number=sn)
    request, signer = verify_voucher_request_cose(data, anchors, now, signer=pledge_cert,
                                                  extra_certs=chain)

``trust_anchors`` is required and explicit. A sequence of certificates: the signer must chain
to one of them at ``now`` (the chain comes from the CMS certificates or the COSE x5bag; a
trust anchor may also be the signer itself, e.g. a pinned MASA certificate or key). ``None``:
the signature is checked with the certificate the message carries and nothing vouches for
that certificate — what a registrar does with a PVR (RFC 8995 §5.5: it may not know the
manufacturer) and a MASA with an RVR, before applying its own policy to ``signer``.
For COSE, ``signer`` (a certificate or public key) names the key directly: the pledge's DTLS
client certificate for a PVR (cBRSKI §9.2: no x5bag in a PVR), or a pinned MASA key.

Every verify function checks the signature, then decodes the payload, then ``validate(now=)``;
``serial_number`` and ``nonce`` add the pledge's checks of RFC 8995 §5.6.1 (``nonce`` as bytes,
or as the JSON text the pledge sent). Errors: SignatureError (signature, certificates),
DecodeError (structure), ValidationError (voucher rules); UsageError for bad arguments,
including signing an artifact that does not validate.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from cryptography import x509

from . import cms, cose
from .chain import describe, valid_at, verify_chain
from .errors import DecodeError, SignatureError, UsageError, ValidationError
from .voucher_cbor import decode_cbor, encode_checked_cbor
from .voucher_json import decode_json, encode_checked_json
from .voucher_model import Voucher, VoucherArtifact, VoucherRequest, b64decode_lenient

Anchors = Sequence[x509.Certificate] | None
_ARTIFACT_TYPES = frozenset({Voucher, VoucherRequest})
A = TypeVar("A", bound=VoucherArtifact)


# --- CMS / JSON -----------------------------------------------------------------------------


def sign_voucher_cms(
    artifact: VoucherArtifact,
    key: cms.SigningKey,
    certs: Sequence[x509.Certificate],
    signing_time: datetime,
    *,
    econtent_type: str = cms.ANIMA_JSON_VOUCHER,
) -> bytes:
    """DER CMS SignedData over the artifact's JSON; ``certs`` must include the signer's."""
    _require_valid(artifact)  # validate() checks the types, too
    return cms.sign(encode_checked_json(artifact), key, certs, signing_time,
                    econtent_type=econtent_type)


def verify_voucher_cms(
    data: bytes,
    trust_anchors: Anchors,
    now: datetime,
    *,
    extra_certs: Sequence[x509.Certificate] = (),
    serial_number: str | None = None,
    nonce: bytes | str | None = None,
) -> tuple[Voucher, x509.Certificate]:
    """A CMS-signed voucher, verified; returns it with the signer certificate."""
    voucher, signer = _verify_cms(data, trust_anchors, now, extra_certs, Voucher)
    check_voucher(voucher, serial_number=serial_number, nonce=nonce)
    return voucher, signer


def verify_voucher_request_cms(
    data: bytes | cms.SignedData,
    trust_anchors: Anchors,
    now: datetime,
    *,
    extra_certs: Sequence[x509.Certificate] = (),
) -> tuple[VoucherRequest, x509.Certificate]:
    """A CMS-signed voucher-request (PVR or RVR), verified; with the signer certificate.
    ``data`` may be what ``cms.parse`` made of it already (the MASA reads the RVR's
    certificates too: one parse serves both)."""
    return _verify_cms(data, trust_anchors, now, extra_certs, VoucherRequest)


def _verify_cms(
    data: bytes | cms.SignedData,
    trust_anchors: Anchors,
    now: datetime,
    extra_certs: Sequence[x509.Certificate],
    expect: type[A],
) -> tuple[A, x509.Certificate]:
    signed = data if isinstance(data, cms.SignedData) else cms.parse(data)
    signer = cms.verify_signature(signed, extra_certs)
    _check_signer(signer, [*signed.certificates, *extra_certs], trust_anchors, now)
    artifact = decode_json(signed.content, expect)
    artifact.validate(now=now)
    return artifact, signer


# --- COSE / CBOR ----------------------------------------------------------------------------


def sign_voucher_cose(
    artifact: VoucherArtifact,
    key: cose.PrivateKey,
    *,
    x5bag: Sequence[x509.Certificate] = (),
    kid: bytes | None = None,
) -> bytes:
    """COSE_Sign1 over the artifact's SID-keyed CBOR."""
    _require_valid(artifact)  # validate() checks the types, too
    return cose.sign(encode_checked_cbor(artifact), key, x5bag=x5bag, kid=kid)


def verify_voucher_cose(
    data: bytes,
    trust_anchors: Anchors,
    now: datetime,
    *,
    signer: x509.Certificate | cose.PublicKey | None = None,
    serial_number: str | None = None,
    nonce: bytes | str | None = None,
) -> tuple[Voucher, x509.Certificate | None]:
    """A COSE-signed voucher, verified. Returns the signer certificate (None when the signer
    was given as a bare public key)."""
    voucher, cert = _verify_cose(data, trust_anchors, now, signer, Voucher, ())
    check_voucher(voucher, serial_number=serial_number, nonce=nonce)
    return voucher, cert


def verify_voucher_request_cose(
    data: bytes | cose.Sign1,
    trust_anchors: Anchors,
    now: datetime,
    *,
    signer: x509.Certificate | cose.PublicKey | None = None,
    extra_certs: Sequence[x509.Certificate] = (),
    candidates: Sequence[x509.Certificate] | None = None,
) -> tuple[VoucherRequest, x509.Certificate | None]:
    """A COSE-signed voucher-request (PVR: pass the pledge's DTLS cert as ``signer``).
    ``extra_certs``: intermediates from elsewhere — the pledge's DTLS chain at the registrar,
    the RVR's x5bag at the MASA — since a PVR carries no x5bag of its own (cBRSKI §9.2).
    ``candidates`` (instead of ``signer``): the signer is whichever of these verifies the
    signature (the MASA looks for the PVR's signer in the RVR's x5bag); none does:
    ``NoVerifyingCertificate``. ``data`` may be a ``cose.decode`` result already."""
    return _verify_cose(data, trust_anchors, now, signer, VoucherRequest, extra_certs,
                        candidates)


def _verify_cose(
    data: bytes | cose.Sign1,
    trust_anchors: Anchors,
    now: datetime,
    signer: x509.Certificate | cose.PublicKey | None,
    expect: type[A],
    extra_certs: Sequence[x509.Certificate],
    candidates: Sequence[x509.Certificate] | None = None,
) -> tuple[A, x509.Certificate | None]:
    msg = data if isinstance(data, cose.Sign1) else cose.decode(data)
    cert = _cose_signer(msg, trust_anchors, now, signer, extra_certs, candidates)
    artifact = decode_cbor(msg.payload, expect)
    artifact.validate_decoded(now=now)
    return artifact, cert


def _cose_signer(
    msg: cose.Sign1,
    trust_anchors: Anchors,
    now: datetime,
    signer: x509.Certificate | cose.PublicKey | None,
    extra_certs: Sequence[x509.Certificate],
    candidates: Sequence[x509.Certificate] | None = None,
) -> x509.Certificate | None:
    if signer is not None and candidates is not None:
        raise UsageError("give the signer or candidates for it, not both")
    if signer is not None:
        cose.verify(msg, signer)
        if not isinstance(signer, x509.Certificate):
            return None
        _check_signer(signer, [*msg.x5bag, *extra_certs], trust_anchors, now)
        return signer
    # x5bag is unordered (RFC 9360): the signer is whichever certificate verifies. Without
    # x5bag (a registrar-stripped voucher) the trust anchors themselves are the candidates.
    if candidates is None:
        candidates = list(msg.x5bag) or list(trust_anchors or ())
        if not candidates:
            raise SignatureError("COSE message names no signer: no x5bag, no signer, "
                                 "no anchors")
    last_error: SignatureError | None = None
    for cert in candidates:
        try:
            cose.verify(msg, cert)
        except SignatureError as exc:
            last_error = exc
            continue
        _check_signer(cert, [*msg.x5bag, *extra_certs], trust_anchors, now)
        return cert
    raise NoVerifyingCertificate(
        f"no candidate certificate verifies the COSE signature ({len(candidates)} tried)"
    ) from last_error


class NoVerifyingCertificate(SignatureError):
    """None of the candidate certificates verifies a COSE signature (as opposed to a signer
    found whose chain or payload is refused)."""


# --- shared checks --------------------------------------------------------------------------


def _check_signer(
    signer: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_anchors: Anchors,
    now: datetime,
) -> None:
    if now.tzinfo is None:
        raise UsageError("now must be timezone-aware")
    if trust_anchors is None:
        if not valid_at(signer, now):
            raise SignatureError(
                f"signer certificate {describe(signer)} is not valid at {now.isoformat()}"
            )
        return
    verify_chain(signer, intermediates, trust_anchors, now)


def check_voucher(
    voucher: VoucherArtifact, *, serial_number: str | None = None, nonce: bytes | str | None = None
) -> None:
    """The pledge's own checks (RFC 8995 §5.6.1): its serial number, and the nonce it sent.

    A nonce given as ``str`` is compared with the voucher's JSON text first (RFC 8995 §5.8.1:
    do not assume base64), then as base64 of either alphabet.
    """
    if serial_number is not None and voucher.serial_number != serial_number:
        raise ValidationError(
            f"voucher is for serial-number {voucher.serial_number!r}, not {serial_number!r}"
        )
    if nonce is None:
        return
    if voucher.nonce is None:
        raise ValidationError("voucher has no nonce (nonceless) but one was expected")
    if isinstance(nonce, str):
        if voucher.wire_text("nonce") == nonce:
            return
        try:
            nonce = b64decode_lenient(nonce)
        except DecodeError:
            raise ValidationError("voucher nonce does not match the one sent") from None
    if voucher.nonce != nonce:
        raise ValidationError("voucher nonce does not match the one sent")


def _require_valid(artifact: VoucherArtifact) -> None:
    # the two classes by exact type first: VoucherArtifact is an ABC, and its isinstance()
    # costs a signer more than the rest of this check
    if type(artifact) not in _ARTIFACT_TYPES and not isinstance(artifact, VoucherArtifact):
        raise UsageError("sign a Voucher or a VoucherRequest")
    try:
        artifact.validate()
    except ValidationError as exc:
        raise UsageError(f"refusing to sign an invalid {artifact.top_name}: {exc}") from exc


__all__ = [
    "NoVerifyingCertificate",
    "check_voucher",
    "sign_voucher_cms",
    "sign_voucher_cose",
    "verify_voucher_cms",
    "verify_voucher_cose",
    "verify_voucher_request_cms",
    "verify_voucher_request_cose",
]
