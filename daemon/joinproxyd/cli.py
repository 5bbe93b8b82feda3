"""joinproxyd: the BRSKI join proxy daemon.

    joinproxyd [--config /etc/joinproxyd/joinproxyd.toml]
    joinproxyd --check-config FILE     prints "ok" or the first error, with key and reason
"""

import argparse
import asyncio
import logging
import resource
import sys
from pathlib import Path

from . import __version__, logs
from .config import DEFAULT_PATH, ConfigError, load

FDS_PER_CIRCUIT = 2  # the pledge's socket and the registrar's
FDS_SPARE = 256  # listeners, netlink, discovery, metrics, control, logs


def raise_fd_limit(circuits_total: int, log: logging.Logger) -> int:
    """Raise the soft open-file limit to the hard one (systemd's default soft limit, 1024,
    would run out at about 500 circuits), and say so if even that cannot hold the
    configured number of circuits. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    needed = circuits_total * FDS_PER_CIRCUIT + FDS_SPARE
    if soft < needed:
        log.warning("limits.circuits_total = %d needs about %d open files but the limit is "
                    "%d: circuits beyond that are refused (reason resources); raise "
                    "LimitNOFILE or lower circuits_total", circuits_total, needed, soft)
    return soft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="joinproxyd", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_PATH,
                        help=f"configuration file (default {DEFAULT_PATH})")
    parser.add_argument("--check-config", type=Path, metavar="FILE",
                        help="validate FILE and exit")
    parser.add_argument("--version", action="version", version=f"joinproxyd {__version__}")
    args = parser.parse_args(argv)
    if args.check_config is not None:
        try:
            load(args.check_config)
        except ConfigError as exc:
            print(f"{args.check_config}: {exc}" if exc.key != str(args.check_config)
                  else str(exc), file=sys.stderr)
            return 1
        print("ok")
        return 0
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"joinproxyd: {args.config}: {exc}" if exc.key != str(args.config)
              else f"joinproxyd: {exc}", file=sys.stderr)
        return 1
    log = logs.setup(config.log_level)
    raise_fd_limit(config.limits.circuits_total, log)
    from .daemon import Daemon, DaemonError  # after logging: importing pulls in pyroute2

    logs.quiet_libraries()  # again: importing pyroute2 reset its logger's level

    try:
        return asyncio.run(Daemon(config, args.config).run())
    except KeyboardInterrupt:
        return 0
    except DaemonError as exc:
        print(f"joinproxyd: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"joinproxyd: {exc}; run as root or with CAP_NET_ADMIN", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
