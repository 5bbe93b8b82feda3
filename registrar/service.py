"""What both command-line services share: argument parsing, logging, exit codes.

    brski-registrar --config registrar.toml [--check-config]
    brski-masa --config masa.toml [--check-config]

Exit codes: 0 stopped by SIGTERM/SIGINT (or configuration OK), 1 unusable configuration or
store, 2 usage error (argparse), 3 cannot listen.
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

from brski import __version__
from brski.cli import quiet

from .store import StoreError
from .tomlconfig import ConfigError

C = TypeVar("C")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    # aiohttp logs each access at INFO; keep that, but not its internal debug chatter.
    logging.getLogger("aiohttp").setLevel(max(level, logging.INFO))
    # The other libraries (pyroute2, zeroconf, asyncio...) only warn, unless named in
    # BRSKI_DEBUG_LIBRARIES: at debug level the lines must be the service's own.
    quiet.hold(logging.getLogger().handlers,
               quiet.wanted_loud(os.environ.get("BRSKI_DEBUG_LIBRARIES", "")),
               [n for n in quiet.LIBRARIES if n != "aiohttp"])


def main(
    prog: str,
    description: str,
    load: Callable[[Path], C],
    run: Callable[[C], Coroutine[Any, Any, None]],
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
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"{prog}: {args.config}: {exc}", file=sys.stderr)
        return 1
    if args.check_config:
        print(f"{prog}: {args.config}: configuration OK")
        return 0
    setup_logging(getattr(config, "log_level", logging.INFO))
    log = logging.getLogger(prog)
    try:
        asyncio.run(run(config))
    except (StoreError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("%s", exc)
        return 3
    except KeyboardInterrupt:
        pass
    return 0
