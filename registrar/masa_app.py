"""The MASA's HTTP endpoints (RFC 8995 §5.5, §5.8) over TLS; decisions live in ``masa``.

    POST /.well-known/brski/requestvoucher   application/voucher-cms+json -> voucher (CMS)
                                             application/voucher+cose -> voucher (COSE, cBRSKI)
    POST /.well-known/brski/requestauditlog  application/voucher-cms+json -> audit log (JSON)

The answer has the request's format. Errors are plain text: 400 malformed (also a body that
is not what its Content-Type says), 403 refused, 404 unknown device, 406 an Accept header
that excludes the voucher type we issue, 415 another Content-Type.
"""

from __future__ import annotations

import datetime

from aiohttp import web

from brski import cms, cose
from brski.voucher import decode_payload

from .masa import Masa
from .tls_server import name_text
from .web import (
    MEDIA_JSON,
    MEDIA_VOUCHER_CMS,
    MEDIA_VOUCHER_COSE,
    Refusal,
    accepts,
    new_application,
    read_body,
    require_content_type,
)

MASA_KEY: web.AppKey[Masa] = web.AppKey("masa", Masa)


async def request_voucher(request: web.Request) -> web.Response:
    media = request.content_type
    if media not in (MEDIA_VOUCHER_CMS, MEDIA_VOUCHER_COSE):
        got = request.headers.get("Content-Type", "none")
        raise Refusal(415, f"Content-Type must be {MEDIA_VOUCHER_CMS} or {MEDIA_VOUCHER_COSE}, "
                           f"not {got}")
    if not accepts(request.headers.get("Accept"), media):
        # The voucher has the request's format (cBRSKI §6.8: the registrar uses the PVR's).
        raise Refusal(406, f"a {media} request gets a {media} voucher; "
                           f"Accept was {request.headers['Accept']}")
    body = await read_body(request)
    masa = request.app[MASA_KEY]
    now = datetime.datetime.now(datetime.UTC)
    try:
        voucher = await masa.request_voucher_async(body, now,
                                                   cose_form=media == MEDIA_VOUCHER_COSE)
    except Refusal as refusal:
        refusal.identity = claimed_identity_cose(body) if media == MEDIA_VOUCHER_COSE \
            else claimed_identity(body)
        raise
    return web.Response(body=voucher, content_type=media)


async def request_audit_log(request: web.Request) -> web.Response:
    require_content_type(request, MEDIA_VOUCHER_CMS)
    if not accepts(request.headers.get("Accept"), MEDIA_JSON):
        raise Refusal(406, f"the audit log is {MEDIA_JSON}")
    body = await read_body(request)
    try:
        log = request.app[MASA_KEY].audit_log(body, datetime.datetime.now(datetime.UTC))
    except Refusal as refusal:
        refusal.identity = claimed_identity(body)
        raise
    return web.Response(body=log, content_type=MEDIA_JSON)


def claimed_identity(body: bytes) -> str:
    """For the log line of a refused request: the device serial number the registrar
    voucher-request names and the certificate that signed it, as claimed (a refused request
    may well be forged: that is what the log must show)."""
    try:
        signed = cms.parse(body)
    except Exception:  # for a log line only: any failure means "cannot say"
        return "not a CMS signed request"
    parts = []
    try:
        serial = getattr(decode_payload(signed.content), "serial_number", None)
        if serial:
            parts.append(f"device {serial}")
    except Exception:  # for a log line only
        pass
    try:
        parts.append(f"signed by {name_text(cms.find_signer(signed).subject)}")
    except Exception:  # for a log line only
        parts.append("signer certificate not included")
    return "claims " + ", ".join(parts)


def claimed_identity_cose(body: bytes) -> str:
    """``claimed_identity`` for a COSE registrar voucher-request: the serial its payload
    names and the x5bag certificates, as claimed (the signer is not known unverified)."""
    try:
        msg = cose.decode(body)
    except Exception:  # for a log line only
        return "not a COSE_Sign1 request"
    parts = []
    try:
        serial = getattr(decode_payload(msg.payload), "serial_number", None)
        if serial:
            parts.append(f"device {serial}")
    except Exception:  # for a log line only
        pass
    names = [name_text(c.subject) for c in msg.x5bag]
    parts.append(f"x5bag {'; '.join(names)}" if names else "no x5bag")
    return "claims " + ", ".join(parts)


def make_app(masa: Masa) -> web.Application:
    app = new_application()
    app[MASA_KEY] = masa
    app.router.add_post("/.well-known/brski/requestvoucher", request_voucher)
    app.router.add_post("/.well-known/brski/requestauditlog", request_audit_log)
    return app
