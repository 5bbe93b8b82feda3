"""brski.est: EST payloads against the RFC 9148 Appendix A vectors, and bad input."""

import contextlib
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from brski import est
from brski.errors import DecodeError, UsageError, ValidationError
from brski.pki import create_test_pki

NOW = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC)


@pytest.fixture
def est_vectors(vectors):
    return vectors / "rfc9148-est-coaps"


def test_cacerts_vector_holds_the_example_root_ca(est_vectors):
    [cert] = est.decode_certs_only((est_vectors / "A.1-payload1.bin").read_bytes())
    assert cert.subject.rfc4514_string() == \
        "CN=Root CA,OU=certification,O=Example Inc,L=LA,ST=CA,C=US"


def test_enroll_vectors_decode(est_vectors):
    csr = est.decode_csr_body((est_vectors / "A.2-payload1.bin").read_bytes())  # raw DER
    [cert] = est.decode_certs_only((est_vectors / "A.2-payload2.bin").read_bytes())
    assert cert.public_key() == csr.public_key()
    assert cert.subject == csr.subject


def test_csrattrs_vector_decodes_and_reencodes_byte_for_byte(est_vectors):
    der = (est_vectors / "A.4-payload1.bin").read_bytes()
    attrs = est.decode_csrattrs(der)
    assert [a.oid for a in attrs] == ["1.3.6.1.1.1.1.22", "2.999.1", "1.2.840.113549.1.9.7",
                                      "2.999.2", "1.3.36.3.3.2.8.1.1.11",
                                      "2.16.840.1.101.3.4.2.2"]
    assert attrs[0].values is None
    assert attrs[3].values is not None and len(attrs[3].values) == 3
    assert est.encode_csrattrs(attrs) == der


def test_empty_csrattrs_is_legal():
    assert est.encode_csrattrs([]) == b"\x30\x00"
    assert est.decode_csrattrs(b"\x30\x00") == []


def test_certs_only_round_trip():
    pki = create_test_pki(NOW)
    certs = [pki.registrar.cert, pki.domain_ca.cert]
    body = est.encode_base64(est.encode_certs_only(certs))
    assert all(len(line) <= 64 for line in body.splitlines())
    # certificates is a DER SET OF: sorted by encoding, so the order is not kept.
    assert sorted(est.decode_certs_only(est.decode_base64(body)), key=repr) == \
        sorted(certs, key=repr)


def test_base64_tolerates_whitespace_and_refuses_junk():
    assert est.decode_base64(b" AAEC\r\nAw==\n") == b"\x00\x01\x02\x03"
    for bad in (b"", b"   ", b"AAE", b"AA!A", b"AAEC=A=="):
        with pytest.raises(DecodeError):
            est.decode_base64(bad)
    with pytest.raises(UsageError):
        est.decode_base64("AAEC")  # type: ignore[arg-type]


def test_csr_body_accepts_base64_der_and_pem():
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    der = csr.public_bytes(serialization.Encoding.DER)
    pem = csr.public_bytes(serialization.Encoding.PEM)
    for body in (est.encode_csr_body(csr), der, pem):
        assert est.decode_csr_body(body).public_key() == csr.public_key()


def test_tampered_csr_is_a_validation_error():
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x40
    with pytest.raises(ValidationError):
        est.decode_csr_body(est.encode_base64(bytes(der)))


def test_oversized_bodies_are_refused():
    with pytest.raises(DecodeError, match="exceeds"):
        est.decode_base64(b"A" * (est.MAX_BODY + 4))


@given(st.binary(max_size=600))
def test_decoders_raise_only_decode_errors(data):
    for decode in (est.decode_certs_only, est.decode_csrattrs, est.decode_csr_body,
                   est.decode_base64):
        with contextlib.suppress(DecodeError, ValidationError):
            decode(data)


def test_truncated_certs_only_is_a_decode_error():
    der = est.encode_certs_only([create_test_pki(NOW).domain_ca.cert])
    for cut in (1, 10, len(der) // 2, len(der) - 1):
        with pytest.raises(DecodeError):
            est.decode_certs_only(der[:cut])
