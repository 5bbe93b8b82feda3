"""The MASA's HTTP endpoints (RFC 8995 §5.5, §5.8) over TLS; decisions live in ``masa``.

    POST /.well-known/brski/requestvoucher   application/voucher-cms+json -> voucher (CMS)
    POST /.well-known/brski/requestauditlog  application/voucher-cms+json -> audit log (JSON)

Errors are plain text: 400 malformed, 403 refused, 404 unknown device, 406 an Accept header
that excludes the voucher type we issue, 415 another Content-Type.
"""

from __future__ import annotations

import datetime

from aiohttp import web

from .masa import Masa
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
    voucher = masa.request_voucher(body, datetime.datetime.now(datetime.UTC))
    return web.Response(body=voucher, content_type=MEDIA_VOUCHER_CMS)


async def request_audit_log(request: web.Request) -> web.Response:
    require_content_type(request, MEDIA_VOUCHER_CMS)
    if not accepts(request.headers.get("Accept"), MEDIA_JSON):
        raise Refusal(406, f"the audit log is {MEDIA_JSON}")
    body = await read_body(request)
    log = request.app[MASA_KEY].audit_log(body, datetime.datetime.now(datetime.UTC))
    return web.Response(body=log, content_type=MEDIA_JSON)


def make_app(masa: Masa) -> web.Application:
    app = new_application()
    app[MASA_KEY] = masa
    app.router.add_post("/.well-known/brski/requestvoucher", request_voucher)
    app.router.add_post("/.well-known/brski/requestauditlog", request_audit_log)
    return app
