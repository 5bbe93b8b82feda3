"""The pledge's sans-IO core: requests it builds, what it accepts, what it refuses (no sockets).

A test PKI stands in for the manufacturer, MASA and domain; vouchers are really signed with
the MASA key (brski.signed_voucher), LDevIDs really issued by the domain CA. Each negative
case changes one thing and names the rule it breaks.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from brski import est as codec
from brski import pki as test_pki
from brski.certs import spki_der
from brski.pki import create_test_pki
from brski.signed_voucher import sign_voucher_cms, verify_voucher_request_cms
from brski.telemetry import StatusReport
from brski.voucher import Assertion, Voucher
from pledge_sim.http import Response
from pledge_sim.identity import PledgeIdentity
from pledge_sim.session import (
    _HANDLERS,
    STEPS,
    Done,
    Fail,
    PledgeSession,
    Retry,
    Send,
    Step,
    Trust,
    Wait,
)

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
SERIAL = "pledge-0001"


@pytest.fixture(scope="module")
def pki() -> test_pki.TestPki:
    return create_test_pki(NOW, serials=[SERIAL, "other-0002"])


@pytest.fixture(scope="module")
def other_pki() -> test_pki.TestPki:
    """A second manufacturer/MASA/domain: signers the pledge must not trust."""
    return create_test_pki(NOW, manufacturer="Rogue Corp", domain="Rogue Domain")


def identity(pki: test_pki.TestPki, serial: str = SERIAL) -> PledgeIdentity:
    issued = pki.idevids[serial]
    return PledgeIdentity(serial, issued.cert, issued.key, Path("/nonexistent.crt"),
                          Path("/nonexistent.key"))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def counter_rng():  # type: ignore[no-untyped-def]
    """Distinct, predictable nonces: 16 bytes of 1, then of 2, ..."""
    counter = itertools.count(1)
    return lambda n: bytes([next(counter) % 256]) * n


def session(pki: test_pki.TestPki, **kwargs: object) -> PledgeSession:
    return PledgeSession(identity(pki), [pki.masa_ca.cert], counter_rng(), **kwargs)  # type: ignore[arg-type]


def ok(body: bytes = b"", ctype: str = "", status: int = 200, **headers: str) -> Response:
    h = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    if ctype:
        h["content-type"] = ctype
    return Response(status, "OK", h, body)


def make_voucher(pki: test_pki.TestPki, *, nonce: bytes | None, serial: str = SERIAL,
                 signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
                 pinned: x509.Certificate | None = None, **fields: object) -> bytes:
    cert, key = signer or (pki.masa_signer.cert, pki.masa_signer.key)
    voucher = Voucher(serial_number=serial, assertion=Assertion.PROXIMITY, created_on=NOW,
                      nonce=nonce, pinned_domain_cert=der(pinned or pki.domain_ca.cert),
                      **fields)  # type: ignore[arg-type]
    return sign_voucher_cms(voucher, key, [cert], NOW)


def voucher_response(data: bytes) -> Response:
    return ok(data, "application/voucher-cms+json")


def issue_ldevid(pki: test_pki.TestPki, csr_body: bytes, *,
                 ca_key: ec.EllipticCurvePrivateKey | None = None,
                 public_key: object = None) -> bytes:
    csr = codec.decode_csr_body(csr_body)
    cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(pki.domain_ca.cert.subject)
        .public_key(public_key or csr.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .sign(ca_key or pki.domain_ca.key, hashes.SHA256())
    )
    return codec.encode_base64(codec.encode_certs_only([cert]))


def cacerts_body(pki: test_pki.TestPki) -> bytes:
    return codec.encode_base64(codec.encode_certs_only([pki.domain_ca.cert]))


def status_of(request_body: bytes) -> StatusReport:
    return StatusReport.decode_json(request_body)


def run_to_voucher(pki: test_pki.TestPki, s: PledgeSession) -> Send:
    request = s.start(der(pki.registrar.cert), NOW)
    outcome = s.receive(voucher_response(make_voucher(pki, nonce=s.nonce)), NOW)
    assert isinstance(outcome, Send), outcome
    assert request.step is Step.REQUEST_VOUCHER
    return outcome


# -- the whole happy path -------------------------------------------------------------------


def test_full_enrollment_sends_every_step_with_the_right_trust(pki):
    s = session(pki)
    pvr = s.start(der(pki.registrar.cert), NOW)
    assert (pvr.method, pvr.path, pvr.trust) == ("POST", "/.well-known/brski/requestvoucher",
                                                 Trust.PROVISIONAL)
    assert ("Content-Type", "application/voucher-cms+json") in pvr.headers

    out = s.receive(voucher_response(make_voucher(pki, nonce=s.nonce)), NOW)
    assert isinstance(out, Send) and out.request.step is Step.VOUCHER_STATUS
    assert out.request.trust is Trust.PINNED  # reported over the re-validated connection
    assert status_of(out.request.body).status is True
    assert s.accepted is not None and s.accepted.pinned == pki.domain_ca.cert

    out = s.receive(ok(), NOW)
    assert isinstance(out, Send) and out.request.path == "/.well-known/est/cacerts"
    out = s.receive(ok(cacerts_body(pki), "application/pkcs7-mime"), NOW)
    assert isinstance(out, Send) and out.request.path == "/.well-known/est/csrattrs"
    out = s.receive(ok(status=204), NOW)
    assert isinstance(out, Send) and out.request.path == "/.well-known/est/simpleenroll"
    csr = codec.decode_csr_body(out.request.body)
    assert csr.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == SERIAL
    assert csr.public_key() != pki.idevids[SERIAL].cert.public_key()  # a new key, not the IDevID's

    out = s.receive(ok(issue_ldevid(pki, out.request.body)), NOW)
    assert isinstance(out, Send) and out.request.step is Step.ENROLL_STATUS
    assert out.request.trust is Trust.LDEVID
    assert status_of(out.request.body).status is True
    assert s.ldevid is not None and s.ldevid.public_key() == s.ldevid_key.public_key()
    assert s.ldevid_chain[-1] == pki.domain_ca.cert

    assert isinstance(s.receive(ok(), NOW), Done)
    assert s.step is Step.DONE


def test_pvr_is_signed_by_the_idevid_and_carries_the_proximity_cert(pki):
    s = session(pki)
    request = s.start(der(pki.registrar.cert), NOW)
    pvr, signer = verify_voucher_request_cms(request.body, [pki.manufacturer_ca.cert], NOW)
    assert signer == pki.idevids[SERIAL].cert
    assert pvr.assertion is Assertion.PROXIMITY
    assert pvr.serial_number == SERIAL
    assert pvr.proximity_registrar_cert == der(pki.registrar.cert)
    assert pvr.nonce == s.nonce and len(pvr.nonce) == 16


def test_every_step_has_a_request_shape_and_a_handler():
    steps = [s for s in Step if s is not Step.DONE]
    assert set(STEPS) == set(steps)
    assert set(_HANDLERS) == set(steps)


def test_no_response_is_expected_once_done(pki):
    s = session(pki)
    s.step = Step.DONE
    with pytest.raises(Exception, match="no response expected"):
        s.receive(ok(), NOW)


# -- nonces and 202 ------------------------------------------------------------------------


def test_each_attempt_gets_a_fresh_nonce(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    first = s.nonce
    s.reset()
    s.start(der(pki.registrar.cert), NOW)
    assert s.nonce != first


def test_202_resends_the_same_signed_pvr_after_the_capped_retry_after(pki):
    s = session(pki)
    first = s.start(der(pki.registrar.cert), NOW)
    wait = s.receive(ok(status=202, retry_after="600"), NOW)
    assert isinstance(wait, Wait)
    assert wait.seconds == 60  # RFC 8995 §5.3: capped at 60 s
    assert wait.request.body == first.body and wait.request.trust is Trust.PROVISIONAL
    again = s.start(der(pki.registrar.cert), NOW + datetime.timedelta(seconds=60))
    assert again.body == first.body  # the same signed PVR, byte for byte
    assert s.waits == 1
    out = s.receive(voucher_response(make_voucher(pki, nonce=s.nonce)), NOW)
    assert isinstance(out, Send) and s.accepted is not None


def test_after_202_a_different_registrar_cert_gets_a_new_pvr(pki, other_pki):
    s = session(pki)
    first = s.start(der(pki.registrar.cert), NOW)
    s.receive(ok(status=202, retry_after="1"), NOW)
    again = s.start(der(other_pki.registrar.cert), NOW)
    assert again.body != first.body


def test_202_on_simpleenroll_waits_and_repeats_the_same_csr(pki):
    s = session(pki)
    run_to_voucher(pki, s)
    s.receive(ok(), NOW)
    s.receive(ok(cacerts_body(pki)), NOW)
    enroll = s.receive(ok(status=404), NOW)  # no csrattrs: fine
    assert isinstance(enroll, Send)
    wait = s.receive(ok(status=202, retry_after="2"), NOW)
    assert isinstance(wait, Wait) and wait.seconds == 2
    assert wait.request.body == enroll.request.body and wait.request.trust is Trust.PINNED


# -- vouchers the pledge must refuse -------------------------------------------------------


def refuse(pki: test_pki.TestPki, s: PledgeSession, body: bytes, code: str) -> StatusReport:
    """Feed a bad voucher: the pledge reports it (voucher_status false, on the provisional
    connection), then fails with ``code`` and moves to another proxy."""
    out = s.receive(voucher_response(body), NOW)
    assert isinstance(out, Send), out
    assert out.request.step is Step.VOUCHER_STATUS and out.request.trust is Trust.PROVISIONAL
    report = status_of(out.request.body)
    assert report.status is False
    assert report.reason_context == {"code": code, "step": "voucher_status"} or \
        report.reason_context["code"] == code
    failure = s.receive(ok(), NOW)
    assert isinstance(failure, Fail)
    assert failure.code == code and failure.retry is Retry.OTHER_PROXY
    assert s.accepted is None and s.needs_voucher
    return report


def test_tampered_voucher_is_refused_and_reported(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    good = make_voucher(pki, nonce=s.nonce)
    tampered = good.replace(b'"proximity"', b'"verified" ')
    assert tampered != good
    report = refuse(pki, s, tampered, "voucher-signature")
    assert "signature" in report.reason or "altered" in report.reason


def test_voucher_with_the_wrong_nonce_is_refused(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    report = refuse(pki, s, make_voucher(pki, nonce=b"\x99" * 16), "voucher-nonce")
    assert "nonce" in report.reason


def test_voucher_for_another_serial_is_refused(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    refuse(pki, s, make_voucher(pki, nonce=s.nonce, serial="other-0002"), "voucher-serial")


def test_voucher_signed_by_another_masa_is_refused(pki, other_pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    forged = make_voucher(pki, nonce=s.nonce,
                          signer=(other_pki.masa_signer.cert, other_pki.masa_signer.key))
    refuse(pki, s, forged, "voucher-signature")


def test_voucher_signed_by_the_domain_not_the_masa_is_refused(pki):
    # The registrar's own key is not a MASA: a registrar cannot make its own vouchers.
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    forged = make_voucher(pki, nonce=s.nonce, signer=(pki.registrar.cert, pki.registrar.key))
    refuse(pki, s, forged, "voucher-signature")


def test_nonceless_voucher_needs_the_policy_flag(pki):
    expires = NOW + datetime.timedelta(minutes=20)
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    refuse(pki, s, make_voucher(pki, nonce=None, expires_on=expires), "voucher-nonce")
    s = session(pki, accept_nonceless=True)
    s.start(der(pki.registrar.cert), NOW)
    out = s.receive(voucher_response(make_voucher(pki, nonce=None, expires_on=expires)), NOW)
    assert isinstance(out, Send) and s.accepted is not None


def test_expired_voucher_is_refused_only_with_a_trusted_clock(pki):
    expired = make_voucher(pki, nonce=None, expires_on=NOW - datetime.timedelta(minutes=1))
    s = session(pki, accept_nonceless=True, trusted_clock=True)
    s.start(der(pki.registrar.cert), NOW)
    refuse(pki, s, expired, "voucher-expired")
    # RFC 8995 §2.6.1: without a trusted clock the pledge MAY ignore timestamps.
    s = session(pki, accept_nonceless=True)
    s.start(der(pki.registrar.cert), NOW)
    assert isinstance(s.receive(voucher_response(expired), NOW), Send)
    assert s.accepted is not None


def test_voucher_pinning_only_a_public_key_fails_gracefully(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    voucher = Voucher(serial_number=SERIAL, assertion=Assertion.PROXIMITY, nonce=s.nonce,
                      pinned_domain_pubk=spki_der(pki.domain_ca.cert))
    data = sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    refuse(pki, s, data, "voucher-pinned-domain-cert")


@pytest.mark.parametrize("body", [b"", b"\x30\x03\x02\x01", b"not cms", b"\x00" * 100])
def test_garbage_instead_of_a_voucher_is_refused_not_raised(pki, body):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    refuse(pki, s, body, "voucher-malformed")


# -- refusals by the registrar -------------------------------------------------------------


@pytest.mark.parametrize(("status", "words"), [
    (401, "man in the middle"),
    (403, "refuses this pledge"),
    (404, "MASA does not know"),
])
def test_voucher_refusals_are_final_for_the_proxy_with_a_clear_reason(pki, status, words):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    failure = s.receive(Response(status, "No", {}, b"serial pledge-0001 unknown\n"), NOW)
    assert isinstance(failure, Fail)
    assert failure.code == f"http-{status}" and failure.retry is Retry.OTHER_PROXY
    assert words in failure.reason
    assert "serial pledge-0001 unknown" in failure.reason  # the server's own words


def test_server_errors_are_transient(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    failure = s.receive(Response(503, "Unavailable", {}, b""), NOW)
    assert isinstance(failure, Fail) and failure.retry is Retry.BACKOFF


def test_a_503_retry_after_is_the_pause_before_the_retry(pki):
    """A registrar whose store is out of reach answers 503 + Retry-After: the pledge retries
    the same step after that long (capped as a 202's), not after its own backoff."""
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    failure = s.receive(Response(503, "Unavailable", {"retry-after": "7"}, b""), NOW)
    assert isinstance(failure, Fail) and failure.retry is Retry.BACKOFF and failure.wait == 7
    s = session(pki)
    run_to_voucher(pki, s)
    s.receive(ok(), NOW)
    failure = s.receive(Response(503, "Unavailable", {"retry-after": "100000"}, b""), NOW)
    assert failure.wait == 60  # RFC 8995 §5.3's cap, as for a 202
    assert s.resume().step is Step.CACERTS
    for status, headers in ((503, {}), (500, {"retry-after": "7"})):
        s = session(pki)
        s.start(der(pki.registrar.cert), NOW)
        failure = s.receive(Response(status, "No", headers, b""), NOW)
        assert failure.wait is None  # the pledge's own backoff


def test_server_error_after_the_voucher_resumes_the_same_step(pki):
    s = session(pki)
    run_to_voucher(pki, s)
    s.receive(ok(), NOW)
    failure = s.receive(Response(500, "Oops", {}, b""), NOW)
    assert isinstance(failure, Fail) and failure.retry is Retry.BACKOFF
    again = s.resume()
    assert again.step is Step.CACERTS and again.trust is Trust.PINNED


# -- enrollment failures -------------------------------------------------------------------


def to_enroll(pki: test_pki.TestPki, s: PledgeSession) -> Send:
    run_to_voucher(pki, s)
    s.receive(ok(), NOW)
    s.receive(ok(cacerts_body(pki)), NOW)
    out = s.receive(ok(status=204), NOW)
    assert isinstance(out, Send) and out.request.step is Step.ENROLL
    return out


def enroll_refused(s: PledgeSession, response: Response, code: str) -> StatusReport:
    out = s.receive(response, NOW)
    assert isinstance(out, Send) and out.request.step is Step.ENROLL_STATUS
    assert out.request.trust is Trust.PINNED  # a failure goes over the same connection
    report = status_of(out.request.body)
    failure = s.receive(ok(), NOW)
    assert isinstance(failure, Fail) and failure.code == code
    return report


def test_ldevid_for_someone_elses_key_is_refused_and_reported(pki):
    s = session(pki)
    enroll = to_enroll(pki, s)
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    body = issue_ldevid(pki, enroll.request.body, public_key=stranger)
    report = enroll_refused(s, ok(body), "ldevid")
    assert report.status is False and "our key" in report.reason


def test_ldevid_from_another_ca_is_refused(pki, other_pki):
    s = session(pki)
    enroll = to_enroll(pki, s)
    body = issue_ldevid(pki, enroll.request.body, ca_key=other_pki.domain_ca.key)
    report = enroll_refused(s, ok(body), "ldevid")
    assert "chain" in report.reason


def test_enroll_refusal_is_reported_in_enrollstatus(pki):
    s = session(pki)
    to_enroll(pki, s)
    report = enroll_refused(s, Response(403, "Forbidden", {}, b"not on the list"), "http-403")
    assert report.status is False and "not on the list" in report.reason


def test_bad_cacerts_is_refused(pki):
    s = session(pki)
    run_to_voucher(pki, s)
    s.receive(ok(), NOW)
    out = s.receive(ok(b"!!! not base64 !!!"), NOW)
    assert isinstance(out, Send) and out.request.step is Step.ENROLL_STATUS
    assert isinstance(s.receive(ok(), NOW), Fail)


def test_csrattrs_are_read_when_given(pki):
    s = session(pki)
    run_to_voucher(pki, s)
    s.receive(ok(), NOW)
    s.receive(ok(cacerts_body(pki)), NOW)
    attrs = codec.encode_csrattrs([codec.CsrAttribute("1.2.840.10045.4.3.2")])
    out = s.receive(ok(base64.b64encode(attrs)), NOW)
    assert isinstance(out, Send) and s.csrattrs == ["1.2.840.10045.4.3.2"]


# -- TLS re-validation and lost connections ------------------------------------------------


def test_registrar_cert_not_chaining_to_the_pin_is_reported_then_fatal_for_the_proxy(pki):
    s = session(pki)
    run_to_voucher(pki, s)
    out = s.pin_failed("unable to get local issuer certificate")
    assert isinstance(out, Send) and out.request.trust is Trust.PROVISIONAL
    report = status_of(out.request.body)
    assert report.status is False and "pinned-domain-cert" in report.reason
    failure = s.receive(ok(), NOW)
    assert isinstance(failure, Fail) and failure.code == "tls-pin"
    assert failure.retry is Retry.OTHER_PROXY and s.needs_voucher


def test_lost_connection_while_reporting_a_bad_voucher_keeps_the_verdict(pki):
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    s.receive(voucher_response(b"junk"), NOW)
    failure = s.connection_lost("reset by peer")
    assert failure.code == "voucher-malformed" and failure.retry is Retry.OTHER_PROXY


def test_lost_connection_is_transient_and_resumable_after_the_voucher(pki):
    s = session(pki)
    run_to_voucher(pki, s)
    failure = s.connection_lost("reset by peer")
    assert failure.retry is Retry.BACKOFF
    again = s.resume()
    assert again.step is Step.VOUCHER_STATUS and status_of(again.body).status is True


def test_ldevid_refused_falls_back_to_the_idevid_connection(pki):
    s = session(pki)
    enroll = to_enroll(pki, s)
    s.receive(ok(issue_ldevid(pki, enroll.request.body)), NOW)
    request = s.ldevid_refused("alert unknown ca")
    assert request.trust is Trust.PINNED and request.step is Step.ENROLL_STATUS
    assert json.loads(request.body)["status"] is True
    assert isinstance(s.receive(ok(), NOW), Done)


# -- whatever the registrar sends, the session answers with an outcome ---------------------


def session_at(pki: test_pki.TestPki, step: Step) -> PledgeSession:
    s = session(pki)
    s.start(der(pki.registrar.cert), NOW)
    if step is Step.REQUEST_VOUCHER:
        return s
    run = [
        (Step.VOUCHER_STATUS, lambda: voucher_response(make_voucher(pki, nonce=s.nonce))),
        (Step.CACERTS, ok),
        (Step.CSRATTRS, lambda: ok(cacerts_body(pki))),
        (Step.ENROLL, lambda: ok(status=204)),
        (Step.ENROLL_STATUS, lambda: ok(issue_ldevid(pki, s.csr or b""))),
    ]
    for reached, response in run:
        s.receive(response(), NOW)
        assert s.step is reached
        if reached is step:
            return s
    raise AssertionError(step)


@pytest.mark.parametrize("step", [s for s in Step if s is not Step.DONE])
@settings(max_examples=60, deadline=None)
@given(status=st.integers(100, 599), body=st.binary(max_size=300),
       retry_after=st.one_of(st.none(), st.text(max_size=40)),
       ctype=st.sampled_from(["", "application/voucher-cms+json", "text/plain"]))
def test_any_response_in_any_step_gives_an_outcome_not_an_exception(
        pki, step, status, body, retry_after, ctype):
    s = session_at(pki, step)
    headers = {"content-type": ctype}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    outcome = s.receive(Response(status, "X", headers, body), NOW)
    assert isinstance(outcome, Send | Wait | Done | Fail)
    if isinstance(outcome, Wait):
        assert 0 <= outcome.seconds <= 60
