"""brski-masa: run the MASA (see ``registrar.masa_config`` for the configuration keys);
``brski-masa store export|import|check ...``: its store (``registrar.store_transfer``)."""

from __future__ import annotations

import sys

from . import service
from .masa import Masa
from .masa_app import make_app
from .masa_config import MasaConfig, load_masa_config
from .metrics import ServiceMetrics
from .store import Store
from .store_commit import GroupCommitter
from .web import serve, server_ssl_context


async def run(config: MasaConfig, metrics: ServiceMetrics) -> None:
    with Store(config.store_path, "masa") as store:
        ctx = server_ssl_context(config.cert_file, config.key_file)
        # Voucher records are written by the group commit's thread, on a connection of its
        # own; the requests' reads stay on this one.
        committer = GroupCommitter(config.store_path, "masa")
        try:
            await serve(make_app(Masa(config, store, committer)), config.listen, ctx, "masa",
                        metrics=metrics)
        finally:
            committer.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["store"]:  # export/import/check the store (registrar.store_transfer)
        from .store_transfer import main as store_main
        return store_main(argv[1:], "masa", load_masa_config)
    return service.main("brski-masa", "BRSKI MASA (RFC 8995)", load_masa_config, run, argv)


if __name__ == "__main__":
    sys.exit(main())
