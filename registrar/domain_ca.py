"""The domain CA: turns a pledge's CSR into an LDevID (RFC 8995 §5.9.3, RFC 7030 §4.2).

Policy lives here, not in the HTTP handler: which keys are acceptable, which subject the
LDevID gets (the IDevID's, by default, so the device keeps its identity and serialNumber; or
the CSR's, together with a subjectAltName the CSR requests), its lifetime and extensions.
The CSR's self-signature was already checked by ``brski.est.decode_csr_body`` (proof of
possession); ``issue`` checks it again so that no caller can skip it.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .tomlconfig import PrivateKey

BACKDATE = datetime.timedelta(minutes=5)  # tolerate clock skew between registrar and pledge
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class EnrollError(Exception):
    """A CSR this CA will not sign; the message is safe to send to the client."""


@dataclass
class DomainCA:
    cert: x509.Certificate
    key: PrivateKey
    validity: datetime.timedelta = datetime.timedelta(days=365)
    subject_policy: str = "idevid"  # "idevid" or "csr"

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        now: datetime.datetime,
        idevid: x509.Certificate | None = None,
        renewing: x509.Certificate | None = None,
        sequence: int | None = None,
    ) -> x509.Certificate:
        """An LDevID for ``csr``.

        ``idevid``: the pledge's authenticated IDevID (enroll); ``renewing``: the authenticated
        LDevID being renewed (re-enroll, RFC 7030 §4.2.2: the subject stays the same).
        ``sequence``: the number the store handed out for this certificate (``serial_number``).
        """
        try:
            # cryptography parses CSR parts lazily: a malformed one raises ValueError or
            # TypeError on first use (brski.est.decode_csr_body reads them all first).
            if not csr.is_signature_valid:
                raise EnrollError("CSR signature does not verify")
            public = csr.public_key()
            subject = self._subject(csr, idevid, renewing)
            list(subject)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise EnrollError("the CSR's key or subject cannot be read") from exc
        _check_key(public)
        not_after = min(now + self.validity, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(serial_number(sequence))
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=isinstance(public, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=isinstance(public, ec.EllipticCurvePublicKey),
                    key_cert_sign=False, crl_sign=False, encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            # An LDevID authenticates the device as TLS client and server (e.g. in the ACP).
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),
                critical=False,
            )
        )
        # A requested subjectAltName is copied only when policy trusts the CSR's content:
        # otherwise any pledge could ask for a name of, say, the registrar.
        san = _requested_san(csr) if self.subject_policy == "csr" else None
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        algorithm = None if isinstance(self.key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        try:
            return builder.sign(self.key, algorithm)
        except (ValueError, TypeError) as exc:  # a CSR subject/SAN cryptography cannot encode
            raise EnrollError("the CSR's subject or subjectAltName cannot be put in a "
                              "certificate") from exc

    def _subject(self, csr: x509.CertificateSigningRequest, idevid: x509.Certificate | None,
                 renewing: x509.Certificate | None) -> x509.Name:
        if renewing is not None:
            return renewing.subject
        if self.subject_policy == "csr":
            if not list(csr.subject):
                raise EnrollError("CSR has an empty subject and policy takes the CSR's subject")
            return csr.subject
        if idevid is None:
            raise EnrollError("no IDevID to take the subject from")
        return idevid.subject

    def issued_by_me(self, cert: x509.Certificate) -> bool:
        """True if ``cert`` carries this CA's signature."""
        try:
            cert.verify_directly_issued_by(self.cert)
        except Exception:  # InvalidSignature, or ValueError/TypeError for a foreign key type
            return False
        return True


def serial_number(sequence: int | None) -> int:
    """RFC 5280 §4.1.2.2: positive, at most 20 octets. The store's sequence number (unique
    across the registrars sharing it) in the high bits, 64 random bits below it (so serials
    are not guessable); without a sequence, 159 random bits."""
    if sequence is None:
        return secrets.randbits(159) | 1
    if not 0 < sequence < 1 << 94:
        raise ValueError(f"certificate sequence number {sequence} out of range")
    return sequence << 64 | secrets.randbits(64)


def _check_key(public: object) -> None:
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ALLOWED_CURVES):
            raise EnrollError(f"CSR key on curve {public.curve.name} is not accepted")
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise EnrollError(f"CSR RSA key of {public.key_size} bits is below {MIN_RSA_BITS}")
    elif not isinstance(public, ed25519.Ed25519PublicKey):
        raise EnrollError(f"CSR key type {type(public).__name__} is not accepted")


def _requested_san(csr: x509.CertificateSigningRequest) -> x509.SubjectAlternativeName | None:
    """A subjectAltName the pledge asked for in its extensionRequest, if any (BRSKI's ACP
    profile puts the node's ACP address there, RFC 8994 §6.2.2)."""
    try:
        return csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
