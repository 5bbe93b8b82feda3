"""brski-registrar: run the registrar (see ``registrar.config`` for the configuration keys)."""

from __future__ import annotations

import datetime
import sys

from . import service
from .announce import Announcer
from .app import make_app, tls_context
from .config import RegistrarConfig, load_registrar_config
from .context import Registrar
from .domain_ca import DomainCA
from .masa_client import MasaClient
from .store import Store
from .web import serve


async def run(config: RegistrarConfig) -> None:
    with Store(config.store_path, "registrar") as store:
        ca = DomainCA(config.ca_cert, config.ca_key,
                      validity=datetime.timedelta(days=config.ldevid_days),
                      subject_policy=config.ldevid_subject)
        masa = MasaClient(config)
        await masa.start()
        announcer = Announcer(config)
        try:
            await serve(make_app(Registrar(config, store, masa, ca)), config.listen,
                        tls_context(config), "registrar", on_started=announcer.start)
        finally:
            await announcer.stop()
            await masa.close()


def main(argv: list[str] | None = None) -> int:
    return service.main("brski-registrar", "BRSKI registrar with EST and a domain CA",
                        load_registrar_config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
