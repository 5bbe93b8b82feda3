"""The domain CA: LDevIDs that openssl accepts, and the CSRs it refuses."""

import datetime
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from brski import est
from brski.errors import ValidationError
from brski.pki import create_test_pki
from registrar.domain_ca import DomainCA, EnrollError

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["SN-CA-1"])


@pytest.fixture
def ca(pki) -> DomainCA:
    return DomainCA(pki.domain_ca.cert, pki.domain_ca.key)


def csr_for(key, subject=None, san=None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "from the csr")]))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


def tamper_signature(csr: x509.CertificateSigningRequest) -> bytes:
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the ECDSA signature's last integer
    return bytes(der)


def test_ldevid_takes_the_idevid_subject_and_openssl_accepts_it(pki, ca, tmp_path):
    idevid = pki.idevids["SN-CA-1"].cert
    cert = ca.issue(csr_for(ec.generate_private_key(ec.SECP256R1())), now=NOW, idevid=idevid)
    assert cert.subject == idevid.subject
    assert cert.issuer == pki.domain_ca.cert.subject
    (tmp_path / "ca.pem").write_bytes(pki.domain_ca.cert_pem())
    (tmp_path / "leaf.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"),
                           str(tmp_path / "leaf.pem")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert ca.issued_by_me(cert)
    assert not ca.issued_by_me(idevid)


def test_csr_with_a_bad_signature_is_refused_by_the_decoder():
    body = est.encode_base64(tamper_signature(csr_for(ec.generate_private_key(ec.SECP256R1()))))
    with pytest.raises(ValidationError, match="signature does not verify"):
        est.decode_csr_body(body)


def test_csr_with_a_bad_signature_is_refused_by_the_ca_too(pki, ca):
    bad = x509.load_der_x509_csr(tamper_signature(csr_for(ec.generate_private_key(
        ec.SECP256R1()))))
    with pytest.raises(EnrollError, match="signature"):
        ca.issue(bad, now=NOW, idevid=pki.idevids["SN-CA-1"].cert)


def test_small_rsa_keys_and_odd_curves_are_refused(pki, ca):
    idevid = pki.idevids["SN-CA-1"].cert
    small = rsa.generate_private_key(65537, 1024)
    with pytest.raises(EnrollError, match="1024 bits"):
        ca.issue(csr_for(small), now=NOW, idevid=idevid)
    odd = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(EnrollError, match="secp256k1"):
        ca.issue(csr_for(odd), now=NOW, idevid=idevid)


def test_csr_subject_policy_takes_subject_and_san_from_the_csr(pki):
    ca = DomainCA(pki.domain_ca.cert, pki.domain_ca.key, subject_policy="csr")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-7")])
    san = [x509.DNSName("node-7.example")]
    cert = ca.issue(csr_for(ec.generate_private_key(ec.SECP256R1()), subject, san), now=NOW,
                    idevid=pki.idevids["SN-CA-1"].cert)
    assert cert.subject == subject
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        x509.SubjectAlternativeName(san)


def test_idevid_policy_ignores_a_requested_subject_alt_name(pki, ca):
    csr = csr_for(ec.generate_private_key(ec.SECP256R1()), san=[x509.DNSName("registrar")])
    cert = ca.issue(csr, now=NOW, idevid=pki.idevids["SN-CA-1"].cert)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_renewal_keeps_the_subject_of_the_certificate_renewed(pki, ca):
    first = ca.issue(csr_for(ec.generate_private_key(ec.SECP256R1())), now=NOW,
                     idevid=pki.idevids["SN-CA-1"].cert)
    second = ca.issue(csr_for(ec.generate_private_key(ec.SECP256R1())), now=NOW,
                      renewing=first)
    assert second.subject == first.subject
    assert second.serial_number != first.serial_number


def test_ldevid_never_outlives_the_ca(pki):
    ca = DomainCA(pki.domain_ca.cert, pki.domain_ca.key,
                  validity=datetime.timedelta(days=100 * 365))
    cert = ca.issue(csr_for(ec.generate_private_key(ec.SECP256R1())), now=NOW,
                    idevid=pki.idevids["SN-CA-1"].cert)
    assert cert.not_valid_after_utc == pki.domain_ca.cert.not_valid_after_utc


def test_no_idevid_and_idevid_policy_is_an_error(ca):
    with pytest.raises(EnrollError, match="no IDevID"):
        ca.issue(csr_for(ec.generate_private_key(ec.SECP256R1())), now=NOW)
