"""A test PKI for BRSKI labs: manufacturer CA and IDevIDs, MASA, domain CA and registrar.

Pure: every function takes the time it needs (`now`) and returns certificate and key objects.
Writing them to disk is the job of ``brski.cli.pki``. All keys are ECDSA P-256.

Shape of the PKI (what an operator's lab needs, RFC 8995 §2.3, §5.5):
  manufacturer CA ──> IDevID (subject serialNumber, id-pe-masa-url extension)
  MASA CA ─────────> MASA voucher-signing cert   (the pledge's voucher trust anchor is the CA)
                └──> MASA TLS server cert
  domain CA ───────> registrar cert (serverAuth, clientAuth, id-kp-cmcRA)
"""

import datetime
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certs import OID_KP_CMC_RA, masa_url_extension
from .errors import UsageError

CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=825)
# IDevIDs are meant to last the device's life; RFC 8995 §2.2 suggests GeneralizedTime 99991231.
IDEVID_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
BACKDATE = datetime.timedelta(minutes=5)  # tolerate small clock differences between lab hosts


@dataclass
class Issued:
    """A certificate with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass
class TestPki:
    manufacturer_ca: Issued
    masa_ca: Issued
    masa_signer: Issued
    masa_tls: Issued
    domain_ca: Issued
    registrar: Issued
    idevids: dict[str, Issued] = field(default_factory=dict)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str, serial: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name,
    issuer: Issued | None,
    key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    not_after: datetime.datetime,
    serial: int,
) -> x509.CertificateBuilder:
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    authority = issuer.key.public_key() if issuer else public
    return builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False
    )


def _serial_for(now: datetime.datetime, key: ec.EllipticCurvePrivateKey) -> int:
    # Unique without a random source: time in microseconds plus bits of the fresh public key.
    point = key.public_key().public_numbers().x & 0xFFFFFFFF
    return (int(now.timestamp() * 1_000_000) << 32) | point


def _ca(common_name: str, organization: str, now: datetime.datetime) -> Issued:
    key = new_key()
    cert = (
        _builder(
            _name(common_name, organization), None, key, now, now + CA_LIFETIME,
            _serial_for(now, key),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def _leaf(
    issuer: Issued,
    subject: x509.Name,
    now: datetime.datetime,
    *,
    not_after: datetime.datetime | None = None,
    ekus: list[x509.ObjectIdentifier] | None = None,
    san: list[x509.GeneralName] | None = None,
    extra: list[x509.ExtensionType] | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> Issued:
    key = key or new_key()
    builder = (
        _builder(
            subject, issuer, key, now, not_after or now + LEAF_LIFETIME, _serial_for(now, key)
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
    )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    for ext in extra or []:
        builder = builder.add_extension(ext, critical=False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


def issue_idevid(
    manufacturer_ca: Issued, serial: str, masa_url: str, now: datetime.datetime,
    *, organization: str = "Example Manufacturer",
) -> Issued:
    """An IDevID: subject serialNumber = the pledge's serial, and the MASA URL extension."""
    if not serial or any(c in serial for c in "/\\\0") or not serial.isprintable():
        raise UsageError(f"serial {serial!r}: must be non-empty printable text without slashes")
    return _leaf(
        manufacturer_ca,
        _name(f"pledge {serial}", organization, serial),
        now,
        not_after=IDEVID_NOT_AFTER,
        ekus=[ExtendedKeyUsageOID.CLIENT_AUTH],
        extra=[masa_url_extension(masa_url)],
    )


def _dns_and_ips(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue_registrar(
    domain_ca: Issued, now: datetime.datetime, *, names: list[str], organization: str,
) -> Issued:
    """The registrar's TLS certificate: server and client auth, and id-kp-cmcRA so the MASA
    accepts it as a registration authority (RFC 8995 §5.5)."""
    return _leaf(
        domain_ca,
        _name(names[0], organization),
        now,
        ekus=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, OID_KP_CMC_RA],
        san=_dns_and_ips(names),
    )


def create_test_pki(
    now: datetime.datetime,
    *,
    masa_url: str = "masa.example:9443",
    masa_names: list[str] | None = None,
    registrar_names: list[str] | None = None,
    manufacturer: str = "Example Manufacturer",
    domain: str = "Example Domain",
    serials: list[str] | tuple[str, ...] = (),
) -> TestPki:
    if now.tzinfo is None:
        raise UsageError("now must be timezone-aware")
    manufacturer_ca = _ca(f"{manufacturer} IDevID CA", manufacturer, now)
    masa_ca = _ca(f"{manufacturer} MASA CA", manufacturer, now)
    masa_signer = _leaf(masa_ca, _name(f"{manufacturer} MASA voucher signer", manufacturer), now)
    masa_tls = _leaf(
        masa_ca,
        _name(f"{manufacturer} MASA", manufacturer),
        now,
        ekus=[ExtendedKeyUsageOID.SERVER_AUTH],
        san=_dns_and_ips(masa_names or ["masa.example", "localhost", "::1", "127.0.0.1"]),
    )
    domain_ca = _ca(f"{domain} CA", domain, now)
    registrar = issue_registrar(
        domain_ca, now, names=registrar_names or ["registrar.example", "localhost", "::1"],
        organization=domain,
    )
    pki = TestPki(manufacturer_ca, masa_ca, masa_signer, masa_tls, domain_ca, registrar)
    for serial in serials:
        pki.idevids[serial] = issue_idevid(
            manufacturer_ca, serial, masa_url, now, organization=manufacturer
        )
    return pki
