"""CSRs of the shapes coverage-guided fuzzing found (issue 11), built by patching the DER of a
good CSR and signing it again, so that only the one malformed part is wrong."""

from asn1crypto import csr as acsr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CN = b"\x0c\x04AAAA"  # UTF8String "AAAA", the CN of the template


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def patched_csr(old: bytes, new: bytes, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """DER of a CSR for subject CN=AAAA whose CertificationRequestInfo has ``old`` replaced
    by ``new`` (first occurrence), correctly signed again."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    good = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "AAAA")])).sign(key, hashes.SHA256())
    req = acsr.CertificationRequest.load(good.public_bytes(serialization.Encoding.DER))
    info = req["certification_request_info"].dump()
    assert old in info
    info = info.replace(old, new, 1)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, info + req["signature_algorithm"].dump() + _tlv(0x03, b"\x00" + signature))


def version_1() -> bytes:
    return patched_csr(b"\x02\x01\x00", b"\x02\x01\x01")  # INTEGER 0 (v1) -> 1


def cn_not_utf8() -> bytes:
    return patched_csr(CN, b"\x0c\x04\xff\xfeAA")


def cn_wrong_type() -> bytes:
    return patched_csr(CN, b"\x02\x04\x01\x02\x03\x04")  # an INTEGER where text belongs
