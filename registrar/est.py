"""The registrar's EST endpoints (RFC 7030 with RFC 8951; BRSKI §5.9).

    GET  /.well-known/est/cacerts         -> base64 certs-only: the domain CA
    GET  /.well-known/est/csrattrs        -> base64 CsrAttrs: sign with ecdsa-with-SHA256
    POST /.well-known/est/simpleenroll    base64 PKCS#10 (IDevID client) -> base64 certs-only
    POST /.well-known/est/simplereenroll  base64 PKCS#10 (LDevID client) -> base64 certs-only

Encodings come from ``brski.est``. simpleenroll needs the pledge's IDevID and the enrollment
policy's consent (401/403); simplereenroll needs an LDevID this domain CA issued (403). A CSR
that does not parse or whose signature does not verify gets 400 with the reason; one with a
key or subject the CA will not certify gets 400 too.
"""

from __future__ import annotations

import logging

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import est
from brski.errors import BrskiError

from .context import REGISTRAR, Registrar
from .domain_ca import EnrollError
from .identity import Kind, require_pledge
from .store import Store
from .web import Refusal, read_body, require_content_type

log = logging.getLogger(__name__)

# RFC 8951 §3 says to ignore Content-Transfer-Encoding; RFC 7030 clients still look for it.
_BASE64_HEADERS = {"Content-Transfer-Encoding": "base64"}
CSR_ATTRIBUTES = [est.CsrAttribute(est.OID_ECDSA_WITH_SHA256)]


def _certs_only(certs: list[x509.Certificate]) -> web.Response:
    body = est.encode_base64(est.encode_certs_only(certs))
    return web.Response(body=body, headers={"Content-Type": est.MEDIA_CERTS_ONLY,
                                            **_BASE64_HEADERS})


async def cacerts(request: web.Request) -> web.Response:
    reg = request.app[REGISTRAR]
    return _certs_only([reg.config.ca_cert])


async def csrattrs(request: web.Request) -> web.Response:
    body = est.encode_base64(est.encode_csrattrs(CSR_ATTRIBUTES))
    return web.Response(body=body, headers={"Content-Type": est.MEDIA_CSRATTRS,
                                            **_BASE64_HEADERS})


async def _csr(request: web.Request) -> x509.CertificateSigningRequest:
    require_content_type(request, est.MEDIA_PKCS10)
    body = await read_body(request)
    try:
        return est.decode_csr_body(body)
    except BrskiError as exc:
        raise Refusal(400, f"bad certificate request: {exc}") from exc


async def simple_enroll(request: web.Request) -> web.Response:
    reg = request.app[REGISTRAR]
    client = require_pledge(reg.client(request))
    assert client.serial is not None
    reg.check_enrollment_policy(client.serial)
    csr = await _csr(request)
    return await _issue(reg, csr, client.serial, idevid=client.cert)


async def simple_reenroll(request: web.Request) -> web.Response:
    reg = request.app[REGISTRAR]
    client = reg.client(request)
    if client is None:
        raise Refusal(401, "re-enrollment needs the current LDevID as TLS client certificate")
    if client.kind is not Kind.LDEVID:
        raise Refusal(403, "re-enrollment needs an LDevID of this domain; enroll with "
                           "simpleenroll first")
    serial = client.serial or client.cert.subject.rfc4514_string()
    reg.check_enrollment_policy(serial)
    csr = await _csr(request)
    return await _issue(reg, csr, serial, renewing=client.cert)


async def _issue(reg: Registrar, csr: x509.CertificateSigningRequest, serial: str, *,
                 idevid: x509.Certificate | None = None,
                 renewing: x509.Certificate | None = None) -> web.Response:
    return _certs_only([await issue_ldevid(reg, csr, serial, idevid=idevid,
                                           renewing=renewing)])


async def issue_ldevid(reg: Registrar, csr: x509.CertificateSigningRequest, serial: str, *,
                       idevid: x509.Certificate | None = None,
                       renewing: x509.Certificate | None = None) -> x509.Certificate:
    """Issue and store an LDevID (HTTPS and CoAPS alike); ``Refusal`` 400 if the CA will not."""
    now = reg.now()

    def issue(store: Store) -> x509.Certificate:
        # The serial number, the certificate and its record in one transaction: a refused
        # request takes its number back with it.
        cert = reg.ca.issue(csr, now=now, idevid=idevid, renewing=renewing,
                            sequence=store.next_cert_serial())
        store.add_certificate(f"{cert.serial_number:x}", serial, cert.subject.rfc4514_string(),
                              cert.public_bytes(serialization.Encoding.DER),
                              cert.not_valid_after_utc)
        return cert

    try:
        cert = await reg.write(issue)
    except EnrollError as exc:
        raise Refusal(400, f"certificate request refused: {exc}") from exc
    log.info("%s for %s: %s, serial %x, valid until %s",
             "LDevID renewed" if renewing is not None else "LDevID issued", serial,
             cert.subject.rfc4514_string(), cert.serial_number,
             cert.not_valid_after_utc.isoformat())
    return cert
