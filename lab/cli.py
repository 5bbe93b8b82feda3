"""joinproxy-lab: bring a lab topology up, show it, take it down, or run the demo.

    joinproxy-lab up [--pledges N] [--registrars M] [--join-links K] [--join-ula]
    joinproxy-lab status
    joinproxy-lab down
    joinproxy-lab demo [--registrars 2]
"""

import argparse
import signal
import sys

from brski import __version__

from . import demo, netns, runs
from .netns import LabError
from .topology import Lab, Topology


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _status() -> int:
    found = runs.all_runs()
    if not found:
        print("no lab is up")
        return 0
    for state in found:
        kind = "persistent" if state.persistent else (
            "running" if state.owner_alive() else "stale (owner gone)")
        print(f"lab {state.run_id} ({kind}): {state.topology}")
        for ns in state.namespaces:
            print(f"  {ns}")
            for link in netns.addresses(ns) if ns in netns.list_namespaces() else []:
                addrs = [a["local"] for a in link.get("addr_info", [])
                         if a.get("scope") != "host"]
                if link["ifname"] != "lo" and addrs:
                    print(f"    {link['ifname']:<8} {link['operstate']:<8} {' '.join(addrs)}")
    return 0


def _down() -> int:
    cleaned = runs.clean_stale()
    persistent = [s for s in runs.all_runs() if s.persistent]
    for state in persistent:
        runs.destroy(state)
    total = len(cleaned) + len(persistent)
    print(f"removed {total} lab(s)" if total else "no lab to remove")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="joinproxy-lab", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"joinproxy-lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a topology that stays up until 'down'")
    up.add_argument("--pledges", type=int, default=1)
    up.add_argument("--registrars", type=int, default=1)
    up.add_argument("--join-links", type=int, default=1)
    up.add_argument("--join-ula", action="store_true", help="give join links a ULA prefix")
    sub.add_parser("status", help="list labs and their namespaces and addresses")
    sub.add_parser("down", help="remove every persistent lab and every stale one")
    demo_cmd = sub.add_parser("demo", help="bring up a lab, run the demo, tear it down")
    demo_cmd.add_argument("--registrars", type=int, choices=(1, 2), default=1,
                          help="2: one domain served by two registrars sharing a PostgreSQL "
                               "store, behind two join proxies (lab.demo_cluster)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    try:
        if args.command == "up":
            topo = Topology(pledges=args.pledges, registrars=args.registrars,
                            join_links=args.join_links, join_ula=args.join_ula)
            lab = Lab(topo, persistent=True).up()
            print(lab.describe())
            return 0
        if args.command == "status":
            return _status()
        if args.command == "down":
            return _down()
        if args.registrars == 2:
            from . import demo_cluster
            return demo_cluster.run()
        return demo.run()
    except LabError as exc:
        print(f"joinproxy-lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("joinproxy-lab: interrupted; the lab was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
