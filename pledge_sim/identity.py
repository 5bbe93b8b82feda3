"""Pledge identities: an IDevID certificate and its private key, as files.

The files matter, not just the objects: the stdlib ``ssl`` module loads a client certificate
only from files, and the TLS connections to the registrar present the IDevID (RFC 8995 §5.1).

Three sources, as ``pledge-sim enroll`` accepts them:
  * one cert/key pair (``--idevid CERT --key KEY``);
  * a directory of ``NAME.crt`` + ``NAME.key`` pairs (``--idevid-dir``);
  * a PKI made by ``brski-pki init`` (``--pki``): its ``manufacturer/idevid/`` pairs are picked
    by serial, and missing ones are issued with ``brski.cli.pki.add_idevid``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from brski import certs
from brski.cli.pki import PkiFileError, add_idevid
from brski.errors import BrskiError

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
IDEVID_SUBDIR = Path("manufacturer") / "idevid"
MASA_CA = Path("masa") / "ca.crt"
# The MASA's voucher-signing certificate: a COSE voucher reaches a constrained pledge with its
# x5bag stripped (cBRSKI §6.8), so the pledge needs the signer installed beside the anchor.
MASA_SIGNER = Path("masa") / "signer.crt"


class IdentityError(Exception):
    """An IDevID or trust anchor that cannot be loaded or issued as asked."""


@dataclass(frozen=True)
class PledgeIdentity:
    serial: str  # subject serialNumber (RFC 8995 §2.3.1), not the certificate serial
    cert: x509.Certificate
    key: SigningKey
    cert_path: Path
    key_path: Path

    @property
    def masa_url(self) -> str | None:
        return certs.masa_url(self.cert)


def load_identity(cert_path: Path, key_path: Path) -> PledgeIdentity:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"{cert_path}: cannot load IDevID: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{key_path}: an IDevID key must be EC or Ed25519")
    if key.public_key() != cert.public_key():
        raise IdentityError(f"{key_path}: key does not belong to {cert_path}")
    try:
        serial = certs.serial_number(cert)
    except BrskiError as exc:
        raise IdentityError(f"{cert_path}: {exc}") from exc
    return PledgeIdentity(serial, cert, key, cert_path, key_path)


def identities_from_dir(directory: Path) -> list[PledgeIdentity]:
    """Every ``NAME.crt`` with a ``NAME.key`` beside it, ordered by file name."""
    if not directory.is_dir():
        raise IdentityError(f"{directory}: not a directory")
    pairs = [c for c in sorted(directory.glob("*.crt")) if c.with_suffix(".key").exists()]
    if not pairs:
        raise IdentityError(f"{directory}: no NAME.crt/NAME.key pairs")
    return [load_identity(c, c.with_suffix(".key")) for c in pairs]


def _natural(serial: str) -> list[object]:
    # pledge-2 before pledge-10: the order a human expects from numbered serials.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", serial)]


def identities_from_pki(
    root: Path,
    *,
    serials: Sequence[str] = (),
    count: int | None = None,
    prefix: str = "sim-",
    now: datetime.datetime | None = None,
) -> list[PledgeIdentity]:
    """IDevIDs from a ``brski-pki`` directory.

    ``serials``: exactly these, issuing any that do not exist yet. Otherwise ``count`` of them:
    the existing ones in natural serial order, then new ones named ``<prefix>NNNN``.
    """
    directory = root / IDEVID_SUBDIR
    if not (root / "pki.json").exists():
        raise IdentityError(f"{root}: not a PKI made by 'brski-pki init'")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = sorted((c.stem for c in directory.glob("*.crt")), key=_natural)
    if serials:
        wanted = list(serials)
    else:
        wanted = existing[: count if count is not None else len(existing)]
        n = 0
        while count is not None and len(wanted) < count:
            candidate = f"{prefix}{n:04d}"
            n += 1
            if candidate not in wanted:
                wanted.append(candidate)
    if not wanted:
        raise IdentityError(f"{directory}: no IDevIDs (ask for some with --count)")
    when = now or datetime.datetime.now(datetime.UTC)
    for serial in wanted:
        if not (directory / f"{serial}.crt").exists():
            try:
                add_idevid(root, serial, when)
            except (PkiFileError, BrskiError, OSError) as exc:
                raise IdentityError(f"cannot issue an IDevID for {serial!r}: {exc}") from exc
    return [load_identity(directory / f"{s}.crt", directory / f"{s}.key") for s in wanted]


def load_anchors(path: Path, what: str = "MASA trust anchors") -> list[x509.Certificate]:
    """Every certificate in a PEM file: the manufacturer-installed MASA trust anchors (or,
    for a constrained pledge, the MASA signing certificates)."""
    try:
        found = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{path}: cannot load {what}: {exc}") from exc
    return found


def masa_anchor_path(pki_root: Path) -> Path:
    return pki_root / MASA_CA


def masa_signer_path(pki_root: Path) -> Path:
    return pki_root / MASA_SIGNER
