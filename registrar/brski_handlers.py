"""The registrar's BRSKI endpoints (RFC 8995 §5.2–5.7, §5.9.4).

    POST /.well-known/brski/requestvoucher  PVR (CMS) -> voucher (CMS), or 202 + Retry-After
    POST /.well-known/brski/voucher_status  JSON telemetry -> 200
    POST /.well-known/brski/enrollstatus    JSON telemetry -> 200

requestvoucher statuses: 400 malformed, 401 proximity check failed (then the connection is
closed, §5.3), 403 bad signature / not this IDevID / not allowed by enrollment policy,
406 the pledge does not accept CMS vouchers, 415 wrong Content-Type; MASA refusals 403/404/406
are passed on with the MASA's reason; 202 + Retry-After while the MASA cannot be reached
(the pledge resends the same request, which is then retried; §5.6); 502 the MASA answered
nonsense.
"""

from __future__ import annotations

import logging

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from brski import certs
from brski.errors import BrskiError
from brski.signed_voucher import sign_voucher_cms, verify_voucher_cms
from brski.telemetry import StatusReport

from .context import REGISTRAR, Registrar
from .identity import Client, Kind, require_pledge
from .masa_client import MasaUnreachable, NoMasa
from .store import Store
from .voucher_request import PledgeRequest, build_rvr, check_pledge_request
from .web import (
    MEDIA_JSON,
    MEDIA_VOUCHER_CMS,
    Refusal,
    accepts,
    plain,
    read_body,
    require_content_type,
)

log = logging.getLogger(__name__)

PASSED_ON = (403, 404, 406)  # MASA decisions the pledge should hear as they are


async def request_voucher(request: web.Request) -> web.Response:
    reg = request.app[REGISTRAR]
    require_content_type(request, MEDIA_VOUCHER_CMS)
    if not accepts(request.headers.get("Accept"), MEDIA_VOUCHER_CMS):
        raise Refusal(406, f"this registrar returns {MEDIA_VOUCHER_CMS} vouchers only")
    client = require_pledge(reg.client(request))
    body = await read_body(request)
    now = reg.now()
    req = check_pledge_request(body, client.cert, reg.config.server_cert,
                               reg.config.manufacturer_cas, now)
    reg.check_enrollment_policy(req.serial)
    idevid = _der(client.cert)

    known = reg.store.voucher_for_request(req.sha256)
    if known is not None:
        await reg.write(lambda s: s.pledge_seen(req.serial, idevid, "voucher-requested"))
        log.info("voucher for %s: the same request again, answering with the voucher "
                 "already obtained", req.serial)
        return web.Response(body=known.voucher, content_type=MEDIA_VOUCHER_CMS)
    return await _ask_masa(reg, req, idevid)


async def _ask_masa(reg: Registrar, req: PledgeRequest, idevid: bytes) -> web.Response:
    now = reg.now()
    try:
        masa_url = certs.masa_url(req.idevid)
    except BrskiError as exc:
        await reg.write(lambda s: s.pledge_seen(req.serial, idevid, "voucher-requested"))
        raise Refusal(403, f"the IDevID's MASA URL extension is unusable: {exc}") from exc
    if masa_url is None:
        await reg.write(lambda s: s.pledge_seen(req.serial, idevid, "voucher-requested"))
        raise Refusal(404, "the IDevID has no MASA URL extension: no MASA to ask")
    rvr = build_rvr(req, now)
    signed = sign_voucher_cms(rvr, reg.config.tls_key,  # type: ignore[arg-type]
                              reg.rvr_certificates, now)

    request_id, update = await reg.record_voucher_request(req, idevid, signed)

    try:
        answer = await reg.masa.request_voucher(masa_url, signed)
    except NoMasa as exc:
        await update("refused", str(exc))
        raise Refusal(403, str(exc)) from exc
    except MasaUnreachable as exc:
        retry = reg.config.retry_after
        log.warning("MASA for %s unreachable (%s); answering 202, retry after %d s",
                    req.serial, exc, retry)
        await update("pending", f"MASA unreachable: {exc}")
        return plain(202, f"the MASA cannot be reached now; send the same request again "
                          f"in {retry} s", {"Retry-After": str(retry)})
    if answer.status == 202:
        retry = reg.config.retry_after
        return plain(202, "the MASA is processing the request", {"Retry-After": str(retry)})
    if answer.status != 200:
        reason = answer.body.decode("utf-8", "replace").strip()[:500] or "no reason given"
        await update("refused", f"MASA {answer.status}: {reason}")
        status = answer.status if answer.status in PASSED_ON else 502
        raise Refusal(status, f"MASA refused the voucher request ({answer.status}): {reason}")
    if answer.content_type != MEDIA_VOUCHER_CMS:
        raise Refusal(502, f"MASA answered {answer.content_type}, not {MEDIA_VOUCHER_CMS}")
    try:
        # Signature with the certificates the voucher carries; trust in the MASA is the
        # pledge's business (RFC 8995 §5.6.1). We check it is the voucher we asked for.
        voucher, _signer = verify_voucher_cms(answer.body, None, now, serial_number=req.serial,
                                              nonce=req.nonce_text)
    except BrskiError as exc:
        await update("refused", f"bad voucher: {exc}")
        raise Refusal(502, f"the MASA's voucher does not fit the request: {exc}") from exc
    assertion = voucher.assertion.yang_name if voucher.assertion is not None else None

    def record_voucher(store: Store) -> None:
        store.add_voucher(req.serial, answer.body, request_id=request_id,
                          assertion=assertion, nonce=req.nonce_text)
        store.pledge_seen(req.serial, None, "vouchered")

    await reg.write(record_voucher)
    log.info("voucher for %s obtained from %s (assertion %s)", req.serial, masa_url, assertion)
    return web.Response(body=answer.body, content_type=MEDIA_VOUCHER_CMS)


async def voucher_status(request: web.Request) -> web.Response:
    return await _telemetry(request, "voucher_status")


async def enroll_status(request: web.Request) -> web.Response:
    return await _telemetry(request, "enrollstatus")


async def _telemetry(request: web.Request, kind: str) -> web.Response:
    reg = request.app[REGISTRAR]
    require_content_type(request, MEDIA_JSON)
    client = reg.client(request)
    if client is None:
        raise Refusal(401, "status reports need the pledge's IDevID or LDevID")
    body = await read_body(request)
    try:
        report = StatusReport.decode_json(body)
    except BrskiError as exc:
        raise Refusal(400, f"not a {kind} report: {exc}") from exc
    await record_telemetry(reg, client, kind, body, report)
    return plain(200, "recorded")


async def record_telemetry(reg: Registrar, client: Client, kind: str, body: bytes,
                           report: StatusReport) -> None:
    """Store and log a status report, over HTTPS or CoAPS alike (``body`` as received)."""
    matches = _matches_record(reg, client.cert, client.kind, client.serial)
    await reg.write(lambda s: s.add_telemetry(client.serial, kind, body,
                                              version=report.version, status=report.status,
                                              reason=report.reason,
                                              client_cert_matches=matches))
    # RFC 8995 §5.9.4: log whether the report came over a session with a matching client
    # certificate; a newer version deserves a human's attention.
    log.log(logging.INFO if report.status else logging.WARNING,
            "%s from %s (%s, %s): %s%s", kind, client.serial, client.kind.value,
            "certificate on record" if matches else "certificate NOT on record",
            "success" if report.status else "failure",
            f": {report.reason}" if report.reason else "")
    if report.version > 1:
        log.warning("%s from %s has version %d (we know 1): please look at it", kind,
                    client.serial, report.version)


def _matches_record(reg: Registrar, cert: object, kind: Kind, serial: str | None) -> bool:
    if serial is None:
        return False
    der = _der(cert)
    if kind is Kind.LDEVID:
        return any(c.der == der for c in reg.store.certificates(serial))
    pledge = reg.store.pledge(serial)
    return pledge is not None and pledge["idevid"] == der


def _der(cert: object) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined]
