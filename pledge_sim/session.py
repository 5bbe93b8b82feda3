"""One pledge's BRSKI enrollment as a sans-IO state machine.

The adapter (``pledge_sim.runner``) opens TLS connections and moves bytes; this object decides
what to send and what an answer means. It is fed HTTP responses and the time, and answers
with one of four outcomes: ``Send`` the next request, ``Wait`` and resend (a 202),
``Done``, or ``Fail`` (with how to retry). Tests drive it with no sockets at all.

The steps, in order, with the trust each connection needs (RFC 8995 §5):

    requestvoucher  provisional  PVR (CMS) -> voucher (CMS), or 202 + Retry-After
    voucher_status  pinned       (provisional when reporting a rejected voucher)
    cacerts         pinned       EST, RFC 7030 §4.1
    csrattrs        pinned       EST, RFC 8995 §5.9.2: the pledge MUST ask
    simpleenroll    pinned       CSR -> LDevID, or 202 + Retry-After
    enrollstatus    ldevid       reported over TLS with the new LDevID (§5.9.4); a failure is
                                 reported over the connection it happened on
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from brski.errors import UsageError
from brski.telemetry import StatusReport

from . import est
from .http import Response
from .identity import PledgeIdentity
from .retry import retry_after_seconds
from .voucher_check import AcceptedVoucher, VoucherRejected, accept_voucher, build_pvr, new_nonce

VOUCHER_CMS = "application/voucher-cms+json"
JSON = "application/json"
PKCS10 = "application/pkcs10"
PKCS7 = "application/pkcs7-mime"


class Step(enum.Enum):
    REQUEST_VOUCHER = "requestvoucher"
    VOUCHER_STATUS = "voucher_status"
    CACERTS = "cacerts"
    CSRATTRS = "csrattrs"
    ENROLL = "simpleenroll"
    ENROLL_STATUS = "enrollstatus"
    DONE = "done"


class Trust(enum.Enum):
    PROVISIONAL = "provisional"  # any server certificate, kept for the PVR
    PINNED = "pinned"  # the voucher's pinned-domain-cert is the only anchor
    LDEVID = "ldevid"  # pinned, and the client presents the new LDevID


class Retry(enum.Enum):
    BACKOFF = "backoff"  # transient (5xx, lost connection): wait, then try again
    OTHER_PROXY = "other-proxy"  # this registrar will not do: never again through this proxy


@dataclass(frozen=True)
class Request:
    step: Step
    method: str
    path: str
    trust: Trust
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Send:
    request: Request


@dataclass(frozen=True)
class Wait:
    seconds: float
    request: Request


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Fail:
    code: str  # short and stable: voucher-signature, http-404, tls-refused, ...
    reason: str  # one line for a human
    retry: Retry
    wait: float | None = None  # a 503's Retry-After: the pause before the retry (BACKOFF)


Outcome = Send | Wait | Done | Fail


@dataclass(frozen=True)
class StepSpec:
    method: str
    path: str
    trust: Trust
    content_type: str | None = None
    accept: str | None = None


# The state machine's shape as data: every step's request. Handlers are in _HANDLERS below.
STEPS: dict[Step, StepSpec] = {
    Step.REQUEST_VOUCHER: StepSpec("POST", "/.well-known/brski/requestvoucher",
                                   Trust.PROVISIONAL, VOUCHER_CMS, VOUCHER_CMS),
    Step.VOUCHER_STATUS: StepSpec("POST", "/.well-known/brski/voucher_status", Trust.PINNED,
                                  JSON),
    Step.CACERTS: StepSpec("GET", "/.well-known/est/cacerts", Trust.PINNED, None, PKCS7),
    Step.CSRATTRS: StepSpec("GET", "/.well-known/est/csrattrs", Trust.PINNED, None,
                            "application/csrattrs"),
    Step.ENROLL: StepSpec("POST", "/.well-known/est/simpleenroll", Trust.PINNED, PKCS10, PKCS7),
    Step.ENROLL_STATUS: StepSpec("POST", "/.well-known/brski/enrollstatus", Trust.LDEVID, JSON),
}

# RFC 8995 §5.3 / §5.6: what a refused voucher-request means, for the pledge's error line.
_VOUCHER_REFUSALS = {
    401: "the registrar says proximity-registrar-cert is not its certificate "
         "(a man in the middle?)",
    403: "the registrar refuses this pledge (bad signature, stale, or blocked)",
    404: "the MASA does not know this pledge or could not validate it",
    406: "voucher type not acceptable, or the pledge is rejected by inventory or audit",
    415: "the voucher-request or Accept type is not supported",
}


@dataclass
class PledgeSession:
    identity: PledgeIdentity
    anchors: Sequence[x509.Certificate]  # the MASA trust anchors installed by the manufacturer
    rng: Callable[[int], bytes]
    trusted_clock: bool = False
    accept_nonceless: bool = False

    step: Step = field(default=Step.REQUEST_VOUCHER, init=False)
    nonce: bytes | None = field(default=None, init=False)
    pvr: bytes | None = field(default=None, init=False)
    proximity_cert: bytes | None = field(default=None, init=False)
    accepted: AcceptedVoucher | None = field(default=None, init=False)
    cacerts: list[x509.Certificate] = field(default_factory=list, init=False)
    csrattrs: list[str] | None = field(default=None, init=False)  # OIDs asked for
    ldevid_key: ec.EllipticCurvePrivateKey | None = field(default=None, init=False)
    csr: bytes | None = field(default=None, init=False)
    ldevid: x509.Certificate | None = field(default=None, init=False)
    ldevid_chain: list[x509.Certificate] = field(default_factory=list, init=False)
    waits: int = field(default=0, init=False)  # 202s honoured
    events: list[str] = field(default_factory=list, init=False)
    _resend_pvr: bool = field(default=False, init=False)
    _pending: Fail | None = field(default=None, init=False)
    _status_body: bytes = field(default=b"", init=False)

    # -- inputs from the adapter ----------------------------------------------------------
    @property
    def needs_voucher(self) -> bool:
        return self.accepted is None

    def start(self, proximity_cert_der: bytes | None, now: datetime) -> Request:
        """A new provisional connection is up: the voucher-request to send on it.

        A fresh nonce and PVR per attempt (RFC 8995 §5.2), except after a 202, when the
        same signed PVR is resent (§5.3) if the registrar still shows the same certificate.
        """
        if not self.needs_voucher:
            raise UsageError("start() is for the provisional phase; use resume()")
        if not proximity_cert_der:
            raise UsageError("the provisional TLS session showed no server certificate")
        self.step = Step.REQUEST_VOUCHER
        self._pending = None
        if not (self._resend_pvr and self.pvr and proximity_cert_der == self.proximity_cert):
            self.nonce = new_nonce(self.rng)
            self.proximity_cert = proximity_cert_der
            self.pvr = build_pvr(self.identity, proximity_cert_der, self.nonce, now)
            self._resend_pvr = False
        return self._request(Step.REQUEST_VOUCHER, self.pvr)

    def resume(self) -> Request:
        """After a lost connection in the pinned phase: the request to repeat."""
        if self.needs_voucher or self._pending is not None:
            raise UsageError("nothing to resume: use start()")
        return self._request(self.step, self._body_for(self.step))

    def receive(self, response: Response, now: datetime) -> Outcome:
        handler = _HANDLERS.get(self.step)
        if handler is None:
            raise UsageError(f"no response expected in step {self.step.value}")
        return handler(self, response, now)

    def pin_failed(self, detail: str) -> Outcome:
        """The registrar's TLS certificate does not chain to pinned-domain-cert (§5.6.2):
        report it over a provisional connection, then give up on this registrar."""
        failure = Fail("tls-pin", f"registrar TLS certificate does not chain to the "
                                  f"pinned-domain-cert: {detail}", Retry.OTHER_PROXY)
        self.accepted = None
        return self._report_voucher(False, failure, trust=Trust.PROVISIONAL)

    def ldevid_refused(self, detail: str) -> Request:
        """The registrar would not take a TLS session with the LDevID: report enrollment
        over a connection with the IDevID instead, and say so."""
        self.events.append(f"LDevID TLS refused ({detail}); enrollstatus sent with the IDevID")
        return Request(Step.ENROLL_STATUS, "POST", STEPS[Step.ENROLL_STATUS].path, Trust.PINNED,
                       self._status_body, self._headers(STEPS[Step.ENROLL_STATUS]))

    def connection_lost(self, detail: str) -> Fail:
        """Transient: keep what was achieved. Before the voucher, the next attempt makes a
        new PVR (unless a 202 asked for the same one); after it, resume() repeats the step.
        If the connection died while a failure was being reported, that failure stands: the
        report was informative only."""
        if self._pending is not None:
            failure = self._pending
            if self.step is Step.VOUCHER_STATUS:
                self.reset()
            self._pending = None
            return failure
        return Fail("connection", detail, Retry.BACKOFF)

    def reset(self) -> None:
        """Forget the voucher and everything after it (a new registrar must be asked)."""
        self.step, self.accepted, self._pending, self._resend_pvr = (
            Step.REQUEST_VOUCHER, None, None, False)

    # -- handlers, one per step -----------------------------------------------------------
    def _on_voucher(self, r: Response, now: datetime) -> Outcome:
        if r.status == 202:
            self._resend_pvr = True
            return self._wait(r, now)
        if r.status != 200:
            return self._refused(r, _VOUCHER_REFUSALS, now)
        if r.content_type not in (VOUCHER_CMS, ""):
            failure = Fail("voucher-malformed", f"voucher has Content-Type {r.content_type!r}",
                           Retry.OTHER_PROXY)
            return self._report_voucher(False, failure, trust=Trust.PROVISIONAL)
        assert self.nonce is not None
        try:
            accepted = accept_voucher(
                r.body, anchors=self.anchors, serial=self.identity.serial, nonce=self.nonce,
                now=now if self.trusted_clock else None, accept_nonceless=self.accept_nonceless)
        except VoucherRejected as exc:
            failure = Fail(f"voucher-{exc.code}", exc.reason, Retry.OTHER_PROXY)
            return self._report_voucher(False, failure, trust=Trust.PROVISIONAL)
        self.accepted = accepted
        self._resend_pvr = False
        self.events.append(f"voucher accepted: assertion {accepted.assertion}")
        return self._report_voucher(True, None, trust=Trust.PINNED)

    def _on_voucher_status(self, r: Response, now: datetime) -> Outcome:
        # §5.7: the answer carries nothing the pledge must act on.
        if self._pending is not None:
            failure, self._pending = self._pending, None
            self.reset()
            return failure
        return self._next(Step.CACERTS)

    def _on_cacerts(self, r: Response, now: datetime) -> Outcome:
        if r.status == 202:
            return self._wait(r, now)
        if r.status != 200:
            return self._est_failed(r, now)
        try:
            self.cacerts = est.decode_certs_only(r.body)
        except est.EstError as exc:
            return self._report_enroll(False, Fail("cacerts", f"cacerts: {exc}",
                                                   Retry.OTHER_PROXY), trust=Trust.PINNED)
        return self._next(Step.CSRATTRS)

    def _on_csrattrs(self, r: Response, now: datetime) -> Outcome:
        if r.status >= 500:
            return self._est_failed(r, now)
        # 204/404: the registrar wants no particular attributes (RFC 7030 §4.5.2). The
        # content is advice for the CSR; this simulator reads it but does not act on it.
        if r.status == 200 and r.body.strip():
            try:
                wanted = est.decode_csrattrs(r.body)
            except est.EstError as exc:
                self.events.append(f"csrattrs ignored: {exc}")
            else:
                self.csrattrs = [a.oid for a in wanted]
        else:
            self.csrattrs = []
        if self.ldevid_key is None:
            self.ldevid_key = est.new_ldevid_key()
            self.csr = est.build_csr(self.identity.serial, self.ldevid_key)
        return self._next(Step.ENROLL)

    def _on_enroll(self, r: Response, now: datetime) -> Outcome:
        if r.status == 202:
            return self._wait(r, now)
        if r.status != 200:
            return self._est_failed(r, now)
        assert self.ldevid_key is not None
        try:
            issued = est.decode_certs_only(r.body)
            self.ldevid, self.ldevid_chain = est.check_ldevid(
                issued, self.ldevid_key, self.cacerts, now if self.trusted_clock else None)
        except est.EstError as exc:
            return self._report_enroll(False, Fail("ldevid", f"simpleenroll: {exc}",
                                                   Retry.OTHER_PROXY), trust=Trust.PINNED)
        self.events.append(f"LDevID issued: {self.ldevid.subject.rfc4514_string()}")
        return self._report_enroll(True, None, trust=Trust.LDEVID)

    def _on_enroll_status(self, r: Response, now: datetime) -> Outcome:
        if self._pending is not None:
            failure, self._pending = self._pending, None
            return failure
        if not 200 <= r.status < 300:
            self.events.append(f"enrollstatus answered HTTP {r.status}")
        self.step = Step.DONE
        return Done()

    # -- helpers --------------------------------------------------------------------------
    def _headers(self, spec: StepSpec) -> tuple[tuple[str, str], ...]:
        headers = []
        if spec.content_type:
            headers.append(("Content-Type", spec.content_type))
        if spec.accept:
            headers.append(("Accept", spec.accept))
        return tuple(headers)

    def _body_for(self, step: Step) -> bytes:
        if step is Step.REQUEST_VOUCHER:
            return self.pvr or b""
        if step is Step.ENROLL:
            return self.csr or b""
        if step in (Step.VOUCHER_STATUS, Step.ENROLL_STATUS):
            return self._status_body
        return b""

    def _request(self, step: Step, body: bytes | None, trust: Trust | None = None) -> Request:
        spec = STEPS[step]
        return Request(step, spec.method, spec.path, trust or spec.trust, body or b"",
                       self._headers(spec))

    def _next(self, step: Step) -> Send:
        self.step = step
        return Send(self._request(step, self._body_for(step)))

    def _wait(self, r: Response, now: datetime) -> Wait:
        seconds = retry_after_seconds(r.header("retry-after"), now)
        self.waits += 1
        self.events.append(f"{self.step.value}: 202, retry in {seconds:g} s")
        trust = Trust.PROVISIONAL if self.needs_voucher else STEPS[self.step].trust
        return Wait(seconds, self._request(self.step, self._body_for(self.step), trust))

    def _refused(self, r: Response, meanings: dict[int, str], now: datetime) -> Fail:
        hint = meanings.get(r.status, "")
        text = r.text_excerpt()
        reason = f"{self.step.value}: HTTP {r.status} {r.reason}".rstrip()
        reason += f" — {hint}" if hint else ""
        reason += f": {text}" if text else ""
        retry = Retry.BACKOFF if r.status >= 500 else Retry.OTHER_PROXY
        # RFC 9110 §10.2.3: with a 503, Retry-After says how long the server expects to be
        # unavailable (a registrar whose store is out of reach): wait that, capped as for 202.
        wait = None
        if r.status == 503 and r.header("retry-after") is not None:
            wait = retry_after_seconds(r.header("retry-after"), now)
        return Fail(f"http-{r.status}", reason, retry, wait)

    def _est_failed(self, r: Response, now: datetime) -> Outcome:
        failure = self._refused(r, {}, now)
        if failure.retry is Retry.BACKOFF:
            return failure  # resume() repeats the step after a pause
        return self._report_enroll(False, failure, trust=Trust.PINNED)

    def _status(self, ok: bool, failure: Fail | None) -> bytes:
        if ok:
            return StatusReport(True).encode_json()
        assert failure is not None
        context = {"code": failure.code, "step": self.step.value}
        return StatusReport(False, failure.reason, context).encode_json()

    def _report_voucher(self, ok: bool, failure: Fail | None, *, trust: Trust) -> Send:
        self._status_body = self._status(ok, failure)
        self._pending = failure
        self.step = Step.VOUCHER_STATUS
        return Send(self._request(Step.VOUCHER_STATUS, self._status_body, trust))

    def _report_enroll(self, ok: bool, failure: Fail | None, *, trust: Trust) -> Send:
        self._status_body = self._status(ok, failure)
        self._pending = failure
        self.step = Step.ENROLL_STATUS
        return Send(self._request(Step.ENROLL_STATUS, self._status_body, trust))


Handler = Callable[[PledgeSession, Response, datetime], Outcome]
_HANDLERS: dict[Step, Handler] = {
    Step.REQUEST_VOUCHER: PledgeSession._on_voucher,
    Step.VOUCHER_STATUS: PledgeSession._on_voucher_status,
    Step.CACERTS: PledgeSession._on_cacerts,
    Step.CSRATTRS: PledgeSession._on_csrattrs,
    Step.ENROLL: PledgeSession._on_enroll,
    Step.ENROLL_STATUS: PledgeSession._on_enroll_status,
}
