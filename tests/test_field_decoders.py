"""Library-level regressions for issue 11's fuzzing findings: refusal texts that name what was
expected and what came (not parser internals), strict JSON, CSRs read fully at decode."""

import json

import pytest
from badcsr import _tlv, cn_not_utf8, cn_wrong_type, version_1
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from brski import cms, est
from brski.chain import load_certificate
from brski.der_kind import describe
from brski.errors import DecodeError, ProtocolError
from brski.json_strict import loads_strict
from brski.telemetry import AuditLog, StatusReport
from brski.voucher_json import decode_json


@pytest.fixture(scope="module")
def cert_der() -> bytes:
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string("CN=t")
    t = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(t)
            .not_valid_after(t + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_describe(cert_der):
    assert describe(b"") == "an empty body"
    assert describe(cert_der) == "an X.509 certificate"
    assert describe(cert_der + b"xx") == "a DER SEQUENCE followed by 2 extra bytes"
    assert describe(cert_der[:-3]).startswith("a DER SEQUENCE cut short")
    assert describe(est.encode_base64(cert_der)) == "base64 text"
    assert describe(b"-----BEGIN CERTIFICATE-----\n") == "PEM text (CERTIFICATE)"
    assert describe(b"\x04\x00").startswith("bytes that are not DER")
    assert describe(b"\x30\x03\x02\x01\x00") == "a DER SEQUENCE of another kind"


def test_csr_body_that_is_a_certificate(cert_der):
    with pytest.raises(DecodeError) as info:
        est.decode_csr_body(cert_der)
    assert str(info.value) == "expected a PKCS#10 request (RFC 2986), got an X.509 certificate"


@pytest.mark.parametrize(("make", "why"), [(version_1, "version field 1"),
                                          (cn_not_utf8, "subject cannot be read"),
                                          (cn_wrong_type, "subject cannot be read")])
def test_malformed_csrs_are_decode_errors(make, why):
    # cryptography's InvalidVersion escaped; the subject errors came later, in the CA.
    for body in (make(), est.encode_base64(make())):
        with pytest.raises(DecodeError, match=why):
            est.decode_csr_body(body)


def test_cms_messages_name_the_input(cert_der):
    with pytest.raises(DecodeError, match="got base64 text where binary DER was expected"):
        cms.parse(est.encode_base64(cert_der))
    with pytest.raises(DecodeError, match=r"expected a CMS SignedData .*got an X.509 cert"):
        cms.parse(cert_der)
    for exc_text in ("Extra data", "ParseError", "ValueError"):
        with pytest.raises(DecodeError) as info:
            cms.parse(cert_der + b"\x00\x00")
        assert exc_text not in str(info.value)


def test_certificate_messages_name_the_input(cert_der):
    with pytest.raises(DecodeError) as info:
        load_certificate(cert_der[:-1], "pinned-domain-cert")
    assert "ParseError" not in str(info.value)
    assert "cut short" in str(info.value)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"a":"\\ud800"}', "lone surrogate"),
        ('{"\\udc00":1}', "lone surrogate"),
        ('["\\ud83d"]', "lone surrogate"),
        ('{"a":1e999}', "out of range"),
        ('{"a":-1e400}', "out of range"),
        ('{"a":NaN}', "NaN is not JSON"),
        ('{"a":1,"a":2}', "duplicate key"),
        ("1" * 5000, "too many digits"),
        ("[" * 100000, "nested too deeply"),
    ],
)
def test_json_that_cannot_be_re_encoded_is_refused(text, why):
    with pytest.raises(DecodeError, match=why):
        loads_strict(text.encode(), "x")


def test_surrogate_pairs_are_text():
    assert loads_strict(b'["\\ud83d\\ude00"]', "x") == ["\U0001f600"]


@pytest.mark.parametrize(
    "decode", [StatusReport.decode_json, AuditLog.decode_json, decode_json])
def test_every_json_decoder_refuses_what_its_encoder_cannot_write(decode):
    for body in (b'{"version":1,"status":true,"reason":"\\ud800"}',
                 b'{"version":1,"status":true,"reason-context":{"x":1e999}}',
                 b'{"ietf-voucher-request:voucher":{"serial-number":"\\udfff"}}'):
        with pytest.raises(ProtocolError):
            decode(body)


def test_telemetry_version_is_bounded():
    with pytest.raises(DecodeError, match="below 2"):
        StatusReport.decode_json(json.dumps({"version": 2**63, "status": True}).encode())
    report = StatusReport.decode_json(json.dumps({"version": 2**63 - 1, "status": True}).encode())
    assert StatusReport.decode_json(report.encode_json()) == report
    assert StatusReport.decode_cbor(report.encode_cbor()) == report


# --- link-format: what we write parses back to the same links -----------------------------------


@pytest.mark.parametrize("value", ["a<b>", "<", ">", "a=b", "x:y", "(1)", "[v]", "{}", "a?b",
                                   "u@h", 'say "hi"', "a,b;c", "é", ""])
def test_link_params_read_back_the_same(value):
    from brski.linkformat import JoinPortLink, format_links, parse_links

    link = JoinPortLink(8485, None, (("var", value),))
    assert parse_links(format_links([link])) == [link]


def test_link_params_that_cannot_read_back_are_refused():
    from brski.errors import UsageError
    from brski.linkformat import JoinPortLink, format_links, parse_links

    with pytest.raises(UsageError, match="backslash"):
        format_links([JoinPortLink(1, None, (("var", "a\\b"),))])
    with pytest.raises(DecodeError, match="backslash"):
        parse_links(b'<>;brski-jp=1;var="a\\\\b"')
    with pytest.raises(DecodeError, match="not a token"):
        parse_links(b"<>;brski-jp=1;a*b=3")


# --- csrattrs: what the decoder accepts, the encoder writes ------------------------------------


@pytest.mark.parametrize("values", [
    (b"\x0c\x01\xa0",),  # a UTF8String that is not UTF-8: well-formed DER all the same
    (b"\x09\x01\x61",),  # a REAL asn1crypto cannot read back
    (b"\x13\x02ab", b"\x0c\x01a"),  # SET OF order: DER sorts it
    (b"\x03\x02\x8eb",),  # a BIT STRING with too many unused bits
])
def test_csrattrs_round_trip(values):
    der = _tlv(0x30, _tlv(0x30, b"\x06\x03\x55\x04\x05" + _tlv(0x31, b"".join(values))))
    items = est.decode_csrattrs(der)
    assert est.decode_csrattrs(est.encode_csrattrs(items)) == items


def test_link_format_refusal_says_where_not_what_the_parser_calls_itself():
    from brski.linkformat import parse_links

    with pytest.raises(DecodeError) as info:
        parse_links(b"<>;brski-jp=1;var=a<b")
    assert "link_header" not in str(info.value)
    assert "character 19" in str(info.value)


def test_chain_refusals_say_why_in_words():
    import datetime

    from brski.chain import verify_chain
    from brski.errors import SignatureError
    from brski.pki import create_test_pki

    now = datetime.datetime.now(datetime.UTC)
    ours, theirs = create_test_pki(now), create_test_pki(now, domain="Other")
    with pytest.raises(SignatureError) as info:
        verify_chain(ours.domain_ca.cert, [], [theirs.masa_ca.cert], now)
    assert str(info.value).endswith("no trusted or supplied certificate issued it")
    later = now + datetime.timedelta(days=40000)
    with pytest.raises(SignatureError) as info:
        verify_chain(ours.masa_ca.cert, [], [ours.masa_ca.cert], later)
    assert str(info.value).endswith("a certificate of the chain is expired or not yet valid then")
    assert "encountered processing" not in str(info.value)


def test_certs_only_with_trailing_bytes_is_refused(cert_der):
    bundle = est.encode_certs_only([x509.load_der_x509_certificate(cert_der)])
    with pytest.raises(DecodeError, match="followed by 3 extra bytes"):
        est.decode_certs_only(bundle + b"abc")
