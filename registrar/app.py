"""The registrar's HTTPS application: routes and the TLS context.

Pledges authenticate with their IDevID: the TLS context asks for a client certificate
(``CERT_OPTIONAL``, so /cacerts stays reachable without one) and verifies it against the
manufacturer CAs and the domain CA (for LDevID holders). A certificate from any other CA fails
the handshake. Each endpoint then decides what the authenticated client may do.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from . import brski_handlers, est
from .config import RegistrarConfig
from .context import REGISTRAR, Registrar
from .web import RETRY_AFTER, new_application, server_ssl_context

BRSKI = "/.well-known/brski"
EST = "/.well-known/est"


def make_app(registrar: Registrar) -> web.Application:
    app = new_application()
    app[REGISTRAR] = registrar
    app[RETRY_AFTER] = registrar.config.retry_after  # also for a 503 while the store is down
    app.router.add_post(f"{BRSKI}/requestvoucher", brski_handlers.request_voucher)
    app.router.add_post(f"{BRSKI}/voucher_status", brski_handlers.voucher_status)
    app.router.add_post(f"{BRSKI}/enrollstatus", brski_handlers.enroll_status)
    app.router.add_get(f"{EST}/cacerts", est.cacerts)
    app.router.add_get(f"{EST}/csrattrs", est.csrattrs)
    app.router.add_post(f"{EST}/simpleenroll", est.simple_enroll)
    app.router.add_post(f"{EST}/simplereenroll", est.simple_reenroll)
    return app


def tls_context(config: RegistrarConfig) -> ssl.SSLContext:
    ctx = server_ssl_context(
        config.cert_file, config.key_file,
        client_cas=[*config.manufacturer_cas, config.ca_cert],
        client_cert=ssl.CERT_OPTIONAL, min_version=config.tls_min_version)
    # One TLS 1.3 session ticket per connection instead of OpenSSL's two: a pledge resumes
    # at most its next connection, and each ticket costs the server as much as a third of
    # the handshake (0.25 ms, measured: it seals the session with the client's chain).
    ctx.num_tickets = 1
    return ctx
