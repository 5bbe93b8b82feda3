"""pledge-sim: simulated BRSKI pledges (RFC 8995) that discover a proxy and enroll.

    pledge-sim enroll --pki DIR [--serial S ... | --count N] [--concurrency C] [--json]
    pledge-sim enroll --idevid CERT --key KEY --masa-ca FILE [--registrar ADDR]
    pledge-sim enroll --idevid-dir DIR --masa-ca FILE [--count N]
    pledge-sim enroll --transport coaps --pki DIR [--count N] [--block-size B]
                      [--core-query brski-jp|rt | --registrar [fe80::1%eth0]:5684]
    pledge-sim discover [--methods grasp,mdns] [--timeout S] [--json]
    pledge-sim cojp --jrc ADDR --pledges FILE [--count N] [--concurrency C] [--via-proxy]
                    [--edhoc-dir DIR --jrc-credential FILE]
    pledge-sim sztp --pki DIR [--serial S ...] [--trusted-server URI --server-ca FILE]
                    [--server URI] [--dhcpv6 IFACE] [--media DIR] [--state DIR] [--json]

Without --registrar, pledges listen for GRASP AN_Proxy floods and browse mDNS for
_brski-proxy._tcp; with --transport coaps (cBRSKI over DTLS) they ask CoRE discovery on each
link (ff02::fd, ?brski-jp=*), answered by a join proxy (joinproxyd in coaps or jpy mode) or
a registrar there; --registrar names a proxy's join port (or a registrar) directly. LDevIDs
go to --out as <serial>.crt/.key. Exit status: 0 when every pledge enrolled, 1 when one
failed (reasons follow the table), 2 for bad arguments or files. sztp runs SZTP devices
(RFC 8572, pledge_sim.sztp) that end with an RFC 8071 call home.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from brski import __version__
from brski.cli import quiet

from .coaps_options import BLOCK_SIZES, QUERIES
from .discovery import METHODS, Candidate, DiscoveryError, discover, parse_address
from .fleet import Runner, enroll_all
from .identity import (
    IdentityError,
    PledgeIdentity,
    identities_from_dir,
    identities_from_pki,
    load_anchors,
    load_identity,
    masa_anchor_path,
    masa_signer_path,
)
from .report import table, to_json
from .runner import PledgeRunner, Settings

PROG = "pledge-sim"


class UsageProblem(Exception):
    """Arguments that cannot work together; reported in one line, exit 2."""


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(METHODS)}")
    return methods


def _positive(kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if value <= 0:
            raise argparse.ArgumentTypeError("must be greater than 0")
        return value
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v progress, -vv debug")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("enroll", help="run pledges through BRSKI and EST")
    who = e.add_argument_group("identities (one source)")
    who.add_argument("--pki", type=Path, help="a brski-pki directory: pick or issue IDevIDs")
    who.add_argument("--serial", action="append", default=[],
                     help="with --pki: this serial (repeatable; issued if missing)")
    who.add_argument("--idevid", type=Path, help="one IDevID certificate (PEM)")
    who.add_argument("--key", type=Path, help="its private key (PEM)")
    who.add_argument("--idevid-dir", type=Path, help="a directory of NAME.crt/NAME.key pairs")
    who.add_argument("--count", type=_positive(int),
                     help="number of pledges (--pki issues more IDevIDs if needed)")
    e.add_argument("--masa-ca", type=Path,
                   help="MASA trust anchor(s), PEM (default with --pki: DIR/masa/ca.crt)")
    e.add_argument("--masa-signer", type=Path,
                   help="coaps: MASA voucher-signing certificate(s), PEM, to verify COSE "
                        "vouchers without x5bag (default with --pki: DIR/masa/signer.crt)")
    e.add_argument("--transport", choices=("https", "coaps"), default="https",
                   help="https: BRSKI + EST (default); coaps: cBRSKI + EST-coaps over DTLS")
    e.add_argument("--block-size", type=int, choices=BLOCK_SIZES, metavar="BYTES",
                   help="coaps: largest CoAP block (Block1/Block2), 16..1024 (default: "
                        "what the DTLS record allows)")
    e.add_argument("--fetch-crts", action="store_true",
                   help="coaps: GET /crts even when the pinned domain CA signed the LDevID")
    e.add_argument("--registrar", action="append", default=[], metavar="ADDR",
                   help="skip discovery: [fe80::b:2%%eth0]:8443 (repeatable)")
    e.add_argument("--discover", type=_methods, metavar="METHODS",
                   help="discovery methods, comma-separated (default: grasp,mdns; "
                        "coaps pledges use CoRE discovery)")
    e.add_argument("--discovery-timeout", type=_positive(float), default=15.0, metavar="S")
    e.add_argument("--core-query", choices=tuple(QUERIES),
                   help="coaps: the CoRE discovery query, brski-jp (?brski-jp=*, default) or "
                        "rt (?rt=brski.jp, as pledges of older drafts ask)")
    e.add_argument("--concurrency", type=_positive(int), default=10)
    e.add_argument("--out", type=Path, default=Path("pledge-sim-out"),
                   help="where LDevIDs are written: SERIAL.crt, SERIAL.key (mode 0600), "
                        "SERIAL-chain.pem and cacerts.pem (default: ./pledge-sim-out); an "
                        "HTTPS pledge whose LDevID cannot be written there fails "
                        "(ldevid-files)")
    e.add_argument("--deadline", type=_positive(float), default=180.0, metavar="S",
                   help="give a pledge up after this many seconds (default 180)")
    e.add_argument("--max-backoff", type=_positive(float), default=30.0, metavar="S",
                   help="cap of the retry backoff (RFC 8995 allows 3600; default 30)")
    e.add_argument("--request-timeout", type=_positive(float), default=30.0, metavar="S")
    e.add_argument("--trusted-clock", action="store_true",
                   help="check times (expires-on, validity) against this host's clock")
    e.add_argument("--accept-nonceless", action="store_true",
                   help="accept vouchers without a nonce (RFC 8995 §7.2 reduced security)")
    e.add_argument("--reconnect-after-voucher", action="store_true",
                   help="open a new TLS connection verified against pinned-domain-cert after "
                        "the voucher, instead of authenticating and keeping the provisional "
                        "one (RFC 8995 §5.6.2; HTTPS only)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    d = sub.add_parser("discover", help="listen for proxies and print what is found")
    d.add_argument("--methods", type=_methods, default=list(METHODS))
    d.add_argument("--timeout", type=_positive(float), default=10.0)
    d.add_argument("--json", action="store_true")

    c = sub.add_parser("cojp", help="6TiSCH pledges: CoJP join over OSCORE with a PSK "
                                    "(RFC 9031)")
    c.add_argument("--jrc", required=True, metavar="ADDR",
                   help='where the Join Request goes: the JRC, or with --via-proxy a join '
                        'proxy, "[addr%%iface]:port"')
    c.add_argument("--via-proxy", action="store_true",
                   help="add Proxy-Scheme coap and Uri-Host 6tisch.arpa (RFC 9031 §8.1)")
    c.add_argument("--pledges", required=True, type=Path,
                   help="'PLEDGE_ID PSK' (hex, the PSK given to brski-registrar cojp "
                        "add-pledge) or 'PLEDGE_ID edhoc' per line")
    c.add_argument("--edhoc-dir", type=Path, metavar="DIR",
                   help="EDHOC pledges' keys: DIR/<pledge ID>.key and .ccs (default: the "
                        "pledges file's directory)")
    c.add_argument("--jrc-credential", type=Path, metavar="FILE",
                   help="the JRC's EDHOC credential (CCS, hex): needed by EDHOC pledges")
    c.add_argument("--count", type=_positive(int), help="the first N pledges of the file")
    c.add_argument("--concurrency", type=_positive(int), default=10)
    c.add_argument("--network-id", default="cafe", metavar="HEX",
                   help="the network identifier sent in the Join Request (default cafe)")
    c.add_argument("--state", type=Path, default=Path("pledge-sim-cojp"),
                   help="per-pledge OSCORE contexts; sequence numbers carry on across runs")
    c.add_argument("--timeout", type=_positive(float), default=30.0, metavar="S",
                   help="per join, CoAP retransmissions included")
    c.add_argument("--json", action="store_true", help="print JSON instead of a table")

    z = sub.add_parser("sztp", help="SZTP devices (RFC 8572) ending in an RFC 8071 call home")
    zwho = z.add_argument_group("identities (one source)")
    zwho.add_argument("--pki", type=Path, help="a brski-pki directory: pick or issue IDevIDs")
    zwho.add_argument("--serial", action="append", default=[],
                      help="with --pki: this serial (repeatable; issued if missing)")
    zwho.add_argument("--idevid", type=Path, help="one IDevID certificate (PEM)")
    zwho.add_argument("--key", type=Path, help="its private key (PEM)")
    zwho.add_argument("--idevid-dir", type=Path, help="a directory of NAME.crt/NAME.key pairs")
    zwho.add_argument("--count", type=_positive(int), help="number of devices")
    z.add_argument("--masa-ca", type=Path,
                   help="MASA trust anchor(s), PEM (default with --pki: DIR/masa/ca.crt)")
    z.add_argument("--server", action="append", default=[], metavar="URI",
                   help="a preconfigured bootstrap server without trust anchor (untrusted: "
                        "signed data only), https://[fe80::1%%eth0]:8443 (repeatable)")
    z.add_argument("--trusted-server", action="append", default=[], metavar="URI",
                   help="a preconfigured bootstrap server authenticated by --server-ca "
                        "(tried before the --server ones)")
    z.add_argument("--server-ca", type=Path, metavar="FILE",
                   help="trust anchor(s) (PEM) of the --trusted-server servers")
    z.add_argument("--dhcpv6", metavar="IFACE",
                   help="ask DHCPv6 on IFACE for option 136 (bootstrap server URIs)")
    z.add_argument("--media", type=Path, metavar="DIR",
                   help="removable media: DIR/conveyed-information.cms, owner-certificate.cms, "
                        "ownership-voucher.cms")
    z.add_argument("--state", type=Path, default=Path("pledge-sim-sztp"),
                   help="per-device state: running OS, boot image, config.json, script output")
    z.add_argument("--hw-model", default="pledge-sim")
    z.add_argument("--os-name", default="SimOS")
    z.add_argument("--os-version", default="1.0")
    z.add_argument("--encoding", choices=("json", "xml"), default="json",
                   help="RESTCONF encoding (application/yang-data+json or +xml)")
    z.add_argument("--timeout", type=_positive(float), default=20.0, metavar="S")
    z.add_argument("--concurrency", type=_positive(int), default=10)
    z.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _identities(args: argparse.Namespace) -> list[PledgeIdentity]:
    sources = [s for s in (args.pki, args.idevid, args.idevid_dir) if s is not None]
    if len(sources) != 1:
        raise UsageProblem("give exactly one of --pki, --idevid (with --key), --idevid-dir")
    if args.serial and args.pki is None:
        raise UsageProblem("--serial needs --pki")
    if args.serial and args.count:
        raise UsageProblem("--serial and --count exclude each other")
    if args.pki is not None:
        return identities_from_pki(args.pki, serials=args.serial, count=args.count)
    if args.idevid is not None:
        if args.key is None:
            raise UsageProblem("--idevid needs --key")
        if args.count not in (None, 1):
            raise UsageProblem("--idevid is one pledge; use --pki or --idevid-dir for more")
        return [load_identity(args.idevid, args.key)]
    found = identities_from_dir(args.idevid_dir)
    if args.count is not None:
        if args.count > len(found):
            raise UsageProblem(f"{args.idevid_dir} has {len(found)} IDevIDs, "
                               f"--count asks for {args.count}")
        found = found[: args.count]
    return found


def _anchor_path(args: argparse.Namespace) -> Path:
    if args.masa_ca is not None:
        return args.masa_ca
    if args.pki is not None:
        return masa_anchor_path(args.pki)
    raise UsageProblem("--masa-ca is needed (the MASA trust anchor the manufacturer installed)")


def _masa_signers(args: argparse.Namespace) -> list[x509.Certificate]:
    if args.transport != "coaps":
        return []
    path = args.masa_signer
    if path is None and args.pki is not None and masa_signer_path(args.pki).exists():
        path = masa_signer_path(args.pki)
    # None: only a MASA that signs with its anchor's own key can be verified.
    return load_anchors(path, "MASA signer") if path is not None else []


async def _candidates(args: argparse.Namespace) -> list[Candidate]:
    if args.registrar:
        return [parse_address(a) for a in args.registrar]
    if args.transport == "coaps":
        from .coap_discover import discover_join_proxies

        return await discover_join_proxies(args.discovery_timeout,
                                           QUERIES[args.core_query or "brski-jp"])
    methods = args.discover or list(METHODS)
    found = await discover(methods, args.discovery_timeout)
    if not found.candidates:
        raise DiscoveryError(f"no proxy found by {', '.join(methods)} within "
                             f"{args.discovery_timeout:g} s (or give --registrar ADDR)")
    return found.candidates


async def _enroll(args: argparse.Namespace) -> int:
    for given, option in ((args.block_size is not None, "--block-size"),
                          (args.fetch_crts, "--fetch-crts"), (args.masa_signer, "--masa-signer"),
                          (args.core_query is not None, "--core-query")):
        if given and args.transport != "coaps":
            raise UsageProblem(f"{option} is for --transport coaps")
    if args.discover and args.transport == "coaps":
        raise UsageProblem("--discover is for https; coaps pledges use CoRE discovery")
    if args.core_query and args.registrar:
        raise UsageProblem("--core-query is for CoRE discovery, which --registrar skips")
    identities = _identities(args)
    anchors = load_anchors(_anchor_path(args))
    if not anchors:
        raise UsageProblem("the MASA trust anchor file holds no certificate")
    runner: Runner = PledgeRunner
    block_szx = None
    if args.transport == "coaps":  # aiocoap and the DTLS stack only for CoAPS runs
        from .coaps_runner import CoapsPledgeRunner
        from .coaps_runner import block_szx as szx_of

        runner = CoapsPledgeRunner
        block_szx = None if args.block_size is None else szx_of(args.block_size)
    settings = Settings(anchors=anchors, out_dir=args.out, deadline=args.deadline,
                        request_timeout=args.request_timeout,
                        backoff_cap=args.max_backoff, trusted_clock=args.trusted_clock,
                        accept_nonceless=args.accept_nonceless,
                        keep_connection=not args.reconnect_after_voucher,
                        masa_signers=_masa_signers(args),
                        block_szx=block_szx, fetch_crts=args.fetch_crts)
    if args.transport == "coaps":
        bad = [i.serial for i in identities if not isinstance(i.key, ec.EllipticCurvePrivateKey)]
        if bad:
            raise UsageProblem(f"{bad[0]}: --transport coaps needs an EC IDevID key")
    started = time.monotonic()
    candidates = await _candidates(args)
    results = await enroll_all(identities, candidates, settings, args.concurrency, runner)
    elapsed = time.monotonic() - started
    print(to_json(results, elapsed) if args.json else table(results, elapsed), flush=True)
    failed = [r for r in results if not r.ok]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        print(f"{PROG}: {first.serial} failed: {first.reason}{more}", file=sys.stderr)
        return 1
    return 0


async def _cojp(args: argparse.Namespace) -> int:
    from . import cojp  # aiocoap's OSCORE only when asked for

    try:
        pledges = cojp.read_pledges(args.pledges)
        network_id = bytes.fromhex(args.network_id)
    except OSError as exc:
        raise UsageProblem(f"{args.pledges}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    if args.count is not None:
        if args.count > len(pledges):
            raise UsageProblem(f"--count {args.count}: {args.pledges} lists {len(pledges)}")
        pledges = pledges[:args.count]
    if not pledges:
        raise UsageProblem(f"{args.pledges}: no pledges")
    edhoc = None
    if any(psk is None for _, psk in pledges):
        if args.jrc_credential is None:
            raise UsageProblem(f"{args.pledges} lists EDHOC pledges: give --jrc-credential")
        try:
            jrc_credential = bytes.fromhex(args.jrc_credential.read_text())
        except OSError as exc:
            raise UsageProblem(f"{args.jrc_credential}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageProblem(f"{args.jrc_credential}: not hex ({exc})") from None
        edhoc = cojp.EdhocKeys(args.edhoc_dir or args.pledges.parent, jrc_credential)
    started = time.monotonic()
    outcomes = await cojp.join_all(pledges, args.state, args.jrc, network_id,
                                   via_proxy=args.via_proxy, concurrency=args.concurrency,
                                   timeout=args.timeout, edhoc=edhoc)
    elapsed = time.monotonic() - started
    if args.json:
        ok = sum(o.ok for o in outcomes)
        print(json.dumps({"joined": ok, "failed": len(outcomes) - ok,
                          "seconds": round(elapsed, 3),
                          "results": [o.to_json() for o in outcomes]}, indent=2))
    else:
        print(cojp.report(outcomes, elapsed), flush=True)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        print(f"{PROG}: {failed[0].pledge_id.hex()} failed: {failed[0].reason}{more}",
              file=sys.stderr)
        return 1
    return 0


async def _sztp(args: argparse.Namespace) -> int:
    from brski import sztp as wire
    from brski.errors import DecodeError

    from . import sztp

    identities = _identities(args)
    anchors = load_anchors(_anchor_path(args))
    servers: list[sztp.Server] = []
    if args.trusted_server and args.server_ca is None:
        raise UsageProblem("--trusted-server needs --server-ca")
    server_anchors = tuple(load_anchors(args.server_ca, "server trust anchors")) \
        if args.server_ca else ()
    for uri, tas in [*((u, server_anchors) for u in args.trusted_server),
                     *((u, ()) for u in args.server)]:
        try:
            entry = wire.uri_server(uri)
        except DecodeError as exc:
            raise UsageProblem(f"--server: {exc}") from exc
        servers.append(sztp.Server(entry.address, entry.port, tas))
    if not (servers or args.dhcpv6 or args.media):
        raise UsageProblem("no bootstrap source: give --server, --trusted-server, --dhcpv6 or "
                           "--media")
    settings = sztp.Settings(anchors, servers, args.media, args.dhcpv6, args.state,
                             args.hw_model, args.os_name, args.os_version, args.encoding,
                             args.timeout, args.timeout)
    outcomes = await sztp.run_devices(identities, settings, args.concurrency)
    if args.json:
        print(json.dumps({"devices": [o.to_json() for o in outcomes]}, indent=1), flush=True)
    else:
        for o in outcomes:
            home = (o.callhome or {}).get("manager", "-")
            print(f"{o.serial:<16} {'ok' if o.ok else 'FAILED':<7} {o.code:<22} "
                  f"signed={'yes' if o.signed else 'no':<4} call-home={home}  {o.reason}")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        print(f"{PROG}: {failed[0].serial} failed: {failed[0].code}: {failed[0].reason}{more}",
              file=sys.stderr)
        return 1
    return 0


async def _discover(args: argparse.Namespace) -> int:
    found = await discover(args.methods, args.timeout)
    if args.json:
        print(json.dumps({"candidates": [c.__dict__ for c in found.candidates],
                          "dropped": found.dropped}, indent=2))
    else:
        for c in found.candidates:
            print(f"{c.label}  {c.method}")
    if not found.candidates:
        print(f"{PROG}: nothing found within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s")
    # -vv is about the pledge's steps: libraries only warn, unless BRSKI_DEBUG_LIBRARIES
    # names them (pyroute2, zeroconf, asyncio, aiocoap...)
    quiet.hold(logging.getLogger().handlers,
               quiet.wanted_loud(os.environ.get("BRSKI_DEBUG_LIBRARIES", "")))
    if args.verbose < 2:
        # The DTLS endpoint logs a refused handshake as a drop; the pledge's own report says
        # it (one line), so that line only shows with -vv.
        logging.getLogger("coaps_io").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        commands = {"enroll": _enroll, "discover": _discover, "cojp": _cojp, "sztp": _sztp}
        return asyncio.run(commands[args.command](args))
    except (UsageProblem, IdentityError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except DiscoveryError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
