"""Who is on the other end of a registrar TLS connection.

The TLS layer already verified the client certificate against the manufacturer CAs and the
domain CA together (one ``CERT_OPTIONAL`` context, so a pledge with an unknown manufacturer
fails the handshake). Here we tell the two kinds apart, because they may do different things:
an IDevID (a pledge) may request a voucher and enroll; an LDevID we issued may re-enroll and
report enrollment status.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from cryptography import x509

from brski import certs
from brski.chain import MAX_DEPTH, load_certificate, verify_chain
from brski.errors import BrskiError

from .web import Refusal


class Kind(enum.Enum):
    IDEVID = "IDevID"
    LDEVID = "LDevID"


@dataclass(frozen=True)
class Client:
    cert: x509.Certificate
    kind: Kind
    serial: str | None  # subject serialNumber, if the certificate has one


def peer_chain(request: web.Request) -> list[x509.Certificate]:
    """The client's certificate chain as the TLS layer verified it, leaf first; [] if the
    client sent no certificate."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    return ssl_peer_chain(ssl_object) if ssl_object is not None else []


def ssl_peer_chain(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[x509.Certificate]:
    """``peer_chain`` of one TLS connection. A resumed session has no verified chain (the
    client sends no certificates, OpenSSL keeps only the leaf in the session): its
    intermediates are then the ones full handshakes of this process showed for the leaf's
    issuer, or none (the path check refuses a leaf that needed one)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return []
    # load_certificate: parsed once per certificate (a bounded table), so the path check
    # in classify finds its earlier answer for the same objects (brski.chain.verify_chain).
    leaf = load_certificate(der)
    chain = [leaf]
    # Python 3.13 has SSLObject.get_verified_chain(); 3.11/3.12 have it on the inner object.
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    getter = getattr(inner, "get_verified_chain", None)
    if getter is not None:
        # A private API that changed shape must not break anything: the leaf alone works.
        with contextlib.suppress(Exception):
            chain = [load_certificate(_der_of(c)) for c in getter() or ()] or [leaf]
    if len(chain) > 1:
        _INTERMEDIATES.remember(chain[1:])
    else:
        chain += _INTERMEDIATES.towards(leaf)
    return chain


class _Intermediates:
    """CA certificates of verified chains, by subject. Hints for path building only: the
    path check (brski.chain.verify_chain, against the configured anchors) verifies every
    signature again, so a wrong or stale entry can make a path fail, never succeed."""

    LIMIT = 256  # a registrar serves a few manufacturers' CA hierarchies

    def __init__(self) -> None:
        self._by_subject: dict[bytes, x509.Certificate] = {}

    def remember(self, cas: Sequence[x509.Certificate]) -> None:
        for ca in cas:
            subject = ca.subject.public_bytes()
            if self._by_subject.get(subject) == ca:
                continue
            if len(self._by_subject) >= self.LIMIT:
                self._by_subject.pop(next(iter(self._by_subject)))
            self._by_subject[subject] = ca

    def towards(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The remembered issuers above ``cert``, nearest first, up to a self-issued one."""
        out: list[x509.Certificate] = []
        while len(out) < MAX_DEPTH:
            issuer = cert.issuer.public_bytes()
            if issuer == cert.subject.public_bytes():
                break
            found = self._by_subject.get(issuer)
            if found is None or found in out:
                break
            out.append(found)
            cert = found
        return out


_INTERMEDIATES = _Intermediates()


def _der_of(cert: object) -> bytes:
    if isinstance(cert, bytes):
        return cert
    import _ssl  # the encoding constant of the private Certificate object

    return cert.public_bytes(_ssl.ENCODING_DER)  # type: ignore[attr-defined]


def classify(
    chain: Sequence[x509.Certificate],
    manufacturer_cas: Sequence[x509.Certificate],
    domain_ca: x509.Certificate,
    now: datetime.datetime,
) -> Client | None:
    if not chain:
        return None
    leaf, intermediates = chain[0], list(chain[1:])
    try:
        serial: str | None = certs.serial_number(leaf)
    except BrskiError:
        serial = None
    for kind, anchors in ((Kind.LDEVID, [domain_ca]), (Kind.IDEVID, manufacturer_cas)):
        if not _names_chain(chain, anchors):
            continue  # verify_chain would say no: no path without a name match
        try:
            verify_chain(leaf, intermediates, anchors, now)
        except BrskiError:
            continue
        return Client(leaf, kind, serial)
    # The TLS layer accepted it, so this means a mismatch between our two views of the
    # anchors (e.g. an expired intermediate): refuse rather than guess.
    raise Refusal(403, "client certificate does not chain to a manufacturer CA or the "
                       "domain CA")


def _names_chain(chain: Sequence[x509.Certificate],
                 anchors: Sequence[x509.Certificate]) -> bool:
    """False when no path from ``chain`` can end at one of ``anchors``: the leaf is none of
    them and no certificate of the chain names one of them as its issuer (path building
    links a certificate to its issuer by the issuer's subject, byte for byte). An IDevID
    then skips the domain CA's path check, which it would fail, at the cost of a verifier
    built for nothing, on every request."""
    if chain[0] in anchors:
        return True
    subjects = {a.subject.public_bytes() for a in anchors}
    return any(c.issuer.public_bytes() in subjects for c in chain)


def require_pledge(client: Client | None) -> Client:
    """An IDevID with a serial number, or 401/403."""
    if client is None:
        raise Refusal(401, "a pledge must authenticate with its IDevID (TLS client "
                           "certificate)")
    if client.kind is not Kind.IDEVID:
        raise Refusal(403, "this request needs the pledge's IDevID, not an LDevID")
    if client.serial is None:
        raise Refusal(403, "the IDevID has no subject serialNumber (RFC 8995 §2.3.1)")
    return client
