"""``brski-registrar cojp ...``: the operator's commands for the JRC's pledges and their PSKs.

    brski-registrar cojp add-pledge (--config FILE | --store PATH|URL) --id HEX
                                    [--psk HEX | --generate-psk] [--edhoc-credential FILE]
                                    [--replace]
    brski-registrar cojp make-edhoc-credential --out PREFIX --kid HEX [--subject TEXT]
    brski-registrar cojp remove-pledge (--config FILE | --store PATH|URL) --id HEX
    brski-registrar cojp list (--config FILE | --store PATH|URL)

The pledge identifier (typically the EUI-64, e.g. 00-12-4b-00-14-b5-d9-e2) is the OSCORE ID
context; the PSK is the OSCORE master secret, at least 16 random bytes (RFC 9031 §8.3: never
derived from the identifier). --generate-psk draws one and prints it once, for provisioning the
pledge. --edhoc-credential lets the pledge use EDHOC instead of (or besides) a PSK: the file
holds its CCS (hex), found again by its kid. make-edhoc-credential draws a P-256 static DH key
and writes PREFIX.key (the scalar, hex, mode 0600) and PREFIX.ccs (the CCS, hex): for the JRC
([cojp] edhoc_private_key/edhoc_credential) or for a pledge. A running registrar sees a change
at the pledge's next request. Exit codes: 0 done, 1 store or state error, 2 usage, 78 bad
configuration.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from brski import edhoc_oscore

from .cojp_config import parse_hex_id
from .cojp_store import CojpStore, CojpStoreError
from .config import load_registrar_config
from .store import Store, StoreError
from .tomlconfig import ConfigError

MIN_PSK = 16  # bytes: RFC 9031 §8.3 asks for at least 128 bits of entropy
MAX_PSK = 64
MAX_ID = 32
PROG = "brski-registrar cojp"


def _id(text: str) -> bytes:
    try:
        value = parse_hex_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"pledge ID {exc}") from None
    if len(value) > MAX_ID:
        raise argparse.ArgumentTypeError(f"pledge ID of {len(value)} bytes: at most {MAX_ID}")
    return value


def _psk(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"PSK is not hex ({exc})") from None
    if not MIN_PSK <= len(value) <= MAX_PSK:
        raise argparse.ArgumentTypeError(f"PSK of {len(value)} bytes: give {MIN_PSK} to "
                                         f"{MAX_PSK} random bytes")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=PROG, description="the CoJP JRC's pledges and PSKs")
    commands = top.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        where = sub.add_mutually_exclusive_group(required=True)
        where.add_argument("--config", "-c", type=Path, help="the registrar's TOML configuration")
        where.add_argument("--store", help="the registrar's store: an SQLite file or a "
                                              "postgresql:// URL")

    add = commands.add_parser("add-pledge", help="add a pledge with its PSK")
    common(add)
    add.add_argument("--id", required=True, type=_id, help="pledge ID (hex, e.g. the EUI-64)")
    add.add_argument("--edhoc-credential", type=Path, metavar="FILE",
                     help="the pledge's EDHOC credential (a CCS, hex)")
    psk = add.add_mutually_exclusive_group()
    psk.add_argument("--psk", type=_psk, help="the PSK, hex (16 to 64 bytes)")
    psk.add_argument("--generate-psk", action="store_true",
                     help="draw a random 16-byte PSK and print it")
    add.add_argument("--replace", action="store_true",
                     help="recommission a known pledge with a new PSK (resets its counters)")
    remove = commands.add_parser("remove-pledge", help="forget a pledge")
    common(remove)
    remove.add_argument("--id", required=True, type=_id, help="pledge ID (hex)")
    listing = commands.add_parser("list", help="pledges, short IDs and joins")
    common(listing)
    make = commands.add_parser("make-edhoc-credential",
                               help="a P-256 EDHOC key and its CCS, as hex files")
    make.add_argument("--out", required=True, type=Path, metavar="PREFIX",
                      help="writes PREFIX.key and PREFIX.ccs")
    make.add_argument("--kid", required=True, type=_id, help="the credential's kid (hex)")
    make.add_argument("--subject", default="", help="the CCS subject (claim 2)")
    return top


def _make_credential(args: argparse.Namespace) -> int:
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    cred = edhoc_oscore.ccs(args.subject, args.kid, numbers.x.to_bytes(32, "big"),
                            numbers.y.to_bytes(32, "big"))
    key_path = args.out.with_name(args.out.name + ".key")
    cred_path = args.out.with_name(args.out.name + ".ccs")
    try:
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(scalar.hex() + "\n")
        cred_path.write_text(cred.hex() + "\n")
    except OSError as exc:
        print(f"{PROG}: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{key_path} and {cred_path} written (kid {args.kid.hex()})")
    return 0


def _read_credential(path: Path) -> tuple[bytes, bytes]:
    """(kid, CCS) from a hex file; ValueError with the reason."""
    import lakers  # the EDHOC library parses the CCS, as the JRC will

    try:
        cred = bytes.fromhex(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not hex ({exc})") from None
    try:
        kid = lakers.Credential(cred).kid()
    except Exception as exc:  # lakers raises ValueError/TypeError for bad CBOR
        raise ValueError(f"{path}: not a CCS credential ({exc})") from None
    if not kid:
        raise ValueError(f"{path}: the credential has no kid")
    return bytes(kid), cred


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command == "make-edhoc-credential":
        return _make_credential(args)
    edhoc: tuple[bytes, bytes] | None = None
    if args.command == "add-pledge":
        if args.psk is None and not args.generate_psk and args.edhoc_credential is None:
            print(f"{PROG}: add-pledge needs --psk, --generate-psk or --edhoc-credential",
                  file=sys.stderr)
            return 2
        if args.edhoc_credential is not None:
            try:
                edhoc = _read_credential(args.edhoc_credential)
            except ValueError as exc:
                print(f"{PROG}: {exc}", file=sys.stderr)
                return 2
    try:
        path = args.store if args.store else load_registrar_config(args.config).store_path
    except ConfigError as exc:
        print(f"{PROG}: {args.config}: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    try:
        with Store(path, "registrar") as store:
            pledges = CojpStore(store)
            if args.command == "add-pledge":
                psk = secrets.token_bytes(MIN_PSK) if args.generate_psk else args.psk
                pledge = pledges.add_pledge(
                    args.id, psk, replace=args.replace,
                    edhoc_kid=edhoc[0] if edhoc else None,
                    edhoc_credential=edhoc[1] if edhoc else None)
                print(f"pledge {pledge.pledge_id.hex()} added, short ID {pledge.short_id:#06x}"
                      + (f", EDHOC kid {edhoc[0].hex()}" if edhoc else ""))
                if args.generate_psk:
                    print(f"psk {psk.hex()}")
            elif args.command == "remove-pledge":
                if not pledges.remove_pledge(args.id):
                    print(f"{PROG}: pledge {args.id.hex()} is not known", file=sys.stderr)
                    return 1
                print(f"pledge {args.id.hex()} removed")
            else:
                for p in pledges.pledges():
                    keys = "+".join(k for k, v in (("psk", p.psk), ("edhoc", p.edhoc_kid)) if v)
                    print(f"{p.pledge_id.hex()} short-id {p.short_id:#06x} joins {p.joins} "
                          f"last-join {p.last_join or '-'} keys {keys} added {p.added_at}")
    except (StoreError, CojpStoreError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0
