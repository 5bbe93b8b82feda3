"""The MASA's HTTP endpoints (RFC 8995 §5.5, §5.8) over TLS; decisions live in ``masa``.

    POST /.well-known/brski/requestvoucher   application/voucher-cms+json -> voucher (CMS)
    POST /.well-known/brski/requestauditlog  application/voucher-cms+json -> audit log (JSON)

Errors are plain text: 400 malformed, 403 refused, 404 unknown device, 406 an Accept header
that excludes the voucher type we issue, 415 another Content-Type.
"""

from __future__ import annotations

import datetime

from aiohttp import web

from brski import cms
from brski.voucher import decode_payload

from .masa import Masa
from .tls_server import name_text
from .web import (
    MEDIA_JSON,
    MEDIA_VOUCHER_CMS,
    Refusal,
    accepts,
    new_application,
    read_body,
    require_content_type,
)

MASA_KEY: web.AppKey[Masa] = web.AppKey("masa", Masa)


async def request_voucher(request: web.Request) -> web.Response:
    require_content_type(request, MEDIA_VOUCHER_CMS)
    if not accepts(request.headers.get("Accept"), MEDIA_VOUCHER_CMS):
        raise Refusal(406, f"this MASA issues {MEDIA_VOUCHER_CMS} vouchers only; "
                           f"Accept was {request.headers['Accept']}")
    body = await read_body(request)
    masa = request.app[MASA_KEY]
    try:
        voucher = masa.request_voucher(body, datetime.datetime.now(datetime.UTC))
    except Refusal as refusal:
        refusal.identity = claimed_identity(body)
        raise
    return web.Response(body=voucher, content_type=MEDIA_VOUCHER_CMS)


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


def make_app(masa: Masa) -> web.Application:
    app = new_application()
    app[MASA_KEY] = masa
    app.router.add_post("/.well-known/brski/requestvoucher", request_voucher)
    app.router.add_post("/.well-known/brski/requestauditlog", request_audit_log)
    return app
