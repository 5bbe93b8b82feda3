"""HTTPS listeners whose refused TLS handshakes end with an alert, and are told who and why.

asyncio's TLS layer drops the alert OpenSSL writes when it refuses a handshake: on failure it
closes the socket at once, with the alert still in the outgoing memory BIO, so a pledge with an
IDevID from an unknown manufacturer saw only a FIN ("Empty reply from server") and nothing was
logged above debug level. ``AlertingTLSProtocol`` sends what OpenSSL wrote and closes the socket
gracefully, then reports a ``TlsRefusal``.

OpenSSL keeps no peer certificate after a failed verification, so the client's Certificate
handshake message is captured as OpenSSL reads it (the context's message callback, a CPython
debugging hook with a leading underscore; the only way to see it from the ``ssl`` module) and
the refusal names the certificate's subject, serial number and issuer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from brski.errors import DecodeError
from brski.tls_certificate import CERTIFICATE, leaf_certificate

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
HANDSHAKE_RECORD = 22  # TLS ContentType handshake

# X509_V_ERR_* codes (OpenSSL x509_vfy.h) grouped by the reason an operator needs to act on.
_UNKNOWN_CA = {2, 3, 18, 19, 20, 21}  # no issuer known, self-signed leaf or chain
_EXPIRED = {10, 12}
_NOT_YET_VALID = {9, 11}

# The Certificate message each handshake in progress received (key: the SSLObject).
_client_certificates: weakref.WeakKeyDictionary[object, bytes] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class TlsRefusal:
    peer: str  # the TCP peer: a join proxy's address, or the pledge's own
    reason: str  # metric label: tls-unknown-ca, tls-certificate-expired, ...
    detail: str  # OpenSSL's words
    certificate: x509.Certificate | None

    def identity(self) -> str:
        return certificate_identity(self.certificate)


# A pledge's IDevID names the device in its subject's serialNumber (RFC 8995 §2.3.1): spelt
# out rather than as the bare OID 2.5.4.5.
_NAMES = {NameOID.SERIAL_NUMBER: "serialNumber"}


def name_text(name: x509.Name) -> str:
    return name.rfc4514_string(_NAMES) or "(empty)"


def certificate_identity(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "no client certificate"
    return (f"subject {name_text(cert.subject)}, serial {cert.serial_number:x}, "
            f"issuer {name_text(cert.issuer)}")


def verify_reason(code: int) -> str:
    """The metric label for an X509_V_ERR_* code (TLS here, DTLS in ``registrar.coaps``)."""
    if code in _UNKNOWN_CA:
        return "tls-unknown-ca"
    if code in _EXPIRED:
        return "tls-certificate-expired"
    if code in _NOT_YET_VALID:
        return "tls-certificate-not-yet-valid"
    return "tls-bad-certificate"


def refusal_reason(exc: BaseException) -> tuple[str, str]:
    """(metric label, detail) for a failed server handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return verify_reason(exc.verify_code), f"client certificate: {exc.verify_message}"
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return "tls-handshake-failed", str(reason).lower().replace("_", " ")


def capture_client_certificates(ctx: ssl.SSLContext) -> None:
    """Keep each client's end-entity certificate as it arrives, verified or not."""

    def on_message(conn: object, direction: str, version: object, content_type: object,
                   msg_type: object, data: bytes) -> None:
        if direction != "read" or content_type != HANDSHAKE_RECORD:
            return
        if msg_type != CERTIFICATE or not data or data[0] != CERTIFICATE:
            return
        try:
            der = leaf_certificate(data, tls13=version == ssl.TLSVersion.TLSv1_3)
        except DecodeError:
            return  # OpenSSL refuses it too, with its own reason
        if der is not None:
            _client_certificates[conn] = der

    # The C-level hook itself: ssl.SSLContext's property wraps the callback in a function
    # that turns every number into an enum first, for every record and message of every
    # handshake (0.1 ms a handshake, measured), while this one compares plain numbers.
    _RAW_MSG_CALLBACK.__set__(ctx, on_message)


_RAW_MSG_CALLBACK = super(ssl.SSLContext, ssl.SSLContext)._msg_callback  # type: ignore[misc]


def _client_certificate(sslobj: object) -> x509.Certificate | None:
    der = _client_certificates.pop(sslobj, None) if sslobj is not None else None
    if der is None:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def format_peer(peer: object) -> str:
    if not isinstance(peer, tuple) or len(peer) < 2:
        return "?"
    return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"


OnRefused = Callable[[TlsRefusal], None]


class AlertingTLSProtocol(sslproto.SSLProtocol):
    """The server side of asyncio's TLS protocol, but a refused handshake sends its alert."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app_protocol: asyncio.BaseProtocol,
                 ctx: ssl.SSLContext, on_refused: OnRefused) -> None:
        super().__init__(loop, app_protocol, ctx, None, server_side=True,
                         ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        self._on_refused = on_refused
        self._refused = False
        self._spoke = False

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes > 0:
            self._spoke = True
        super().buffer_updated(nbytes)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None and not self._spoke:
            # Connected and closed without a byte: a health probe (joinproxyd's TCP check)
            # or a port scan. Nobody was refused, so nothing is counted or warned about.
            peer = self._transport.get_extra_info("peername") if self._transport else None
            log.debug("TCP connection from %s closed before a TLS ClientHello",
                      format_peer(peer))
        elif handshake_exc is not None and not self._refused:
            self._refused = True
            # The alert is in the outgoing BIO: hand it to the socket before closing.
            self._process_outgoing()  # type: ignore[attr-defined]
            peer = self._transport.get_extra_info("peername") if self._transport else None
            reason, detail = refusal_reason(handshake_exc)
            refusal = TlsRefusal(format_peer(peer), reason, detail,
                                 _client_certificate(self._sslobj))  # type: ignore[attr-defined]
            try:
                self._on_refused(refusal)
            except Exception:  # a reporting bug must not keep the connection open
                log.exception("reporting a refused TLS handshake failed")
        elif handshake_exc is None:
            _client_certificates.pop(self._sslobj, None)  # type: ignore[attr-defined]
        super()._on_handshake_complete(handshake_exc)  # type: ignore[misc]

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        if self._refused and self._transport is not None:
            # close(), not the default abort: it sends the buffered alert, then a FIN.
            self._transport.close()
            return
        super()._fatal_error(exc, message)  # type: ignore[misc]


class AlertingTLSSite(web.TCPSite):
    """aiohttp's TCPSite, with ``AlertingTLSProtocol`` in place of the loop's TLS layer."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, ctx: ssl.SSLContext,
                 on_refused: OnRefused) -> None:
        super().__init__(runner, host, port, ssl_context=ctx)
        self._ctx = ctx
        self._refused_callback = on_refused

    async def start(self) -> None:
        self._runner._reg_site(self)  # BaseSite.start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def factory() -> asyncio.BaseProtocol:
            return AlertingTLSProtocol(loop, server(), self._ctx, self._refused_callback)

        self._server = await loop.create_server(factory, self._host, self._port,
                                                backlog=self._backlog)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
