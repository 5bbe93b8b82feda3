"""``brski-sztp``: the SZTP bootstrap server (RFC 8572), its records, and a call-home manager.

    brski-sztp --config sztp.toml [--check-config] [--metrics ADDRESS]     # the service
    brski-sztp record add --config sztp.toml (--serial S | --model M | --default)
                          --conveyed FILE [--sign auto|always|never] [--verbose-reports]
    brski-sztp record remove --config sztp.toml (--serial S | --model M | --default)
    brski-sztp record list --config sztp.toml
    brski-sztp progress --config sztp.toml [--serial S] [--json]
    brski-sztp manager --listen "[::]:4336" --ca manufacturer-ca.crt [--cert C --key K]
                       [--expect SERIAL ...] [--count N] [--resource PATH]

``--conveyed`` is an RFC 8572 conveyed-information document (JSON, §6.2 top level
``ietf-sztp-conveyed-info:redirect-information`` or ``:onboarding-information``), checked
before it is stored. Exit codes: 0 done, 1 store or state error, 2 usage, 3 cannot listen,
78 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from pathlib import Path

from brski import sztp

from . import service
from .masa_client import MasaClient
from .metrics import ServiceMetrics
from .store import Store, StoreError
from .sztp_callhome import client_context, load_anchors
from .sztp_callhome import serve as serve_manager
from .sztp_config import SztpConfig, load_sztp_config
from .sztp_server import SztpServer
from .sztp_store import SztpStore, SztpStoreError
from .tomlconfig import ConfigError, parse_host_port
from .web import serve as serve_web
from .web import server_ssl_context

PROG = "brski-sztp"
DESCRIPTION = "SZTP (RFC 8572) bootstrap server: RESTCONF over HTTPS with IDevID clients"
log = logging.getLogger(PROG)


async def run(config: SztpConfig, metrics: ServiceMetrics) -> None:
    reg = config.registrar
    with Store(config.store_path, "registrar") as store:
        records = SztpStore(store)
        masa = None if config.redirect_only else MasaClient(reg)
        if masa is not None:
            await masa.start()
        server = SztpServer(config, records, masa, metrics)
        ctx = server_ssl_context(reg.cert_file, reg.key_file, client_cas=reg.manufacturer_cas,
                                 client_cert=ssl.CERT_REQUIRED,
                                 min_version=reg.tls_min_version)
        try:
            await serve_web(server.app(), config.listen, ctx, "sztp", metrics=metrics)
        finally:
            if masa is not None:
                await masa.close()


def _store(config_path: Path) -> tuple[Store, SztpStore]:
    config = load_sztp_config(config_path)
    store = Store(config.store_path, "registrar")
    return store, SztpStore(store)


def _key(args: argparse.Namespace) -> tuple[str, str]:
    if args.default:
        return "default", ""
    return ("serial", args.serial) if args.serial else ("model", args.model)


def _record_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="the device's serial number (IDevID serialNumber)")
    which.add_argument("--model", help="every device sending this hw-model")
    which.add_argument("--default", action="store_true", help="every other device")


def _tools(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="bootstrapping records")
    rsub = rec.add_subparsers(dest="action", required=True)
    add = rsub.add_parser("add", help="add or replace a record")
    _record_args(add)
    add.add_argument("--conveyed", type=Path, required=True,
                     help="RFC 8572 conveyed-information JSON")
    add.add_argument("--sign", choices=("auto", "always", "never"), default="auto")
    add.add_argument("--verbose-reports", action="store_true",
                     help="reporting-level verbose (every progress step)")
    rm = rsub.add_parser("remove", help="remove a record")
    _record_args(rm)
    ls = rsub.add_parser("list", help="list the records")
    ls.add_argument("--config", "-c", type=Path, required=True)
    pr = sub.add_parser("progress", help="the devices' progress reports")
    pr.add_argument("--config", "-c", type=Path, required=True)
    pr.add_argument("--serial")
    pr.add_argument("--json", action="store_true")
    mg = sub.add_parser("manager", help="RFC 8071 call-home listener (tests and demos)")
    mg.add_argument("--listen", default=f"[::]:{sztp.CALL_HOME_RESTCONF_TLS}")
    mg.add_argument("--ca", type=Path, action="append", required=True,
                    help="device trust anchor (manufacturer CA), repeatable")
    mg.add_argument("--cert", type=Path, help="the manager's certificate chain (PEM)")
    mg.add_argument("--key", type=Path)
    mg.add_argument("--expect", action="append", default=[], help="accepted serial numbers")
    mg.add_argument("--count", type=int, default=0, help="stop after N successful call homes")
    mg.add_argument("--resource", default="/restconf/data/ietf-system:system-state/platform")
    args = parser.parse_args(argv)
    try:
        if args.command == "manager":
            host, port = parse_host_port(args.listen)
            ctx = client_context(args.cert, args.key)
            serve_manager(host, port, ctx, load_anchors(args.ca), expect=args.expect,
                          count=args.count,
                          resource=args.resource,
                          ready=lambda: print(f"{PROG} manager: listening on {args.listen}",
                                              file=sys.stderr, flush=True))
            return 0
        store, records = _store(args.config)
        with store:
            if args.command == "progress":
                rows = records.progress(args.serial)
                for row in rows:
                    if args.json:
                        print(json.dumps(row.__dict__))
                    else:
                        print(f"{row.at}  {row.serial:<16} {row.progress_type:<30} "
                              f"{row.message or ''}")
                return 0
            if args.action == "list":
                for r in records.records():
                    print(f"{r.kind:<8} {r.key or '-':<20} {r.information.TOP:<24} "
                          f"sign={r.sign} reporting={r.reporting_level}")
                return 0
            kind, key = _key(args)
            if args.action == "remove":
                if not records.remove_record(kind, key):
                    print(f"{PROG}: no {kind} record {key!r}", file=sys.stderr)
                    return 1
                return 0
            try:
                data = args.conveyed.read_bytes()
            except OSError as exc:
                print(f"{PROG}: {args.conveyed}: {exc.strerror}", file=sys.stderr)
                return 1
            records.put_record(kind, key, data, sign=args.sign,
                               reporting_level="verbose" if args.verbose_reports else "minimal")
            return 0
    except ConfigError as exc:
        print(f"{PROG}: {args.config}: {exc}", file=sys.stderr)
        return service.EXIT_CONFIG
    except (StoreError, SztpStoreError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a bad --listen
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["record"], ["progress"], ["manager"]):
        return _tools(argv)
    return service.main(PROG, DESCRIPTION, load_sztp_config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
