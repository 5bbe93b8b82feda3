"""``brski-registrar cojp ...``: the operator's commands for the JRC's pledges and their PSKs.

    brski-registrar cojp add-pledge (--config FILE | --store FILE) --id HEX
                                    (--psk HEX | --generate-psk) [--replace]
    brski-registrar cojp remove-pledge (--config FILE | --store FILE) --id HEX
    brski-registrar cojp list (--config FILE | --store FILE)

The pledge identifier (typically the EUI-64, e.g. 00-12-4b-00-14-b5-d9-e2) is the OSCORE ID
context; the PSK is the OSCORE master secret, at least 16 random bytes (RFC 9031 §8.3: never
derived from the identifier). --generate-psk draws one and prints it once, for provisioning the
pledge. A running registrar sees the change at the pledge's next request. Exit codes: 0 done,
1 store or state error, 2 usage, 78 bad configuration.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

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
        where.add_argument("--store", type=Path, help="the registrar's store file")

    add = commands.add_parser("add-pledge", help="add a pledge with its PSK")
    common(add)
    add.add_argument("--id", required=True, type=_id, help="pledge ID (hex, e.g. the EUI-64)")
    psk = add.add_mutually_exclusive_group(required=True)
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
    return top


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
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
                pledge = pledges.add_pledge(args.id, psk, replace=args.replace)
                print(f"pledge {pledge.pledge_id.hex()} added, short ID {pledge.short_id:#06x}")
                if args.generate_psk:
                    print(f"psk {psk.hex()}")
            elif args.command == "remove-pledge":
                if not pledges.remove_pledge(args.id):
                    print(f"{PROG}: pledge {args.id.hex()} is not known", file=sys.stderr)
                    return 1
                print(f"pledge {args.id.hex()} removed")
            else:
                for p in pledges.pledges():
                    print(f"{p.pledge_id.hex()} short-id {p.short_id:#06x} joins {p.joins} "
                          f"last-join {p.last_join or '-'} added {p.added_at}")
    except (StoreError, CojpStoreError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0
