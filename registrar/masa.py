"""The MASA's decisions (RFC 8995 §5.5, §5.6, §5.8), apart from HTTP.

``Masa.request_voucher(body, now)`` takes a registrar voucher-request (CMS) and returns a
signed voucher or raises ``Refusal`` with the RFC 8995 §5.6 status:

* 403: the RVR signature does not verify, the registrar certificate lacks id-kp-cmcRA, the
  prior-signed pledge request does not verify (or is not from an IDevID of our manufacturer
  CAs), serial-number or nonce do not match it, its proximity-registrar-cert is not in the
  registrar's chain, or the device belongs to another domain;
* 404: the device is not known to this MASA (ownership table, or trust on first use);
* 400: the body is not a CMS voucher-request at all.

``Masa.request_voucher_cose(body, now)`` does the same for cBRSKI (``application/voucher+cose``):
a COSE_Sign1 RVR whose unprotected x5bag (label 32) carries the registrar's chain and the
pledge's IDevID chain, around the pledge's COSE PVR (which has no x5bag: its signer is found in
the RVR's). Same policy, same statuses; the answer is a COSE_Sign1 voucher in SID-keyed CBOR,
pinning the domain CA certificate, with the MASA's signing chain in its x5bag (cBRSKI §9.2;
the registrar strips it before the pledge sees it).

Ownership (``[ownership]``): a table serial -> domain CA, or trust on first use (the first
domain whose registrar asks owns the device). The voucher pins the domain CA: the registrar's
TLS certificate chains to it (RFC 8995 §5.6.2). Assertion: the configured one when the
pledge's proximity proof checks out; "logged" for nonceless requests (no pledge proof).

The service calls ``await Masa.request_voucher_async(body, now, cose_form=...)``: the same
checks and signature, and the voucher record (with a first-contact ownership claim, in one
transaction) goes through the group commit (``registrar.masa_commit.issue``); the voucher is
returned once its record is on disk.

``Masa.audit_log(body, now)`` answers ``requestauditlog`` (§5.8) for an authenticated
registrar: every voucher issued for the device, oldest first.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography import x509

from brski import certs, cms, cose
from brski.chain import (
    Memo,
    certificate_der,
    directly_issued_by,
    load_certificate,
    verify_chain,
)
from brski.errors import BrskiError, DecodeError, SignatureError, ValidationError
from brski.signed_voucher import (
    NoVerifyingCertificate,
    sign_voucher_cms,
    sign_voucher_cose,
    verify_voucher_request_cms,
    verify_voucher_request_cose,
)
from brski.telemetry import AuditEvent, AuditLog
from brski.voucher import Assertion, Voucher, VoucherRequest, format_datetime
from brski.voucher_model import build, cbor_wire_form

from .masa_commit import IssuedVoucher, issue, write_now
from .masa_config import ANY_DEVICE, MasaConfig
from .store import Store
from .store_commit import GroupCommitter
from .voucher_request import idevid_issuer_forms
from .web import Refusal

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AuthenticatedRequest:
    """A registrar voucher-request whose signatures and evidence have been checked."""

    rvr: VoucherRequest
    registrar: x509.Certificate  # the RVR signer
    registrar_certs: tuple[x509.Certificate, ...]  # every certificate of the RVR's CMS
    serial: str
    pvr: VoucherRequest | None
    idevid: x509.Certificate | None
    proximity: bool  # the pledge's proximity-registrar-cert is in the registrar's chain
    # What _owner read in the store: the domain (SPKI SHA-256) already on record as the
    # device's owner, if it is the registrar's. An ownership row is never changed nor removed,
    # so this request's record needs no claim then (the claim re-read the same row).
    owner_on_record: list[bytes] = field(default_factory=list, compare=False, repr=False)

    @functools.cached_property  # read for the voucher, its record and the log line
    def nonce_text(self) -> str | None:
        # The pledge compares the nonce with the text it sent (RFC 8995 §5.8.1): keep it.
        source = self.pvr if self.pvr is not None and self.pvr.nonce is not None else self.rvr
        return source.wire_text("nonce")


class Masa:
    def __init__(self, config: MasaConfig, store: Store,
                 committer: GroupCommitter | None = None) -> None:
        self.config = config
        self.store = store
        # With a committer (the service), voucher records go through its group commit and
        # the ``*_async`` entry points await it; without, each is its own transaction.
        self.committer = committer

    # -- requestvoucher -------------------------------------------------------------------
    def request_voucher(self, body: bytes, now: datetime.datetime) -> bytes:
        req = self.authenticate(body, now)
        voucher, domain_ca = self._voucher(req, now)
        signed = sign_voucher_cms(voucher, self.config.signer_key,  # type: ignore[arg-type]
                                  self.config.signer_chain, now)
        self._issued(req, voucher, domain_ca, signed, now)
        return signed

    def request_voucher_cose(self, body: bytes, now: datetime.datetime) -> bytes:
        req = self.authenticate_cose(body, now)
        voucher, domain_ca = self._voucher(req, now)
        signed = sign_voucher_cose(voucher, self.config.signer_key,  # type: ignore[arg-type]
                                   x5bag=self.config.signer_chain)
        self._issued(req, voucher, domain_ca, signed, now)
        return signed

    async def request_voucher_async(self, body: bytes, now: datetime.datetime, *,
                                    cose_form: bool) -> bytes:
        """``request_voucher`` (or ``_cose``) whose record goes through the group commit: the
        voucher is returned once it is durable."""
        req = self.authenticate_cose(body, now) if cose_form else self.authenticate(body, now)
        voucher, domain_ca = self._voucher(req, now)
        if cose_form:
            signed = sign_voucher_cose(voucher, self.config.signer_key,  # type: ignore[arg-type]
                                       x5bag=self.config.signer_chain)
        else:
            signed = sign_voucher_cms(voucher, self.config.signer_key,  # type: ignore[arg-type]
                                      self.config.signer_chain, now)
        record = self._record(req, voucher, domain_ca, signed, now)
        if self.committer is None:
            row = write_now(self.store, record)
        else:
            row = await issue(self.committer, record)
        self._logged(req, voucher, domain_ca, row)
        return signed

    def _voucher(self, req: AuthenticatedRequest,
                 now: datetime.datetime) -> tuple[Voucher, x509.Certificate]:
        domain_ca = self._owner(req, now)
        assertion = Assertion.from_yang_name(self.config.assertion) if req.proximity \
            else Assertion.LOGGED
        pinned = certificate_der(domain_ca)
        nonce_text = req.nonce_text
        expires = None
        if req.rvr.nonce is None:
            # RFC 8995 §5.6: a nonceless voucher expires; never after the pinned certificate.
            expires = min(now + datetime.timedelta(seconds=self.config.lifetime),
                          domain_ca.not_valid_after_utc)
        # Made as the decoders make artifacts (voucher_model.build): the frozen dataclass's
        # __init__ sets each of its 17 fields through object.__setattr__. The same fields;
        # signing validates the voucher before anything is written.
        values = {"assertion": assertion, "created-on": now, "serial-number": req.serial,
                  "pinned-domain-cert": pinned}
        if expires is not None:
            values["expires-on"] = expires
        if req.rvr.nonce is not None:
            values["nonce"] = req.rvr.nonce
        voucher = build(Voucher, values,
                        cbor_wire_form({"nonce": nonce_text} if nonce_text else {}, ()))
        return voucher, domain_ca  # type: ignore[return-value]

    def _issued(self, req: AuthenticatedRequest, voucher: Voucher, domain_ca: x509.Certificate,
                signed: bytes, now: datetime.datetime) -> None:
        """Record the voucher (and, on first contact, the ownership claim) in one
        transaction, then log it."""
        row = write_now(self.store, self._record(req, voucher, domain_ca, signed, now))
        self._logged(req, voucher, domain_ca, row)

    def _record(self, req: AuthenticatedRequest, voucher: Voucher, domain_ca: x509.Certificate,
                signed: bytes, now: datetime.datetime) -> IssuedVoucher:
        assert voucher.assertion is not None
        configured = self.config.devices.get(req.serial) or self.config.devices.get(ANY_DEVICE)
        # Trust on first use: the claim is written with the voucher, in its transaction
        # (_owner refused already if another domain owned the device when it looked).
        spki = _spki_sha256(domain_ca)
        claim = None if configured is not None or spki in req.owner_on_record else (
            spki, certificate_der(domain_ca))
        return IssuedVoucher(req.serial, signed, voucher.assertion.yang_name, req.nonce_text,
                             _domain_id(domain_ca), now, claim)

    def _logged(self, req: AuthenticatedRequest, voucher: Voucher, domain_ca: x509.Certificate,
                row: int | None) -> None:
        assert voucher.assertion is not None
        if row is None:  # another domain claimed the device after _owner looked
            raise Refusal(403, f"device {req.serial} is already owned by another domain")
        if not log.isEnabledFor(logging.INFO):
            return  # the subject's text costs more than the rest of this step
        expires = voucher.expires_on
        log.info("voucher issued: serial %s, domain %s, assertion %s, %s", req.serial,
                 domain_ca.subject.rfc4514_string(), voucher.assertion.yang_name,
                 "with nonce" if req.nonce_text else f"expires {format_datetime(expires)}"
                 if expires else "")

    # -- requestauditlog ------------------------------------------------------------------
    def audit_log(self, body: bytes, now: datetime.datetime) -> bytes:
        req = self.authenticate(body, now)
        if not self._known(req):
            raise Refusal(404, f"device {req.serial} is not known to this MASA")
        records = self.store.vouchers(req.serial)
        if not records:
            raise Refusal(404, f"no voucher has been issued for {req.serial}")
        events = tuple(
            AuditEvent(
                date=r.created_at,
                domain_id=r.domain_id or "",
                nonce=r.nonce,
                assertion=_audit_assertion(r.assertion),
            )
            for r in records
        )
        self.store.audit("audit-log-request", req.serial,
                         registrar=req.registrar.subject.rfc4514_string())
        return AuditLog(events=events).encode_json()

    # -- checks ---------------------------------------------------------------------------
    def authenticate(self, body: bytes, now: datetime.datetime) -> AuthenticatedRequest:
        try:
            signed = cms.parse(body)
            rvr, registrar = verify_voucher_request_cms(signed, None, now)
        except SignatureError as exc:
            raise Refusal(403, f"registrar voucher-request: {exc}") from exc
        except (DecodeError, ValidationError) as exc:
            raise Refusal(400, f"not a valid registrar voucher-request: {exc}") from exc
        if not _may_request(registrar):
            raise Refusal(403, "the registrar certificate lacks id-kp-cmcRA (RFC 8995 §5.5): "
                               "it may not request vouchers")
        if rvr.proximity_registrar_cert is not None:
            raise Refusal(400, "a registrar voucher-request must not carry "
                               "proximity-registrar-cert (RFC 8995 §5.5)")
        chain = signed.certificates
        if rvr.prior_signed_voucher_request is None:
            if not self.config.nonceless:
                raise Refusal(403, "no prior-signed-voucher-request, and this MASA does not "
                                   "issue nonceless vouchers")
            return AuthenticatedRequest(rvr, registrar, chain, rvr.serial_number, None, None,
                                        proximity=False)
        pvr, idevid, serial = self._check_pvr(rvr, now)
        return AuthenticatedRequest(rvr, registrar, chain, serial, pvr, idevid,
                                    proximity=_proximity(pvr, chain))

    def _check_pvr(self, rvr: VoucherRequest,
                   now: datetime.datetime) -> tuple[VoucherRequest, x509.Certificate, str]:
        assert rvr.prior_signed_voucher_request is not None
        try:
            pvr, idevid = verify_voucher_request_cms(
                rvr.prior_signed_voucher_request, self.config.manufacturer_cas, now)
            serial = certs.serial_number(idevid)
        except BrskiError as exc:
            raise Refusal(403, f"prior-signed voucher-request: {exc}") from exc
        _pvr_matches(rvr, pvr, idevid, serial)
        return pvr, idevid, serial

    # -- cBRSKI: COSE --------------------------------------------------------------------
    def authenticate_cose(self, body: bytes, now: datetime.datetime) -> AuthenticatedRequest:
        """The COSE twin of ``authenticate``: the RVR's signer is whichever x5bag certificate
        verifies it, the PVR's whichever other one verifies the PVR and chains to one of our
        manufacturer CAs."""
        try:
            msg = cose.decode(body)
            rvr, registrar = verify_voucher_request_cose(msg, None, now)
        except SignatureError as exc:
            raise Refusal(403, f"registrar voucher-request: {exc}") from exc
        except (DecodeError, ValidationError) as exc:
            raise Refusal(400, f"not a valid COSE registrar voucher-request: {exc}") from exc
        assert registrar is not None  # no bare key given: the signer is a certificate
        if not _may_request(registrar):
            raise Refusal(403, "the registrar certificate lacks id-kp-cmcRA (RFC 8995 §5.5): "
                               "it may not request vouchers")
        if rvr.proximity_registrar_cert is not None:
            raise Refusal(400, "a registrar voucher-request must not carry "
                               "proximity-registrar-cert (RFC 8995 §5.5)")
        bag = msg.x5bag
        # The x5bag mixes both chains; proximity and ownership look at the registrar's only,
        # so a pledge cannot name its own certificate as "the registrar it saw".
        chain = _issuer_path(registrar, bag)
        if rvr.prior_signed_voucher_request is None:
            if not self.config.nonceless:
                raise Refusal(403, "no prior-signed-voucher-request, and this MASA does not "
                                   "issue nonceless vouchers")
            return AuthenticatedRequest(rvr, registrar, chain, rvr.serial_number, None, None,
                                        proximity=False)
        pvr, idevid, serial = self._check_pvr_cose(rvr, bag, registrar, chain, now)
        return AuthenticatedRequest(rvr, registrar, chain, serial, pvr, idevid,
                                    proximity=_proximity(pvr, chain))

    def _check_pvr_cose(self, rvr: VoucherRequest, bag: Sequence[x509.Certificate],
                        registrar: x509.Certificate,
                        registrar_chain: Sequence[x509.Certificate],
                        now: datetime.datetime) -> tuple[VoucherRequest, x509.Certificate, str]:
        assert rvr.prior_signed_voucher_request is not None
        prior = rvr.prior_signed_voucher_request
        try:
            msg = cose.decode(prior)
        except BrskiError as exc:
            raise Refusal(403, f"prior-signed voucher-request is not a COSE_Sign1: {exc}") \
                from exc
        # Certificates outside the registrar's chain first: the IDevID is found with one
        # signature check instead of one per registrar-side CA in the bag.
        # (compared by DER, which certificate equality is: a set of Certificate objects
        # rehashes each one's bytes)
        registrar_side = set(map(certificate_der, registrar_chain))
        own = certificate_der(registrar)
        others = [(c, d) for c in bag if (d := certificate_der(c)) != own]
        candidates = [*(c for c, d in others if d not in registrar_side),
                      *(c for c, d in others if d in registrar_side)]
        try:
            pvr, idevid = verify_voucher_request_cose(
                msg, self.config.manufacturer_cas, now, candidates=candidates, extra_certs=bag)
            assert idevid is not None  # found among certificates
            serial = certs.serial_number(idevid)
        except NoVerifyingCertificate as exc:
            raise Refusal(403, "prior-signed voucher-request: no certificate in the x5bag "
                               "verifies its signature (the RVR must carry the pledge's "
                               "IDevID chain, cBRSKI §9.2)") from exc
        except BrskiError as exc:
            raise Refusal(403, f"prior-signed voucher-request: {exc}") from exc
        _pvr_matches(rvr, pvr, idevid, serial)
        return pvr, idevid, serial

    def _known(self, req: AuthenticatedRequest) -> bool:
        if req.serial in self.config.devices or ANY_DEVICE in self.config.devices:
            return True
        # Trust on first use knows every device whose IDevID we authenticated.
        return self.config.ownership == "tofu" and req.idevid is not None

    def _owner(self, req: AuthenticatedRequest, now: datetime.datetime) -> x509.Certificate:
        """The domain CA to pin, after checking the registrar belongs to the device's owner."""
        configured = self.config.devices.get(req.serial) or self.config.devices.get(ANY_DEVICE)
        if configured is not None:
            try:
                verify_chain(req.registrar, req.registrar_certs, [configured], now)
            except SignatureError as exc:
                raise Refusal(403, f"device {req.serial} belongs to another domain: the "
                                   f"registrar does not chain to its domain CA") from exc
            return configured
        if not self._known(req):
            raise Refusal(404, f"device {req.serial} is not known to this MASA")
        domain = _chain_top(req.registrar, req.registrar_certs)
        try:
            verify_chain(req.registrar, req.registrar_certs, [domain], now)
        except SignatureError as exc:
            raise Refusal(403, f"registrar chain does not verify: {exc}") from exc
        # A device asks again (a retry, a new nonce): this read answers. A first claim is
        # written with the voucher, atomically (Store.issue_voucher), so a domain that loses
        # a race for the device between this read and that write is refused there.
        owner = self.store.owner(req.serial)
        if owner is not None:
            if owner != _spki_sha256(domain):
                raise Refusal(403, f"device {req.serial} is already owned by another domain")
            req.owner_on_record.append(owner)
        return domain


def _pvr_matches(rvr: VoucherRequest, pvr: VoucherRequest, idevid: x509.Certificate,
                 serial: str) -> None:
    """The checks both encodings share, once the PVR is authenticated."""
    # RFC 8995 §5.5: the serial comes from the authenticated IDevID; both requests must
    # name that one device.
    if rvr.serial_number != serial:
        raise Refusal(403, f"registrar voucher-request names serial {rvr.serial_number!r} "
                           f"but the pledge's IDevID is {serial!r}")
    if pvr.serial_number != serial:
        raise Refusal(403, f"pledge voucher-request names serial {pvr.serial_number!r} "
                           f"but its IDevID is {serial!r}")
    if rvr.nonce != pvr.nonce:
        raise Refusal(403, "nonce of the registrar voucher-request differs from the "
                           "pledge's")
    if rvr.idevid_issuer is not None and rvr.idevid_issuer not in idevid_issuer_forms(idevid):
        raise Refusal(403, "idevid-issuer does not match the pledge's IDevID")
    if (pvr.proximity_registrar_cert is None and pvr.proximity_registrar_pubk is None
            and pvr.proximity_registrar_pubk_sha256 is None):
        raise Refusal(403, "the pledge voucher-request has no proximity-registrar-cert")


def _issuer_path(leaf: x509.Certificate,
                 pool: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """``leaf`` and its issuers found in ``pool``, in order, up to a self-signed one or the
    last one reachable."""
    return _WALKS.get_or_make(  # type: ignore[return-value]
        (certificate_der(leaf), *map(certificate_der, pool)),
        lambda: _issuer_walk(leaf, tuple(pool)))


def _issuer_walk(leaf: x509.Certificate,
                 pool: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
    # Kept per (leaf, pool): the walk depends on those certificates' bytes only (names and
    # signatures; certificate equality is DER equality), and a registrar sends the same chain
    # with every request. Validity and trust are verify_chain's, checked on every request.
    # A COSE x5bag carries the pledge's IDevID too, so the walk runs for every request: the
    # name comparisons (cryptography compares Name objects in Python) are kept per pair of
    # certificates, and "seen" holds DER, whose hash Python keeps, instead of Certificates.
    ders = [certificate_der(c) for c in pool]
    current, current_der = leaf, certificate_der(leaf)
    path, seen = [leaf], {current_der}
    while not _names_match(current, current_der, current, current_der):  # not self-issued
        parent = next((c for c, d in zip(pool, ders, strict=True) if d not in seen
                       and _names_match(current, current_der, c, d)
                       and _signed_by(current, c)), None)
        if parent is None:
            break
        current, current_der = parent, certificate_der(parent)
        seen.add(current_der)
        path.append(parent)
    return tuple(path)


def _names_match(cert: x509.Certificate, cert_der: bytes, issuer: x509.Certificate,
                 issuer_der: bytes) -> bool:
    """``issuer``'s subject is ``cert``'s issuer name (by cryptography's Name equality)."""
    return _FACTS.get_or_make(  # type: ignore[return-value]
        (_names_match, cert_der, issuer_der), lambda: issuer.subject == cert.issuer)


def _proximity(pvr: VoucherRequest, chain: Sequence[x509.Certificate]) -> bool:
    """RFC 8995 §5.5: the pledge saw one of these certificates as the registrar's TLS cert."""
    spkis, digests = _chain_spkis(chain)
    if pvr.proximity_registrar_cert is not None:
        try:
            # the PVR's validate() loaded it already: this is a table lookup
            seen = load_certificate(pvr.proximity_registrar_cert, "proximity-registrar-cert")
        except (ValueError, DecodeError):
            return False
        ok = _spki_der(seen) in spkis
    elif pvr.proximity_registrar_pubk is not None:
        ok = pvr.proximity_registrar_pubk in spkis
    else:
        ok = pvr.proximity_registrar_pubk_sha256 in digests
    if not ok:
        raise Refusal(403, "the pledge's proximity-registrar-cert is not in the registrar's "
                           "certificate chain")
    return True


def _chain_top(leaf: x509.Certificate,
               pool: Sequence[x509.Certificate]) -> x509.Certificate:
    """Walk issuer links from ``leaf`` through ``pool``; the last certificate reached."""
    return _issuer_path(leaf, pool)[-1]


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    return directly_issued_by(cert, issuer)


# Facts about the registrar-side certificates, the same for every request of one registrar;
# each depends on the certificates' bytes only (certificate equality is DER equality). Kept by
# the certificates' DER (chain.certificate_der): hashing a Certificate object rehashes its
# bytes on every lookup, which cost more than some of these facts.
_WALKS = Memo(256)
_FACTS = Memo(1024)


def _by_der(fact: Callable[[x509.Certificate], T]) -> Callable[[x509.Certificate], T]:
    def kept(cert: x509.Certificate) -> T:
        return _FACTS.get_or_make(  # type: ignore[return-value]
            (fact, certificate_der(cert)), lambda: fact(cert))

    return kept


def _chain_spkis(
    chain: Sequence[x509.Certificate],
) -> tuple[frozenset[bytes], frozenset[bytes]]:
    def make() -> tuple[frozenset[bytes], frozenset[bytes]]:
        spkis = frozenset(certs.spki_der(c) for c in chain)
        return spkis, frozenset(hashlib.sha256(s).digest() for s in spkis)

    return _FACTS.get_or_make(  # type: ignore[return-value]
        (_chain_spkis, *map(certificate_der, chain)), make)


@_by_der
def _may_request(registrar: x509.Certificate) -> bool:
    return certs.has_cmc_ra(registrar)  # id-kp-cmcRA in the EKU


_spki_der = _by_der(certs.spki_der)
_spki_sha256 = _by_der(certs.spki_sha256)


@_by_der
def _domain_id(cert: x509.Certificate) -> str:
    return domain_id(cert)


def domain_id(cert: x509.Certificate) -> str:
    """RFC 8995 §5.8.2: the pinned-domain-cert's SubjectKeyIdentifier, else the SHA-256 of its
    SPKI, base64."""
    try:
        value = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        value = certs.spki_sha256(cert)
    return base64.b64encode(value).decode("ascii")


def _audit_assertion(name: str | None) -> str:
    # The audit log knows only these three (RFC 8995 §5.8.1).
    return name if name in ("verified", "logged", "proximity") else "logged"

