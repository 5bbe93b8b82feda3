"""joinproxyd: the BRSKI join proxy daemon.

    joinproxyd [--config /etc/joinproxyd/joinproxyd.toml]
    joinproxyd --check-config FILE     prints "ok" or the first error, with key and reason
    joinproxyd --from-uci FILE [--write-config OUT]
                                       OpenWrt: translates UCI FILE to OUT (default
                                       /var/etc/joinproxyd.toml), prints the TOML path to run
                                       (exit 69: no join link enabled; joinproxyd/uci.py)

Exit status 78 (EX_CONFIG) means the configuration is invalid, or asks for a relay mode this
system lacks the library for, from --check-config and at start: the unit lists it in
RestartPreventExitStatus=, as restarting cannot fix a file or install a package.
"""

import argparse
import asyncio
import logging
import os
import resource
import sys
from pathlib import Path

from . import __version__, logs, sdnotify
from .config import DEFAULT_PATH, ConfigError, load
from .kernel import features

EXIT_CONFIG = os.EX_CONFIG  # 78, sysexits.h: the unit does not restart on it
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
    parser.add_argument("--from-uci", type=Path, metavar="FILE",
                        help="OpenWrt: translate the UCI file FILE to TOML, print its path")
    parser.add_argument("--write-config", type=Path, metavar="OUT",
                        help="with --from-uci: where the TOML goes (/var/etc/joinproxyd.toml)")
    parser.add_argument("--version", action="version", version=f"joinproxyd {__version__}")
    args = parser.parse_args(argv)
    if args.write_config is not None and args.from_uci is None:
        parser.error("--write-config goes with --from-uci")
    if args.from_uci is not None:
        from . import uci

        return uci.run(args.from_uci, args.write_config or uci.DEFAULT_OUTPUT)
    if args.check_config is not None:
        try:
            checked = load(args.check_config)
        except ConfigError as exc:
            print(f"{args.check_config}: {exc}" if exc.key != str(args.check_config)
                  else str(exc), file=sys.stderr)
            return EXIT_CONFIG
        # A reload (ExecReload=, procd's reload_service) checks first: a mode this system
        # cannot run fails it here rather than being refused by the running daemon.
        missing = features.missing_for(mode for spec in checked.joins for mode in spec.modes)
        if missing is not None:
            print(f"{args.check_config}: {missing}", file=sys.stderr)
            return EXIT_CONFIG
        print("ok")
        return 0
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"joinproxyd: {args.config}: {exc}" if exc.key != str(args.config)
              else f"joinproxyd: {exc}", file=sys.stderr)
        # systemctl status shows it as the unit's Status: line.
        sdnotify.Notifier().send(sdnotify.status(f"configuration invalid: {exc}"))
        return EXIT_CONFIG
    log = logs.setup(config.log_level)
    # A configured relay mode whose kernel feature or library is missing here: one line that
    # names the package, not a traceback from the first reconcile (kernel/features.py).
    missing = features.missing_for(mode for spec in config.joins for mode in spec.modes)
    if missing is not None:
        log.critical("%s: %s", args.config, missing)
        sdnotify.Notifier().send(sdnotify.status(f"cannot serve: {missing}"))
        return EXIT_CONFIG
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
