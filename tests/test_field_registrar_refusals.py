"""What fuzzing sent the registrar (issue 11) gets a 4xx with a reason a human can act on, never
a 500: telemetry the store could not hold, malformed CSRs, bodies of the wrong kind, and a
voucher-request with voucher-only leaves (which RFC 8995 §3.4 says to ignore). Real registrar
and MASA processes over TLS on loopback (the harness of test_registrar)."""

import datetime

import pytest
from badcsr import cn_not_utf8, cn_wrong_type, version_1
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_registrar import EST, RV, VCJ, Setup, brski_pki, now

from brski import est
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, VoucherRequest, WireForm
from lab.registrar_testing import load_issued


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    root = tmp_path_factory.mktemp("field")
    brski_pki("init", str(root / "pki"), "--serial", "SN-F1", "--serial", "SN-F2")
    setup = Setup(root / "pki", root)
    # The CSR's subject is what fuzzing reached the CA with: let the CA use it.
    text = setup.registrar_toml.read_text()
    setup.registrar_toml.write_text(text.replace("[domain_ca]\n",
                                                 '[domain_ca]\nldevid_subject = "csr"\n', 1))
    assert 'ldevid_subject = "csr"' in setup.registrar_toml.read_text()
    setup.masa.start()
    setup.registrar.start()
    yield setup
    setup.stop()  # also: no traceback in either log


def _telemetry(field, body: bytes):
    return field.call("POST", "/.well-known/brski/enrollstatus", serial="SN-F1", body=body,
                      content_type="application/json")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"version":18446744073709551616,"status":true}', "below 2^63"),
        (b'{"version":9223372036854775808,"status":true}', "below 2^63"),
        (b'{"version":1,"status":false,"reason":"\\ud800"}', "lone surrogate"),
        (b'{"version":1,"status":false,"reason-context":{"x":1e999}}', "out of range"),
        (b'{"version":1,"status":false,"reason-context":{"\\udfff":1}}', "lone surrogate"),
    ],
)
def test_telemetry_the_store_cannot_hold_is_400(field, body, why):
    answer = _telemetry(field, body)
    assert answer.status == 400, (answer.status, answer.text)
    assert why in answer.text


def test_largest_storable_version_is_recorded(field):
    answer = _telemetry(field, b'{"version":9223372036854775807,"status":true}')
    assert answer.status == 200, answer.text


def _enroll_raw(field, der: bytes):
    return field.call("POST", f"{EST}/simpleenroll", serial="SN-F2",
                      body=est.encode_base64(der), content_type=est.MEDIA_PKCS10)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (version_1, "version field 1"),
        (cn_not_utf8, "subject cannot be read"),
        (cn_wrong_type, "subject cannot be read"),
    ],
)
def test_malformed_csrs_are_400(field, make, why):
    answer = _enroll_raw(field, make())
    assert answer.status == 400, (answer.status, answer.text)
    assert why in answer.text
    assert "ParseError" not in answer.text


def test_a_certificate_instead_of_a_csr_is_named(field):
    idevid = (field.pki / "manufacturer/idevid/SN-F2.crt").read_bytes()
    der = x509.load_pem_x509_certificate(idevid).public_bytes(serialization.Encoding.DER)
    answer = _enroll_raw(field, der)
    assert answer.status == 400
    assert "expected a PKCS#10 request (RFC 2986), got an X.509 certificate" in answer.text
    assert "ParseError" not in answer.text


def test_base64_voucher_request_is_named(field):
    body = est.encode_base64(field.pvr("SN-F1"))
    answer = field.request_voucher("SN-F1", body)
    assert answer.status == 400
    assert "base64 text where binary DER was expected, RFC 8995 §5.2" in answer.text
    assert "Extra data" not in answer.text


def test_trailing_bytes_after_the_cms_are_named(field):
    answer = field.request_voucher("SN-F1", field.pvr("SN-F1") + bytes(100))
    assert answer.status == 400
    assert "followed by 100 extra bytes" in answer.text


def test_voucher_only_leaves_in_a_pvr_are_ignored(field):
    # RFC 8995 §3.4; it was refused with 400 "domain-cert-revocation-checks is not valid".
    d = field.pki / "manufacturer/idevid"
    idevid = load_issued(d / "SN-F1.crt", d / "SN-F1.key")
    registrar_cert = field.call("GET", f"{EST}/cacerts", serial="SN-F1").server_cert
    extra = (("domain-cert-revocation-checks", True),
             ("pinned-domain-cert", "AAAA"),
             ("last-renewal-date", "2030-01-01T00:00:00Z"))
    when = now() - datetime.timedelta(seconds=5)
    pvr = VoucherRequest(assertion=Assertion.PROXIMITY, created_on=when, serial_number="SN-F1",
                         nonce=bytes(range(16)), proximity_registrar_cert=registrar_cert,
                         wire=WireForm(order=tuple(n for n, _ in extra), unknown_json=extra))
    body = sign_voucher_cms(pvr, idevid.key, [idevid.cert], when)
    assert b"domain-cert-revocation-checks" in body
    answer = field.call("POST", RV, serial="SN-F1", body=body, content_type=VCJ)
    assert answer.status == 200, answer.text
