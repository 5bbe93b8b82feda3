"""HTTP plumbing shared by the registrar and the MASA (aiohttp).

* ``Refusal``: raise it anywhere in a handler to answer with a status and a plain-text reason
  (RFC 8995 §5.6: MASA error bodies are plain UTF-8 text; the registrar does the same).
* ``error_middleware``: turns ``Refusal`` and aiohttp's own errors (404 unknown path, 405,
  413 body too large) into plain-text answers, the store out of reach (``store.unavailable``:
  locked, full, a database server down) into 503 with Retry-After (``RETRY_AFTER``, the
  registrar's ``[masa] retry_after``), and any other exception into a logged 500, so a bad
  request never takes a server down.
* ``server_ssl_context``, ``peer_certificate``: TLS with optional client certificates.
* ``serve``: binds every listen address (TLS through ``tls_server``, so a refused handshake
  sends its alert and is logged and counted), logs ``ready: listening on ...``, tells systemd
  READY=1 and runs until SIGTERM/SIGINT.

Every refusal, in the TLS handshake or of a request, is logged once at warning level with the
client certificate's subject, serial number and issuer (for the registrar: the pledge's IDevID
or LDevID; the TCP peer is often a join proxy) and counted in ``METRICS`` by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import service_notify
from coaps_io.log_limit import REFUSAL_LOG_BURST, LogLimiter

from .metrics import TLS_ENDPOINT, ServiceMetrics, status_reason
from .store import unavailable
from .tls_server import (
    AlertingTLSSite,
    TlsRefusal,
    capture_client_certificates,
    certificate_identity,
)
from .tomlconfig import ListenAddress

log = logging.getLogger(__name__)

MEDIA_VOUCHER_CMS = "application/voucher-cms+json"
MEDIA_VOUCHER_COSE = "application/voucher+cose"  # cBRSKI; CoAP Content-Format 836
MEDIA_JSON = "application/json"
MAX_BODY = 256 * 1024  # a voucher-request with two chains is a few KiB
READY = "ready: listening on"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
METRICS: web.AppKey[ServiceMetrics] = web.AppKey("metrics", ServiceMetrics)
RETRY_AFTER: web.AppKey[int] = web.AppKey("retry_after", int)  # s; with a 503 for the store
DEFAULT_RETRY_AFTER = 5
STORE_UNAVAILABLE = "store-unavailable"  # the metric's reason
# An outage fails every request: the first lines a minute say so, a summary the rest.
_store_log = LogLimiter(log, burst=3)


class Refusal(Exception):
    """An answer other than success: HTTP status, plain-text reason, optional headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None,
                 *, close: bool = False, label: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.close = close  # RFC 8995 §5.3: after 401 the registrar closes the connection
        self.label = label or status_reason(status)  # the metric's reason
        # Who was refused, when the TLS client certificate does not say (the MASA's client is
        # a registrar; the pledge is named inside the request).
        self.identity: str | None = None


def plain(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text.rstrip("\n") + "\n",
                        content_type="text/plain", charset="utf-8", headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Refusal as refusal:
        # WARNING: a misbehaving or refused peer is worth seeing, not an error of ours.
        log.warning("%s %s from %s (%s): %d %s", request.method, request.path, _peer(request),
                    refusal.identity or _identity(request), refusal.status, refusal.reason)
        _count(request, refusal.label)
        response = plain(refusal.status, refusal.reason, refusal.headers)
        if refusal.close:
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        log.info("%s %s from %s (%s): %d %s", request.method, request.path, _peer(request),
                 _identity(request), exc.status, exc.reason)
        _count(request, status_reason(exc.status))
        allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if exc.status == 404:
            text = f"no such endpoint: {request.path}"
        elif exc.status == 405:
            text = f"{request.method} is not allowed on {request.path} (allowed: " \
                   f"{', '.join(allow.values()) or 'none'})"
        elif exc.status == 413:
            text = f"request body too large (limit {MAX_BODY} bytes)"
        else:
            text = exc.text or exc.reason
        return plain(exc.status, text, allow)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if unavailable(exc):
            retry = request.app.get(RETRY_AFTER, DEFAULT_RETRY_AFTER)
            _store_log.flush()
            if _store_log.allow(STORE_UNAVAILABLE, logging.ERROR):
                log.error("%s %s from %s (%s): 503, the store is unavailable (%s: %s); "
                          "Retry-After %d s", request.method, request.path, _peer(request),
                          _identity(request), type(exc).__name__,
                          str(exc).strip().splitlines()[0] if str(exc).strip() else "-", retry)
            _count(request, STORE_UNAVAILABLE)
            return plain(503, f"the store is unavailable; retry in {retry} s",
                         {"Retry-After": str(retry)})
        log.exception("%s %s from %s (%s): internal error", request.method, request.path,
                      _peer(request), _identity(request))
        _count(request, status_reason(500))
        return plain(500, "internal error (logged at the server)")


def _endpoint(request: web.Request) -> str:
    """The metric's endpoint: the route's last path segment; "unknown" for other paths (a
    label per unknown path would let any client grow the series without bound)."""
    route = request.match_info.route
    if route.resource is None or not route.resource.canonical:
        return "unknown"
    return route.resource.canonical.rstrip("/").rsplit("/", 1)[-1] or "unknown"


def _count(request: web.Request, reason: str) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.refused(_endpoint(request), reason)


def _identity(request: web.Request) -> str:
    try:
        return certificate_identity(peer_certificate(request))
    except ValueError:
        return "unparsable client certificate"


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "?"
    return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"


def require_content_type(request: web.Request, expected: str) -> None:
    """415 unless the request's media type is ``expected`` (parameters ignored)."""
    if request.content_type != expected:
        got = request.headers.get("Content-Type", "none")
        raise Refusal(415, f"Content-Type must be {expected}, not {got}")


def accepts(header: str | None, media: str) -> bool:
    """True if an Accept header admits ``media`` (no header admits everything)."""
    if not header:
        return True
    major = media.split("/", 1)[0]
    for item in header.split(","):
        kind = item.split(";", 1)[0].strip().lower()
        params = [p.strip().replace(" ", "") for p in item.split(";")[1:]]
        if "q=0" in params or "q=0.0" in params:
            continue
        if kind in (media, "*/*", f"{major}/*"):
            return True
    return False


async def read_body(request: web.Request, *, required: bool = True) -> bytes:
    body = await request.read()  # bounded by the application's client_max_size
    if required and not body:
        raise Refusal(400, "empty request body")
    return body


def new_application(*, middlewares: Sequence[object] = ()) -> web.Application:
    return web.Application(client_max_size=MAX_BODY,
                           middlewares=[error_middleware, *middlewares])  # type: ignore[list-item]


# --- TLS ------------------------------------------------------------------------------------


def server_ssl_context(
    cert_file: Path, key_file: Path, *, client_cas: Sequence[x509.Certificate] = (),
    client_cert: ssl.VerifyMode = ssl.CERT_NONE, min_version: str = "1.2",
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if min_version == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.load_cert_chain(str(cert_file), str(key_file))
    if client_cas:
        ctx.load_verify_locations(cadata=_pem(client_cas))
    ctx.verify_mode = client_cert
    if client_cert != ssl.CERT_NONE:
        capture_client_certificates(ctx)  # to name a refused client (tls_server)
    return ctx


def client_ssl_context(ca_files: Sequence[Path], *, cert_file: Path | None = None,
                       key_file: Path | None = None) -> ssl.SSLContext:
    """Verifying client context: ``ca_files``, or the system store if empty."""
    if ca_files:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for path in ca_files:
            ctx.load_verify_locations(cafile=str(path))
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def _pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The TLS client certificate (already chain-verified by the TLS layer), or None."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


# --- running --------------------------------------------------------------------------------


def tls_refused(metrics: ServiceMetrics | None) -> Callable[[TlsRefusal], None]:
    # A flood of bad handshakes is counted in full but logged as the first few per reason a
    # minute and one summary line, as the CoAPS side does.
    log_limit = LogLimiter(log, burst=REFUSAL_LOG_BURST)

    def report(refusal: TlsRefusal) -> None:
        log_limit.flush()
        if log_limit.allow(f"TLS handshakes refused ({refusal.reason})"):
            log.warning("TLS handshake from %s refused (%s): %s; %s", refusal.peer,
                        refusal.reason, refusal.detail, refusal.identity())
        if metrics is not None:
            metrics.refused(TLS_ENDPOINT, refusal.reason)
    return report


async def serve(app: web.Application, listen: Sequence[ListenAddress],
                ssl_context: ssl.SSLContext, name: str,
                on_started: Callable[[], Awaitable[None]] | None = None,
                notifier: service_notify.Notifier | None = None,
                metrics: ServiceMetrics | None = None) -> None:
    """Bind every address (failing as a whole if one cannot be bound), then run until
    SIGTERM or SIGINT. READY=1 goes to systemd once every address is bound and
    ``on_started`` has run; the app's ``METRICS``, if any, count the refusals."""
    notifier = notifier or service_notify.Notifier()
    if metrics is not None:
        app[METRICS] = metrics
    on_refused = tls_refused(metrics)
    runner = web.AppRunner(app, access_log=logging.getLogger(f"{name}.access"),
                           access_log_format='%a "%r" %s %b', handle_signals=False,
                           shutdown_timeout=2.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for address in listen:
            site = AlertingTLSSite(runner, address.host, address.port, ssl_context,
                                   on_refused)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from exc
        if on_started is not None:
            await on_started()
        where = ", ".join(str(a) for a in listen)
        log.info("%s %s", READY, where)
        notifier.send(service_notify.ready(f"listening on {where}"))
        await stop.wait()
        log.info("stopping")
        notifier.send(service_notify.stopping())
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await runner.cleanup()
