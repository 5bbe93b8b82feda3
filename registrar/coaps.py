"""The registrar's CoAPS front door: cBRSKI and EST-coaps over certificate DTLS (issue 13).

    POST /.well-known/brski/rv    CF 836 COSE PVR -> 2.04 CF 836 voucher (x5bag stripped);
                                  5.03 + Max-Age while the MASA cannot be reached
    POST /.well-known/brski/vs    CF 60 (or 50) telemetry -> 2.04 empty
    POST /.well-known/brski/es    as vs
    GET  /.well-known/est/crts    -> 2.05, Accept 281 (default), 287 or 62; ETag, Size2
    POST /.well-known/est/sen     CF 286 CSR -> 2.04, 281 (default) or 287 per Accept
    POST /.well-known/est/sren    as sen, for an LDevID of this domain
    GET  /.well-known/est/att     -> 2.05 CF 285
    GET  /.well-known/core        links, filterable (?rt=brski*, ?rt=ace.est*)

One UDP port (``[coaps] listen``, off unless configured) through ``coaps_io``; aiocoap does
the CoAP (block-wise, deduplication, Uri-Path-Abbrev 401-403/301-306). Each request goes
through the same checks, store and CA as the HTTPS registrar (``constrained_voucher``,
``brski_handlers.record_telemetry``, ``est.issue_ldevid``): one registrar, two transports.

The DTLS handshake already verified the client certificate against the manufacturer CAs and the
domain CA. A refused handshake (an unknown manufacturer, an expired IDevID: the client gets an
alert) is logged once with the client certificate, peer and reason, and counted both as a
``handshake-failed`` drop and in ``brski_registrar_refusals_total{endpoint="dtls"}`` with the
HTTPS side's reason labels (tls-unknown-ca, ...). A refused
request is answered with the CoAP code of the HTTPS status (4.00/4.01/4.03/4.04/4.06/4.13/4.15,
5.02) and a diagnostic payload, logged once with the pledge's certificate and counted in
``brski_registrar_refusals_total{endpoint=<short name>}``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap import Code
from cryptography.hazmat.primitives import serialization

from brski import coap_formats as cf
from brski import est as est_format
from brski import linkformat
from brski.dtls import DtlsConfig, DtlsSession
from brski.errors import BrskiError
from brski.telemetry import StatusReport
from coaps_io.aiocoap_dtls import create_server_context, peer_of
from coaps_io.endpoint import DtlsEndpoint, PeerAddress
from coaps_io.log_limit import REFUSAL_LOG_BURST, LogLimiter

from .brski_handlers import record_telemetry
from .constrained_voucher import request_voucher_cose
from .context import Registrar
from .est import CSR_ATTRIBUTES, issue_ldevid
from .identity import Client, Kind, classify, require_pledge
from .jpy_endpoint import JpyDtlsCollector, JpyEndpoint
from .masa_client import MasaUnreachable
from .metrics import DTLS_ENDPOINT, ServiceMetrics
from .store import unavailable
from .tls_server import certificate_identity, format_peer, verify_reason
from .web import STORE_UNAVAILABLE, Refusal

log = logging.getLogger(__name__)
AIOCOAP_LOGGER = "registrar.coaps.aiocoap"
# Refusals logged one by one per kind and minute before a summary line takes over: a refused
# handshake needs a cookie round trip, so it comes from a real address, but they can still
# flood, and so can bad requests inside one session.
# A PVR is ~1 KiB, a CSR a few hundred bytes; aiocoap reassembles Block1 before we see it.
MAX_REQUEST = 16 * 1024

CODES = {400: Code.BAD_REQUEST, 401: Code.UNAUTHORIZED, 403: Code.FORBIDDEN,
         404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED, 406: Code.NOT_ACCEPTABLE,
         413: Code.REQUEST_ENTITY_TOO_LARGE, 415: Code.UNSUPPORTED_CONTENT_FORMAT,
         500: Code.INTERNAL_SERVER_ERROR, 502: Code.BAD_GATEWAY,
         503: Code.SERVICE_UNAVAILABLE}

Render = Callable[[aiocoap.Message, Client | None], Awaitable[aiocoap.Message]]


class RegistrarResource(resource.Resource):
    """One resource: the client classified, refusals turned into CoAP errors, logged, counted."""

    def __init__(self, coaps: CoapsRegistrar, name: str, rt: str | None, ct: str | None) -> None:
        super().__init__()
        self.coaps, self.name = coaps, name
        self.rt, self.ct = rt, ct

    def link_params(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((name, value) for name, value in (("rt", self.rt), ("ct", self.ct))
                     if value is not None)

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._render(request, self.get)

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        return await self._render(request, self.post)

    async def get(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        raise Refusal(405, f"GET is not allowed on {self.name}")

    async def post(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        raise Refusal(405, f"POST is not allowed on {self.name}")

    async def _render(self, request: aiocoap.Message, handler: Render) -> aiocoap.Message:
        reg = self.coaps.registrar
        cert = getattr(request.remote, "peer_certificate", None)
        try:
            if len(request.payload) > MAX_REQUEST:
                raise Refusal(413, f"request body of {len(request.payload)} bytes exceeds "
                                   f"{MAX_REQUEST}")
            client = classify(getattr(request.remote, "peer_chain", []),
                              reg.config.manufacturer_cas, reg.config.ca_cert, reg.now())
            return await handler(request, client)
        except Refusal as refusal:
            peer = peer_of(request.remote)
            if self.coaps.may_log(self.name, refusal.label):
                log.warning("CoAPS %s %s from %s (%s): %d %s", request.code, self.name,
                            peer[:2] if peer else "?", certificate_identity(cert),
                            refusal.status, refusal.reason)
            self.coaps.refused(self.name, refusal.label)
            code = CODES.get(refusal.status, Code.INTERNAL_SERVER_ERROR)
            # A diagnostic payload (RFC 7252 §5.5.2): UTF-8, short, not cut inside a character.
            text = refusal.reason.encode()[:512].decode("utf-8", "ignore")
            return aiocoap.Message(code=code, payload=text.encode())
        except MasaUnreachable as exc:
            # RFC 9148 §5.7 / cBRSKI §6.5: HTTPS's 202 + Retry-After is 5.03 + Max-Age.
            retry = reg.config.retry_after
            # constrained_voucher has logged it at warning level already.
            log.debug("CoAPS %s: MASA unreachable (%s); 5.03, Max-Age %d", self.name, exc,
                      retry)
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, max_age=retry,
                                   payload=f"MASA unreachable; retry in {retry} s".encode())
        except Exception as exc:
            if unavailable(exc):
                # As HTTPS answers 503 + Retry-After: 5.03 + Max-Age (RFC 7252 §5.9.3.4).
                retry = reg.config.retry_after
                if self.coaps.may_log(self.name, STORE_UNAVAILABLE):
                    log.error("CoAPS %s %s (%s): 5.03, the store is unavailable (%s: %s); "
                              "Max-Age %d", request.code, self.name, certificate_identity(cert),
                              type(exc).__name__, str(exc).strip()[:200] or "-", retry)
                self.coaps.refused(self.name, STORE_UNAVAILABLE)
                return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, max_age=retry,
                                       payload=f"the store is unavailable; retry in {retry} "
                                               "s".encode())
            log.exception("CoAPS %s %s (%s): internal error", request.code, self.name,
                          certificate_identity(cert))
            self.coaps.refused(self.name, "internal-error")
            return aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR,
                                   payload=b"internal error (logged at the server)")


def _require_format(request: aiocoap.Message, *formats: int) -> int:
    got = request.opt.content_format
    if got is None or int(got) not in formats:
        raise Refusal(415, f"Content-Format {got if got is None else int(got)}: expected "
                           f"{' or '.join(str(f) for f in formats)}")
    return int(got)


def _accept(request: aiocoap.Message, allowed: tuple[int, ...], default: int) -> int:
    accept = request.opt.accept
    if accept is None:
        return default
    if int(accept) not in allowed:
        raise Refusal(406, f"Accept {int(accept)}: this resource answers "
                           f"{', '.join(str(f) for f in allowed)}")
    return int(accept)


class VoucherRequest(RegistrarResource):
    async def post(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        _require_format(request, cf.CF_VOUCHER_COSE)
        _accept(request, (cf.CF_VOUCHER_COSE,), cf.CF_VOUCHER_COSE)
        if not cf.looks_like_cose_sign1(request.payload):
            raise Refusal(415, "the body is not a COSE_Sign1 (application/voucher+cose)")
        require_pledge(client)
        chain = list(getattr(request.remote, "peer_chain", []))
        voucher = await request_voucher_cose(self.coaps.registrar, request.payload, chain)
        return aiocoap.Message(code=Code.CHANGED, payload=voucher,
                               content_format=cf.CF_VOUCHER_COSE)


class Telemetry(RegistrarResource):
    def __init__(self, coaps: CoapsRegistrar, name: str, rt: str, kind: str) -> None:
        super().__init__(coaps, name, rt, f"{cf.CF_CBOR}")
        self.kind = kind

    async def post(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        form = _require_format(request, cf.CF_CBOR, cf.CF_JSON)
        if client is None:
            raise Refusal(401, "status reports need the pledge's IDevID or LDevID")
        try:
            decode = StatusReport.decode_cbor if form == cf.CF_CBOR else StatusReport.decode_json
            report = decode(request.payload)
        except BrskiError as exc:
            raise Refusal(400, f"not a {self.kind} report: {exc}") from exc
        await record_telemetry(self.coaps.registrar, client, self.kind, request.payload,
                               report)
        return aiocoap.Message(code=Code.CHANGED)


class CaCerts(RegistrarResource):
    async def get(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        form = _accept(request, cf.CERT_FORMATS, cf.CF_PKCS7_CERTS_ONLY)
        ca = self.coaps.registrar.config.ca_cert
        payload = cf.encode_certs([ca], form)
        # The ETag names the representation: this CA in this format.
        etag = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)
                              + form.to_bytes(2, "big")).digest()[:8]
        if etag in request.opt.etags:  # RFC 7252 §5.10.6: the client's copy is current
            return aiocoap.Message(code=Code.VALID, etag=etag)
        response = aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=form)
        response.opt.etag = etag
        response.opt.size2 = len(payload)  # copied into every Block2 (cBRSKI §6.7: MUST)
        return response


class CsrAttrs(RegistrarResource):
    async def get(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        _accept(request, (cf.CF_CSRATTRS,), cf.CF_CSRATTRS)
        return aiocoap.Message(code=Code.CONTENT, content_format=cf.CF_CSRATTRS,
                               payload=est_format.encode_csrattrs(CSR_ATTRIBUTES))


class Enroll(RegistrarResource):
    def __init__(self, coaps: CoapsRegistrar, name: str, *, renew: bool) -> None:
        super().__init__(coaps, name, f"ace.est.{name}", "281 287")
        self.renew = renew

    async def post(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        reg = self.coaps.registrar
        form = _accept(request, (cf.CF_PKCS7_CERTS_ONLY, cf.CF_PKIX_CERT),
                       cf.CF_PKCS7_CERTS_ONLY)
        idevid = renewing = None
        if self.renew:
            if client is None:
                raise Refusal(401, "re-enrollment needs the current LDevID as DTLS client "
                                   "certificate")
            if client.kind is not Kind.LDEVID:
                raise Refusal(403, "re-enrollment needs an LDevID of this domain; enroll "
                                   "with sen first")
            serial = client.serial or client.cert.subject.rfc4514_string()
            renewing = client.cert
        else:
            pledge = require_pledge(client)
            assert pledge.serial is not None
            serial, idevid = pledge.serial, pledge.cert
        reg.check_enrollment_policy(serial)
        _require_format(request, cf.CF_PKCS10)
        try:
            csr = est_format.decode_csr_body(request.payload)
        except BrskiError as exc:
            raise Refusal(400, f"bad certificate request: {exc}") from exc
        cert = await issue_ldevid(reg, csr, serial, idevid=idevid, renewing=renewing)
        return aiocoap.Message(code=Code.CHANGED, content_format=form,
                               payload=cf.encode_certs([cert], form))


class WellKnownCore(RegistrarResource):
    """RFC 6690 discovery of the resources above, e.g. ``?rt=brski*`` or ``?rt=ace.est*``."""

    async def get(self, request: aiocoap.Message, client: Client | None) -> aiocoap.Message:
        links = [("/" + "/".join(path), res.link_params())
                 for path, res in self.coaps.resources.items()
                 if linkformat.matches_query(res.link_params(), request.opt.uri_query)]
        return aiocoap.Message(code=Code.CONTENT, content_format=cf.CF_LINK_FORMAT,
                               payload=linkformat.format_resource_links(links).encode())


class RegistrarSite(resource.Site):
    """aiocoap's Site, refusing oversized Block1 uploads at the first block that passes the
    limit (not after reassembly), and logging and counting unknown paths like any refusal."""

    def __init__(self, coaps: CoapsRegistrar) -> None:
        super().__init__()
        self.coaps = coaps

    async def render_to_pipe(self, request: Any) -> Any:
        message = request.request
        block1, size1 = message.opt.block1, message.opt.size1
        if (size1 is not None and size1 > MAX_REQUEST) or (
                block1 is not None and block1.start + len(message.payload) > MAX_REQUEST):
            self._refused(message, "request", 413, "too-large",
                          f"request body larger than {MAX_REQUEST} bytes")
            raise aiocoap.error.RequestEntityTooLarge()
        try:
            return await super().render_to_pipe(request)
        except (aiocoap.error.NotFound, aiocoap.error.BadOption,
                aiocoap.error.UnallowedMethod) as exc:
            path = tuple(message.opt.uri_path)
            where = "/" + "/".join(path)
            if isinstance(exc, aiocoap.error.UnallowedMethod):
                endpoint = path[-1] if path in self.coaps.resources else "unknown"
                self._refused(message, endpoint, 405, "method-not-allowed",
                              f"{message.code} is not allowed on {where}")
            elif isinstance(exc, aiocoap.error.NotFound):
                self._refused(message, "unknown", 404, "not-found", f"no such resource: {where}")
            else:
                self._refused(message, "unknown", 400, "malformed",
                              "Uri-Path-Abbrev unknown or beside Uri-Path")
            raise

    def _refused(self, message: aiocoap.Message, endpoint: str, status: int, label: str,
                 reason: str) -> None:
        peer = peer_of(message.remote)
        if self.coaps.may_log(endpoint, label):
            log.warning("CoAPS %s from %s (%s): %d %s", message.code, peer[:2] if peer else "?",
                        certificate_identity(getattr(message.remote, "peer_certificate", None)),
                        status, reason)
        self.coaps.refused(endpoint, label)


class CoapsRegistrar:
    """The resources on an aiocoap server context, and its DTLS endpoint once started."""

    def __init__(self, registrar: Registrar, metrics: ServiceMetrics | None = None) -> None:
        self.registrar = registrar
        self.metrics = metrics
        self.context: aiocoap.Context | None = None
        self.endpoint: DtlsEndpoint | None = None
        self.refusal_log = LogLimiter(log, burst=REFUSAL_LOG_BURST)
        self.jpy_context: aiocoap.Context | None = None
        self.jpy_endpoint: DtlsEndpoint | None = None
        brski, est = (".well-known", "brski"), (".well-known", "est")
        self.resources: dict[tuple[str, ...], RegistrarResource] = {
            (*brski, "rv"): VoucherRequest(self, "rv", "brski.rv", f"{cf.CF_VOUCHER_COSE}"),
            (*brski, "vs"): Telemetry(self, "vs", "brski.vs", "voucher_status"),
            (*brski, "es"): Telemetry(self, "es", "brski.es", "enrollstatus"),
            (*est, "crts"): CaCerts(self, "crts", "ace.est.crts", "281 287 62"),
            (*est, "sen"): Enroll(self, "sen", renew=False),
            (*est, "sren"): Enroll(self, "sren", renew=True),
            (*est, "att"): CsrAttrs(self, "att", "ace.est.att", f"{cf.CF_CSRATTRS}"),
        }
        self.site = RegistrarSite(self)
        for path, res in self.resources.items():
            self.site.add_resource(path, res)
        self.site.add_resource((".well-known", "core"),
                               WellKnownCore(self, "core", None, None))

    def may_log(self, endpoint: str, reason: str) -> bool:
        """Whether a refusal gets its own line: a session can send requests as fast as a
        socket takes them, so past 20 a minute of one kind a summary line counts the rest."""
        self.refusal_log.flush()
        return self.refusal_log.allow(f"CoAPS requests refused ({endpoint}, {reason})")

    def refused(self, endpoint: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(endpoint, reason)

    def handshake_refused(self, addr: PeerAddress, session: DtlsSession, detail: str) -> None:
        """A DTLS handshake failed: one line naming the client certificate, peer and reason,
        counted as ``refusals_total{endpoint="dtls"}`` with the HTTPS side's reason labels."""
        notes = session.verification
        # The leaf as OpenSSL verified it, else as the client's Certificate message carried it.
        leaf = (notes.leaf if notes is not None else None) or session.sent_certificate
        who = certificate_identity(leaf) if leaf is not None else "no client certificate seen"
        if notes is not None and notes.verify_error is not None:
            reason = verify_reason(notes.verify_error)
            detail = f"{detail} (X509 verify error {notes.verify_error})"
            if leaf is None and notes.failed_certificate is not None:
                who = (f"{certificate_identity(notes.failed_certificate)} (chain certificate "
                       f"at depth {notes.failed_depth})")
        else:
            reason = "tls-handshake-failed"
        self.refused(DTLS_ENDPOINT, reason)
        self.refusal_log.flush()  # ends the windows that are over, with their summaries
        if self.refusal_log.allow(f"DTLS handshakes refused ({reason})"):
            log.warning("DTLS handshake from %s refused (%s): %s; %s", format_peer(addr),
                        reason, detail, who)

    def dtls_config(self) -> DtlsConfig:
        config = self.registrar.config
        return DtlsConfig(config.server_cert, config.tls_key,  # type: ignore[arg-type]
                          [*config.manufacturer_cas, config.ca_cert],
                          chain=[c for c in config.tls_chain[1:]
                                 if c != config.server_cert])

    async def start(self, bind: tuple[str, int], **endpoint_options: Any) -> DtlsEndpoint:
        # aiocoap logs each Block1 "continue" at info: noise unless we are debugging.
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger(AIOCOAP_LOGGER).setLevel(logging.WARNING)
        self.context, self.endpoint = await create_server_context(
            self.site, bind, self.dtls_config(), loggername=AIOCOAP_LOGGER,
            **endpoint_options)
        self.endpoint.on_refused = self.handshake_refused
        if self.metrics is not None:
            self.metrics.watch_dtls(self.endpoint)
        return self.endpoint

    async def start_jpy(self, bind: tuple[str, int], **endpoint_options: Any) -> DtlsEndpoint:
        """The same resources for pledges behind stateless join proxies: one more DTLS
        endpoint whose sessions are keyed by (proxy, port, JPY header) (registrar.jpy_endpoint)."""
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger(AIOCOAP_LOGGER).setLevel(logging.WARNING)
        self.jpy_context, self.jpy_endpoint = await create_server_context(
            self.site, bind, self.dtls_config(), loggername=AIOCOAP_LOGGER,
            wrap=lambda dtls: JpyEndpoint(dtls, self.refused), **endpoint_options)
        if self.metrics is not None:
            self.metrics.registry.register(JpyDtlsCollector(self.jpy_endpoint))
        return self.jpy_endpoint

    async def stop(self) -> None:
        for context in (self.context, self.jpy_context):
            if context is not None:
                await context.shutdown()
        self.context = self.jpy_context = None

