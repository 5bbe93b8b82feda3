"""brski-pki: create a test PKI for a BRSKI lab on disk.

    brski-pki init DIR [--serial S ...] [--masa-url URL] [--registrar-name NAME ...]
    brski-pki idevid DIR --serial S

Layout of DIR (keys are written 0600, directories 0700):
    pki.json                      what was asked for (MASA URL, names)
    manufacturer/ca.{crt,key}     IDevID issuing CA
    manufacturer/idevid/S.{crt,key}
    masa/ca.{crt,key}             MASA CA: the pledges' voucher trust anchor
    masa/signer.{crt,key}         voucher-signing certificate
    masa/tls.{crt,key}            MASA HTTPS server certificate
    domain/ca.{crt,key}           domain CA (issues LDevIDs)
    domain/registrar.{crt,key}    registrar TLS cert (serverAuth, clientAuth, id-kp-cmcRA)
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .. import __version__
from ..errors import BrskiError
from ..pki import Issued, TestPki, create_test_pki, issue_idevid

META = "pki.json"


class PkiFileError(Exception):
    """A PKI directory that cannot be used as asked."""


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a key silently; mode is set at creation, not after.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_issued(directory: Path, stem: str, issued: Issued) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(directory / f"{stem}.crt", issued.cert_pem(), 0o644)
    _write(directory / f"{stem}.key", issued.key_pem(), 0o600)


def load_issued(directory: Path, stem: str) -> Issued:
    cert = x509.load_pem_x509_certificate((directory / f"{stem}.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / f"{stem}.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiFileError(f"{directory / stem}.key: not an EC private key")
    return Issued(cert, key)


def write_pki(root: Path, pki: TestPki, meta: dict[str, object]) -> None:
    if root.exists() and any(root.iterdir()):
        raise PkiFileError(f"{root}: exists and is not empty; choose a new directory")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_issued(root / "manufacturer", "ca", pki.manufacturer_ca)
    write_issued(root / "masa", "ca", pki.masa_ca)
    write_issued(root / "masa", "signer", pki.masa_signer)
    write_issued(root / "masa", "tls", pki.masa_tls)
    write_issued(root / "domain", "ca", pki.domain_ca)
    write_issued(root / "domain", "registrar", pki.registrar)
    for serial, issued in pki.idevids.items():
        write_issued(root / "manufacturer" / "idevid", serial, issued)
    _write(root / META, (json.dumps(meta, indent=2) + "\n").encode(), 0o644)


def add_idevid(root: Path, serial: str, now: datetime.datetime) -> Path:
    try:
        meta = json.loads((root / META).read_text())
    except (OSError, ValueError) as exc:
        raise PkiFileError(f"{root}: not a PKI made by 'brski-pki init' ({exc})") from exc
    target = root / "manufacturer" / "idevid"
    if (target / f"{serial}.crt").exists():
        raise PkiFileError(f"{target / serial}.crt: an IDevID with this serial already exists")
    ca = load_issued(root / "manufacturer", "ca")
    issued = issue_idevid(ca, serial, str(meta["masa_url"]), now,
                          organization=str(meta["manufacturer"]))
    write_issued(target, serial, issued)
    return target / f"{serial}.crt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brski-pki", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"brski-pki {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a new PKI in an empty directory")
    init.add_argument("dir", type=Path)
    init.add_argument("--serial", action="append", default=[],
                      help="issue an IDevID for this serial number (repeatable)")
    init.add_argument("--masa-url", default="masa.example:9443",
                      help="authority written into the IDevIDs' MASA URL extension")
    init.add_argument("--masa-name", action="append", default=[],
                      help="DNS name or address for the MASA TLS certificate (repeatable)")
    init.add_argument("--registrar-name", action="append", default=[],
                      help="DNS name or address for the registrar certificate (repeatable)")
    init.add_argument("--manufacturer", default="Example Manufacturer")
    init.add_argument("--domain", default="Example Domain")
    idevid = sub.add_parser("idevid", help="issue one more IDevID from an existing PKI")
    idevid.add_argument("dir", type=Path)
    idevid.add_argument("--serial", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    now = datetime.datetime.now(datetime.UTC)
    try:
        if args.command == "init":
            pki = create_test_pki(
                now,
                masa_url=args.masa_url,
                masa_names=args.masa_name or None,
                registrar_names=args.registrar_name or None,
                manufacturer=args.manufacturer,
                domain=args.domain,
                serials=args.serial,
            )
            meta = {"masa_url": args.masa_url, "manufacturer": args.manufacturer,
                    "domain": args.domain}
            write_pki(args.dir, pki, meta)
            print(f"{args.dir}: PKI created with {len(pki.idevids)} IDevID(s)")
        else:
            path = add_idevid(args.dir, args.serial, now)
            print(f"{path}: IDevID issued")
    except (PkiFileError, BrskiError, OSError) as exc:
        print(f"brski-pki: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
