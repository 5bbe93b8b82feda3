"""What both command-line services share: argument parsing, logging, metrics, exit codes.

    brski-registrar --config registrar.toml [--check-config] [--metrics ADDRESS]
    brski-masa --config masa.toml [--check-config] [--metrics ADDRESS]

Exit codes: 0 stopped by SIGTERM/SIGINT (or configuration OK), 78 (EX_CONFIG) invalid
configuration, from --check-config and at start: the units list it in
RestartPreventExitStatus=, as restarting cannot fix a file; 1 unusable store, 2 usage error
(argparse), 3 cannot listen.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import service_notify
from brski import __version__
from brski.cli import quiet

from .metrics import ServiceMetrics, metrics_address
from .store import StoreError
from .tomlconfig import ConfigError

C = TypeVar("C")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_CONFIG = os.EX_CONFIG  # 78, sysexits.h


def setup_logging(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    # aiohttp logs each access at INFO; keep that, but not its internal debug chatter.
    logging.getLogger("aiohttp").setLevel(max(level, logging.INFO))
    # The other libraries (pyroute2, zeroconf, asyncio...) only warn, unless named in
    # BRSKI_DEBUG_LIBRARIES: at debug level the lines must be the service's own.
    quiet.hold(logging.getLogger().handlers,
               quiet.wanted_loud(os.environ.get("BRSKI_DEBUG_LIBRARIES", "")),
               [n for n in quiet.LIBRARIES if n != "aiohttp"])


def _metrics_flag(text: str) -> str:
    try:
        metrics_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from exc
    return text


def main(
    prog: str,
    description: str,
    load: Callable[[Path], C],
    run: Callable[[C, ServiceMetrics], Coroutine[Any, Any, None]],
    argv: list[str] | None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    if options is not None:  # a service's own switches, so that its usage names them
        options(parser)
    parser.add_argument("--config", "-c", type=Path, required=True, help="TOML configuration")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration (files, keys, certificates) and exit")
    parser.add_argument("--metrics", metavar="ADDRESS", type=_metrics_flag,
                        help='serve Prometheus /metrics here, e.g. "[::1]:9466" ("" turns '
                             "it off); overrides [metrics] listen")
    args = parser.parse_args(argv)
    notifier = service_notify.Notifier()
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"{prog}: {args.config}: {exc}", file=sys.stderr)
        # systemctl status shows it as the unit's Status: line.
        notifier.send(service_notify.status(f"configuration invalid: {exc}"))
        return EXIT_CONFIG
    if args.check_config:
        print(f"{prog}: {args.config}: configuration OK")
        return 0
    setup_logging(getattr(config, "log_level", logging.INFO))
    log = logging.getLogger(prog)
    listen = (metrics_address(args.metrics) if args.metrics is not None
              else getattr(config, "metrics_listen", None))
    metrics = ServiceMetrics(prog.removeprefix("brski-"))
    try:
        if listen is not None:
            try:
                metrics.serve(*listen)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot serve metrics on [{listen[0]}]:{listen[1]}: "
                                         f"{exc.strerror}") from exc
            log.info("metrics on http://[%s]:%d/metrics", *listen)
        asyncio.run(run(config, metrics))
    except ConfigError as exc:
        log.error("%s", exc)
        notifier.send(service_notify.status(f"configuration invalid: {exc}"))
        return EXIT_CONFIG
    except StoreError as exc:
        log.error("%s", exc)
        notifier.send(service_notify.status(str(exc)))
        return 1
    except OSError as exc:
        log.error("%s", exc)
        notifier.send(service_notify.status(str(exc)))
        return 3
    except KeyboardInterrupt:
        pass
    finally:
        metrics.close()
        notifier.close_socket()
    return 0
