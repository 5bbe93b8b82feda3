"""brski-registrar: run the registrar (see ``registrar.config`` for the configuration keys).

    brski-registrar --config registrar.toml [--check-config] [--ipip]
    brski-registrar store export|import|check ...   (registrar.store_transfer)

``--ipip`` turns on the termination of the stateless IPIP join proxy (``[ipip]`` in the
configuration, documented in ``registrar.ipip_config``; the protocol in ``registrar.ipip``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import logging
import sys

from . import service
from .announce import Announcer
from .app import make_app, tls_context
from .coaps import CoapsRegistrar
from .cojp_jrc import CojpJrc
from .config import RegistrarConfig, load_registrar_config
from .context import Registrar
from .domain_ca import DomainCA
from .ipip import IpipService
from .masa_client import MasaClient
from .metrics import ServiceMetrics
from .store import Store
from .store_commit import GroupCommitter
from .web import serve

DESCRIPTION = ("BRSKI registrar with EST and a domain CA. --ipip: also terminate the stateless "
               "IPIP join proxy (the [ipip] configuration table)")


async def run(config: RegistrarConfig, metrics: ServiceMetrics) -> None:
    # Resolved first: a missing [ipip] link_local is a configuration error (exit 1).
    ipip = IpipService.from_config(config) if config.ipip.enabled else None
    with Store(config.store_path, "registrar") as store:
        ca = DomainCA(config.ca_cert, config.ca_key,
                      validity=datetime.timedelta(days=config.ldevid_days),
                      subject_policy=config.ldevid_subject)
        masa = MasaClient(config)
        await masa.start()
        announcer = Announcer(config, ipip_link_local=ipip.link_local if ipip else None,
                              refused=metrics.refused)
        # The request handlers' writes: one durable commit for several requests, made by a
        # thread of its own on a store connection of its own (registrar.store_commit).
        committer = GroupCommitter(config.store_path, "registrar")
        registrar = Registrar(config, store, masa, ca, committer)
        coaps = (CoapsRegistrar(registrar, metrics)
                 if config.coaps_listen or config.jpy_listen else None)
        jrc = CojpJrc(config.cojp, store, metrics) if config.cojp.enabled else None

        async def started() -> None:
            # Tunnels before announcements: a proxy that hears the flood can use them at once.
            if ipip is not None:
                await ipip.start()
            if coaps is not None and config.coaps_listen is not None:
                try:
                    endpoint = await coaps.start(config.coaps_listen)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen for CoAPS on "
                                             f"[{config.coaps_listen[0]}]:"
                                             f"{config.coaps_listen[1]}: {exc.strerror}") from exc
                host, port = endpoint.local_address[:2]
                logging.getLogger("registrar.coaps").info(
                    "CoAPS (cBRSKI, EST-coaps) on udp [%s]:%d", host, port)
            if coaps is not None and config.jpy_listen is not None:
                try:
                    endpoint = await coaps.start_jpy(config.jpy_listen)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen for JPY on "
                                             f"[{config.jpy_listen[0]}]:"
                                             f"{config.jpy_listen[1]}: {exc.strerror}") from exc
                host, port = endpoint.local_address[:2]
                logging.getLogger("registrar.jpy").info(
                    "JPY (CoAPS behind stateless join proxies) on udp [%s]:%d", host, port)
            if jrc is not None:
                try:
                    host, port = await jrc.start()
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen for CoJP on [{config.cojp.listen[0]}]"
                                             f":{config.cojp.listen[1]}: {exc.strerror}") from exc
                logging.getLogger("registrar.cojp").info(
                    "CoJP JRC (RFC 9031, OSCORE) on udp [%s]:%d", host, port)
                announcer.cojp_port = port  # flooded under "6TiSCH-JRC" (announce.py)
            await announcer.start()

        lag = asyncio.create_task(metrics.watch_loop())
        try:
            await serve(make_app(registrar), config.listen,
                        tls_context(config), "registrar", on_started=started, metrics=metrics)
        finally:
            lag.cancel()
            await announcer.stop()
            if jrc is not None:
                await jrc.stop()
            if coaps is not None:
                await coaps.stop()
            # After the listeners closed: connections on the TUN devices got their last
            # segments out through them.
            if ipip is not None:
                await ipip.stop()
            await masa.close()
            committer.close()


def ipip_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ipip", action="store_true",
                        help="also terminate the stateless IPIP join proxy ([ipip] in the "
                             "configuration)")


def main(argv: list[str] | None = None) -> int:
    # --ipip is the registrar's own switch: the shared service parser shows it in the usage
    # (ipip_option); its value is needed before, to load the configuration with it.
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cojp"]:  # the operator's commands for the JRC's pledges (registrar.cojp_cli)
        from .cojp_cli import main as cojp_main
        return cojp_main(argv[1:])
    if argv[:1] == ["store"]:  # export/import/check the store (registrar.store_transfer)
        from .store_transfer import main as store_main
        return store_main(argv[1:], "registrar", load_registrar_config)
    pre = argparse.ArgumentParser(add_help=False)
    ipip_option(pre)
    known, _ = pre.parse_known_args(argv)
    load = functools.partial(load_registrar_config, ipip=known.ipip)
    return service.main("brski-registrar", DESCRIPTION, load, run, argv, ipip_option)


if __name__ == "__main__":
    sys.exit(main())
