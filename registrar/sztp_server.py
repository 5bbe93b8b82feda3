"""The SZTP bootstrap server (RFC 8572 §7): RESTCONF over HTTPS, IDevID client certificates.

    POST /restconf/operations/ietf-sztp-bootstrap-server:get-bootstrapping-data -> 200 output
    POST /restconf/operations/ietf-sztp-bootstrap-server:report-progress        -> 204

The device is the serial number of the IDevID that authenticated the TLS connection (RFC 8572
§7.3: the RESTCONF username); nothing in a body can name another device. Its record
(registrar.sztp_store) gives the conveyed information, served:

* unsigned (an SZTP ContentInfo) when the record's ``sign`` is "never", or "auto" and the
  device did not send signed-data-preferred;
* signed by the owner key (``[sztp] owner_cert``), with the owner certificate (a certs-only
  CMS) and an ownership voucher from the device's MASA, asked for here with a registrar
  voucher-request signed with the registrar's key (id-kp-cmcRA) carrying the device's nonce,
  so the MASA's voucher is bound to it. An unsigned redirect stays unsigned (§7.3 allows it).
  A device asking for signed data never gets unsigned onboarding: 409 data-missing.

Errors are ``ietf-restconf:errors`` (RFC 8040 §7) in the request's encoding: 400
malformed-message (not the encoding said) / invalid-value (breaks the YANG module), 401
access-denied (no serialNumber), 404 invalid-value (no record for this device), 406 / 415
(media types: Accept, Content-Type), 409 data-missing, 502/503 operation-failed (MASA
refused / unreachable). Every refusal is logged once with the device and the reason, and counted
(``brski_sztp_refusals_total{endpoint,reason}``).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509

from brski import certs, sztp
from brski.errors import BrskiError, DecodeError, ValidationError
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, VoucherRequest, WireForm

from .masa_client import MasaClient, MasaUnreachable
from .metrics import ServiceMetrics
from .store import unavailable
from .sztp_config import SztpConfig
from .sztp_store import SztpStore
from .voucher_request import idevid_issuer
from .web import (
    DEFAULT_RETRY_AFTER,
    MAX_BODY,
    MEDIA_VOUCHER_CMS,
    STORE_UNAVAILABLE,
    accepts,
    peer_certificate,
)

log = logging.getLogger("registrar.sztp")
GET_DATA = sztp.OPERATIONS + "get-bootstrapping-data"
REPORT = sztp.OPERATIONS + "report-progress"


class RestconfError(Exception):
    def __init__(self, status: int, tag: str, message: str, label: str,
                 error_type: str = "application", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.tag, self.message, self.label = status, tag, message, label
        self.error_type = error_type
        self.headers = headers or {}


@dataclass
class SztpServer:
    config: SztpConfig
    records: SztpStore
    masa: MasaClient | None
    metrics: ServiceMetrics | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.router.add_post(GET_DATA, self.get_bootstrapping_data)
        app.router.add_post(REPORT, self.report_progress)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):  # type: ignore[no-untyped-def]
        try:
            return await handler(request)
        except RestconfError as err:
            return self._refuse(request, err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            tag = {404: "invalid-value", 405: "operation-not-supported",
                   413: "too-big"}.get(exc.status, "operation-failed")
            return self._refuse(request, RestconfError(
                exc.status, tag, f"{request.method} {request.path}: {exc.reason}",
                f"http-{exc.status}", "protocol"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: the device still gets a RESTCONF error
            if unavailable(exc):  # the store out of reach for now: the device retries later
                return self._refuse(request, RestconfError(
                    503, "resource-denied", f"the store is unavailable ({type(exc).__name__}); "
                    f"retry in {DEFAULT_RETRY_AFTER} s", STORE_UNAVAILABLE,
                    headers={"Retry-After": str(DEFAULT_RETRY_AFTER)}))
            log.exception("%s from %s (%s): internal error", request.path, _peer(request),
                          _device(request))
            return self._refuse(request, RestconfError(
                500, "operation-failed", "internal error (logged at the server)",
                "internal-error"))

    def _refuse(self, request: web.Request, err: RestconfError) -> web.Response:
        log.warning("%s from %s (%s): %d %s: %s", request.path.rsplit(":", 1)[-1],
                    _peer(request), _device(request), err.status, err.tag, err.message)
        if self.metrics is not None:
            endpoint = request.path.rsplit(":", 1)[-1] if request.path.startswith(
                sztp.OPERATIONS) else "unknown"
            self.metrics.refused(endpoint, err.label)
        encoding = _reply_encoding(request)
        return web.Response(status=err.status, content_type=sztp.MEDIA[encoding],
                            body=sztp.errors_body(err.error_type, err.tag, err.message,
                                                  encoding), headers=err.headers)

    # -- the two RPCs -------------------------------------------------------------------------
    async def get_bootstrapping_data(self, request: web.Request) -> web.Response:
        serial, idevid = _authenticated(request)
        accept = request.headers.get("Accept")
        if not any(accepts(accept, media) for media in sztp.MEDIA.values()):
            raise RestconfError(406, "invalid-value", f"Accept {accept!r} admits neither "
                                f"{sztp.MEDIA['json']} nor {sztp.MEDIA['xml']}",
                                "not-acceptable", "protocol")
        encoding = _request_encoding(request)
        body = await request.read()
        try:
            inp = sztp.GetBootstrappingDataInput.decode(body, encoding)
        except DecodeError as exc:
            raise RestconfError(400, "malformed-message", str(exc), "malformed",
                                "protocol") from exc
        except ValidationError as exc:
            raise RestconfError(400, "invalid-value", str(exc), "invalid-value") from exc
        record = self.records.lookup(serial, inp.hw_model)
        if record is None:
            raise RestconfError(404, "invalid-value", f"no bootstrapping data for serial "
                                f"{serial!r} (nor for hw-model {inp.hw_model!r}, nor a "
                                "default)", "no-record")
        info = record.information
        redirect = isinstance(info, sztp.RedirectInformation)
        if self.config.redirect_only and not redirect:
            raise RestconfError(409, "data-missing", "this is a redirect server; the record "
                                "holds onboarding information", "data-missing")
        sign = record.sign == "always" or (record.sign == "auto" and inp.signed_data_preferred
                                           and not redirect)
        if inp.signed_data_preferred and not sign and not redirect:
            raise RestconfError(409, "data-missing", "the device asks for signed data and "
                                "this record may not be signed (sign = never): RFC 8572 §7.3 "
                                "forbids unsigned onboarding information here", "data-missing")
        data = sztp.encode_conveyed(info, self.config.encoding)
        now = datetime.datetime.now(datetime.UTC)
        if not sign:
            out = sztp.GetBootstrappingDataOutput(sztp.wrap_unsigned(data, self.config.encoding),
                                                  reporting_level=_level(record, redirect))
            how = "unsigned"
        else:
            voucher = await self._voucher(serial, idevid, inp.nonce, now)
            conveyed = sztp.sign_conveyed(data, self.config.encoding,
                                          self.config.owner_key,  # type: ignore[arg-type]
                                          self.config.owner_chain, now)
            out = sztp.GetBootstrappingDataOutput(
                conveyed, sztp.degenerate_certs(self.config.owner_chain), voucher,
                _level(record, redirect))
            how = "signed" + (", nonce-bound voucher" if inp.nonce else "")
        log.info("bootstrapping data for %s (%s record %r): %s, %s", serial, record.kind,
                 record.key, info.TOP, how)
        reply = _reply_encoding(request)
        return web.Response(status=200, content_type=sztp.MEDIA[reply], body=out.encode(reply))

    async def report_progress(self, request: web.Request) -> web.Response:
        serial, _ = _authenticated(request)
        encoding = _request_encoding(request)
        body = await request.read()
        try:
            report = sztp.ReportProgressInput.decode(body, encoding)
        except DecodeError as exc:
            raise RestconfError(400, "malformed-message", str(exc), "malformed",
                                "protocol") from exc
        except ValidationError as exc:
            raise RestconfError(400, "invalid-value", str(exc), "invalid-value") from exc
        self.records.add_progress(serial, report, _peer(request))
        log.info("progress from %s: %s%s", serial, report.progress_type,
                 f": {report.message}" if report.message else "")
        return web.Response(status=204)

    # -- the MASA -----------------------------------------------------------------------------
    async def _voucher(self, serial: str, idevid: x509.Certificate, nonce: bytes | None,
                       now: datetime.datetime) -> bytes:
        if self.masa is None:
            raise RestconfError(409, "data-missing", "signed data needs a MASA, and this is a "
                                "redirect-only server", "data-missing")
        masa_url = certs.masa_url(idevid)
        if not masa_url:
            raise RestconfError(409, "data-missing", "the IDevID names no MASA: no ownership "
                                "voucher can be had", "no-masa")
        rvr = VoucherRequest(
            assertion=Assertion.PROXIMITY, created_on=now, serial_number=serial, nonce=nonce,
            idevid_issuer=idevid_issuer(idevid), wire=WireForm(texts={}))
        reg = self.config.registrar
        signed = sign_voucher_cms(rvr, reg.tls_key, reg.tls_chain, now)  # type: ignore[arg-type]
        try:
            answer = await self.masa.request_voucher(masa_url, signed)
        except MasaUnreachable as exc:
            raise RestconfError(503, "operation-failed", f"MASA unreachable: {exc}",
                                "masa-unreachable") from exc
        if answer.status != 200 or answer.content_type != MEDIA_VOUCHER_CMS:
            raise RestconfError(502, "operation-failed", f"MASA refused the voucher: HTTP "
                                f"{answer.status}: {answer.body[:200].decode('utf-8', 'replace')}",
                                "masa-refused")
        return answer.body


def _level(record: object, redirect: bool) -> str | None:
    # reporting-level is if-feature onboarding-server: not sent with a redirect
    return None if redirect else record.reporting_level  # type: ignore[attr-defined]


def _authenticated(request: web.Request) -> tuple[str, x509.Certificate]:
    cert = peer_certificate(request)
    if cert is None:
        raise RestconfError(401, "access-denied", "no TLS client certificate", "no-identity",
                            "protocol")
    try:
        return certs.serial_number(cert), cert
    except BrskiError as exc:
        raise RestconfError(401, "access-denied", f"client certificate: {exc}", "no-identity",
                            "protocol") from exc


def _request_encoding(request: web.Request) -> str:
    if not request.body_exists:
        return _reply_encoding(request)
    try:
        return sztp.encoding_of(request.headers.get("Content-Type"))
    except DecodeError as exc:
        raise RestconfError(415, "invalid-value", str(exc), "wrong-media-type",
                            "protocol") from exc


def _reply_encoding(request: web.Request) -> str:
    """RFC 8040 §5.2: the Accept header, else the request's encoding, else JSON."""
    accept = request.headers.get("Accept", "")
    for item in accept.split(","):
        base = item.split(";")[0].strip().lower()
        for name, media in sztp.MEDIA.items():
            if base == media:
                return name
    try:
        return sztp.encoding_of(request.headers.get("Content-Type"))
    except DecodeError:
        return "json"


def _device(request: web.Request) -> str:
    try:
        cert = peer_certificate(request)
        return certs.serial_number(cert) if cert else "no client certificate"
    except (ValueError, BrskiError):
        return "unidentified client certificate"


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "?"
    return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
