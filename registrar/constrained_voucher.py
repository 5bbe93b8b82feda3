"""The registrar's side of a cBRSKI voucher request, apart from CoAP (cBRSKI §6.8, §9.2).

    req = check_pledge_request_cose(pvr, idevid_chain, own_cert, manufacturer_cas, now)
    got = await obtain_voucher_cose(masa, req, key, registrar_chain, now)
    got.for_pledge   # the MASA's voucher with x5bag/x5chain stripped: what the pledge gets

    voucher = await request_voucher_cose(registrar, pvr, idevid_chain)   # all of it, stored

``request_voucher_cose`` is what the CoAPS ``rv`` resource calls: the checks above, the
enrollment policy, the store (the request pending, refused or vouchered; the voucher as the MASA
sent it), a retried identical PVR answered from the store, and the stripped voucher returned.

``check_pledge_request_cose`` applies the registrar's checks to a pledge's COSE PVR. A PVR
carries no x5bag we may use (cBRSKI §9.2: the registrar ignores it): its signer is the IDevID
that authenticated the DTLS session, ``idevid_chain[0]``; the rest of that chain are the
intermediates to a manufacturer CA. The proximity evidence is the registrar's own certificate,
its SubjectPublicKeyInfo, or that SPKI's SHA-256 (cBRSKI §8.1 lets a pledge send any of them).

``obtain_voucher_cose`` builds the RVR as the HTTPS registrar does (``build_rvr``), signs it
with COSE, its x5bag carrying the registrar's chain and the pledge's IDevID chain (cBRSKI §9.2),
posts it to the MASA as ``application/voucher+cose`` and checks the answer is a voucher for this
pledge's serial-number and nonce, signed by a certificate of its x5bag. Errors: ``Refusal``
(the status the pledge should hear: the MASA's 403/404/406 passed on, else 502), ``NoMasa`` /
``MasaUnreachable`` from ``masa_client`` (answer "retry later"). Storage is the caller's.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import certs, cose
from brski.errors import BrskiError, DecodeError, SignatureError, ValidationError
from brski.signed_voucher import sign_voucher_cose, verify_voucher_cose, verify_voucher_request_cose
from brski.voucher import Assertion, Voucher

from .context import Registrar
from .masa_client import MasaClient, MasaUnreachable, NoMasa
from .store import Store
from .voucher_request import PledgeRequest, build_rvr
from .web import MEDIA_VOUCHER_COSE, Refusal

log = logging.getLogger(__name__)

PASSED_ON = (403, 404, 406)  # MASA decisions the pledge should hear as they are (as HTTPS)


@dataclass(frozen=True)
class ConstrainedVoucher:
    for_pledge: bytes  # x5bag/x5chain stripped (cBRSKI §6.8)
    from_masa: bytes  # exactly as the MASA sent it
    voucher: Voucher
    rvr: bytes  # the signed registrar voucher-request that got it


def check_pledge_request_cose(
    body: bytes,
    idevid_chain: Sequence[x509.Certificate],
    own_cert: x509.Certificate,
    manufacturer_cas: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> PledgeRequest:
    if not idevid_chain:
        raise Refusal(401, "no IDevID authenticated this session")
    idevid = idevid_chain[0]
    try:
        pvr, _ = verify_voucher_request_cose(body, manufacturer_cas, now, signer=idevid,
                                             extra_certs=idevid_chain[1:])
    except SignatureError as exc:
        raise Refusal(403, f"pledge voucher-request signature: {exc}") from exc
    except (DecodeError, ValidationError) as exc:
        raise Refusal(400, f"not a valid COSE pledge voucher-request: {exc}") from exc
    try:
        serial = certs.serial_number(idevid)
    except BrskiError as exc:
        raise Refusal(403, f"IDevID: {exc}") from exc
    if pvr.serial_number != serial:
        raise Refusal(403, f"voucher-request serial-number {pvr.serial_number!r} is not the "
                           f"IDevID's {serial!r}")
    if pvr.assertion is not Assertion.PROXIMITY:
        raise Refusal(401, "voucher-request assertion must be \"proximity\"")
    own_spki = certs.spki_der(own_cert)
    if pvr.proximity_registrar_cert is not None:
        seen_ok = pvr.proximity_registrar_cert == own_cert.public_bytes(
            serialization.Encoding.DER)
    elif pvr.proximity_registrar_pubk is not None:
        seen_ok = pvr.proximity_registrar_pubk == own_spki
    elif pvr.proximity_registrar_pubk_sha256 is not None:
        seen_ok = pvr.proximity_registrar_pubk_sha256 == hashlib.sha256(own_spki).digest()
    else:
        raise Refusal(401, "voucher-request names no proximity registrar (cert, pubk or "
                           "pubk-sha256)")
    if not seen_ok:
        # RFC 8995 §5.3: the pledge saw another server certificate: a man in the middle.
        raise Refusal(401, "the proximity registrar in the voucher-request is not this "
                           "registrar")
    return PledgeRequest(pvr, bytes(body), idevid, serial)


def sign_rvr_cose(req: PledgeRequest, key: cose.PrivateKey,
                  registrar_chain: Sequence[x509.Certificate],
                  idevid_chain: Sequence[x509.Certificate], now: datetime.datetime) -> bytes:
    """The COSE registrar voucher-request for ``req``; x5bag = both chains, once each."""
    bag: list[x509.Certificate] = []
    for cert in (*registrar_chain, *idevid_chain):
        if cert not in bag:
            bag.append(cert)
    return sign_voucher_cose(build_rvr(req, now), key, x5bag=bag)


async def obtain_voucher_cose(
    masa: MasaClient,
    req: PledgeRequest,
    key: cose.PrivateKey,
    registrar_chain: Sequence[x509.Certificate],
    idevid_chain: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> ConstrainedVoucher:
    rvr = sign_rvr_cose(req, key, registrar_chain, idevid_chain, now)
    return await ask_masa_cose(masa, req, rvr, now)


async def ask_masa_cose(masa: MasaClient, req: PledgeRequest, rvr: bytes,
                        now: datetime.datetime) -> ConstrainedVoucher:
    """Send the signed COSE ``rvr`` to the MASA the IDevID names; check its answer."""
    try:
        masa_url = certs.masa_url(req.idevid)
    except BrskiError as exc:
        raise Refusal(403, f"the IDevID's MASA URL extension is unusable: {exc}") from exc
    if masa_url is None:
        raise Refusal(404, "the IDevID has no MASA URL extension: no MASA to ask")
    try:
        answer = await masa.request_voucher(masa_url, rvr, MEDIA_VOUCHER_COSE)
    except NoMasa as exc:
        raise Refusal(403, str(exc)) from exc
    if answer.status != 200:
        reason = answer.body.decode("utf-8", "replace").strip()[:500] or "no reason given"
        status = answer.status if answer.status in PASSED_ON else 502
        raise Refusal(status, f"MASA refused the voucher request ({answer.status}): {reason}")
    if answer.content_type != MEDIA_VOUCHER_COSE:
        raise Refusal(502, f"MASA answered {answer.content_type}, not {MEDIA_VOUCHER_COSE}")
    try:
        # As over HTTPS: the signature with the certificates the voucher carries (trusting the
        # MASA is the pledge's business) and that it is the voucher we asked for.
        voucher, _ = verify_voucher_cose(answer.body, None, now, serial_number=req.serial,
                                         nonce=req.pvr.nonce)
        for_pledge = cose.without_x5(answer.body)
    except BrskiError as exc:
        raise Refusal(502, f"the MASA's voucher does not fit the request: {exc}") from exc
    log.info("COSE voucher for %s obtained from %s (assertion %s)", req.serial, masa_url,
             voucher.assertion.yang_name if voucher.assertion is not None else None)
    return ConstrainedVoucher(for_pledge, answer.body, voucher, rvr)


async def request_voucher_cose(reg: Registrar, pvr: bytes,
                               idevid_chain: Sequence[x509.Certificate]) -> bytes:
    """The voucher for the pledge (x5bag stripped), or ``Refusal`` / ``MasaUnreachable``
    (answer "retry later": the pledge resends the same PVR, RFC 8995 §5.6)."""
    now = reg.now()
    req = check_pledge_request_cose(pvr, idevid_chain, reg.config.server_cert,
                                    reg.config.manufacturer_cas, now)
    reg.check_enrollment_policy(req.serial)
    idevid = req.idevid.public_bytes(serialization.Encoding.DER)
    known = reg.store.voucher_for_request(req.sha256)
    if known is not None:
        await reg.write(lambda s: s.pledge_seen(req.serial, idevid, "voucher-requested"))
        log.info("COSE voucher for %s: the same request again, answering with the voucher "
                 "already obtained", req.serial)
        return cose.without_x5(known.voucher)
    rvr = sign_rvr_cose(req, reg.config.tls_key, reg.rvr_certificates,  # type: ignore[arg-type]
                        idevid_chain, now)

    request_id, update = await reg.record_voucher_request(req, idevid, rvr)

    try:
        got = await ask_masa_cose(reg.masa, req, rvr, now)
    except MasaUnreachable as exc:
        log.warning("MASA for %s unreachable (%s); the pledge must retry", req.serial, exc)
        await update("pending", f"MASA unreachable: {exc}")
        raise
    except Refusal as refusal:
        await update("refused", refusal.reason)
        raise
    assertion = got.voucher.assertion.yang_name if got.voucher.assertion is not None else None

    def record_voucher(store: Store) -> None:
        store.add_voucher(req.serial, got.from_masa, request_id=request_id,
                          assertion=assertion, nonce=req.nonce_text)
        store.pledge_seen(req.serial, None, "vouchered")

    await reg.write(record_voucher)
    return got.for_pledge
