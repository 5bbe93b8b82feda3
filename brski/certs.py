"""X.509 facts BRSKI relies on: its OIDs and how to read them out of certificates.

RFC 8995 §2.3.1: the pledge's serial-number is the subject's serialNumber attribute, not the
certificate serial. §2.3.2: the MASA URL is the id-pe-masa-url extension, an IA5String.
"""

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from .errors import ValidationError

OID_MASA_URL = ObjectIdentifier("1.3.6.1.5.5.7.1.32")  # id-pe-masa-url
OID_KP_CMC_RA = ObjectIdentifier("1.3.6.1.5.5.7.3.28")  # id-kp-cmcRA
OID_CT_ANIMA_JSON_VOUCHER = ObjectIdentifier("1.2.840.113549.1.9.16.1.40")
OID_CT_ANIMA_CBOR_VOUCHER = ObjectIdentifier("1.2.840.113549.1.9.16.1.46")
OID_DATA = ObjectIdentifier("1.2.840.113549.1.7.1")


def encode_ia5string(text: str) -> bytes:
    """DER of an IA5String (tag 22), the body of the MASA URL extension."""
    raw = text.encode("ascii")
    if len(raw) < 0x80:
        return bytes([0x16, len(raw)]) + raw
    length = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
    return bytes([0x16, 0x80 | len(length)]) + length + raw


def decode_ia5string(der: bytes) -> str:
    if len(der) < 2 or der[0] != 0x16:
        raise ValidationError("MASA URL extension is not an IA5String")
    first = der[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or len(der) < 2 + n:
            raise ValidationError("MASA URL extension has a bad length")
        length, offset = int.from_bytes(der[2 : 2 + n], "big"), 2 + n
    body = der[offset:]
    if len(body) != length:
        raise ValidationError("MASA URL extension length does not match its content")
    try:
        return body.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValidationError("MASA URL extension is not ASCII") from exc


def masa_url_extension(url: str) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(OID_MASA_URL, encode_ia5string(url))


def masa_url(cert: x509.Certificate) -> str | None:
    """The IDevID's MASA URL, or None if the certificate carries none."""
    try:
        ext = cert.extensions.get_extension_for_oid(OID_MASA_URL)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise ValidationError("unexpected MASA URL extension type")
    return decode_ia5string(value.value)


def serial_number(cert: x509.Certificate) -> str:
    """The subject serialNumber attribute (RFC 8995 §2.3.1)."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if not attrs:
        raise ValidationError("certificate subject has no serialNumber attribute")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def has_cmc_ra(cert: x509.Certificate) -> bool:
    """True if the certificate may act as a registration authority (id-kp-cmcRA)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return OID_KP_CMC_RA in eku


def spki_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(cert: x509.Certificate) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki_der(cert))
    return digest.finalize()


__all__ = [
    "OID_CT_ANIMA_CBOR_VOUCHER",
    "OID_CT_ANIMA_JSON_VOUCHER",
    "OID_DATA",
    "OID_KP_CMC_RA",
    "OID_MASA_URL",
    "ExtendedKeyUsageOID",
    "has_cmc_ra",
    "masa_url",
    "masa_url_extension",
    "serial_number",
    "spki_der",
    "spki_sha256",
]
