"""Enrollment rate with the PostgreSQL store against SQLite, one and two registrars, in the
same run.

    sudo .venv/bin/python bench/enroll_cluster.py [--pledges 40] [--concurrency 8] [--json]

Each configuration builds its own namespace lab (lab.registrar_cluster): two join links with
one joinproxyd each (circuit mode) and one pledge-sim per link enrolling ``--pledges``
IDevIDs (so 2 x N per configuration, through the proxies, HTTPS BRSKI + EST). The
configurations, in this order:

    sqlite      1 registrar    its SQLite file (the default deployment)
    postgresql  1 registrar    a PostgreSQL database
    sqlite      2 registrars   one SQLite file each: NOT one domain's shared state, the
                               upper bound of what two independent registrars do
    postgresql  2 registrars   one shared database (one domain)

PostgreSQL is a throw-away cluster on this host (lab.pgcluster) with fsync on, as SQLite
runs with synchronous=FULL: both commit to disk. Reported per configuration: enrollments per
second over the pledge-sims' run (the slower link's end), and the registrars' CPU time per
enrollment (from /proc before and after). The machine is shared: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from enroll_rate import cpu_seconds  # bench/, beside this script

from lab import Lab, Topology
from lab.pgcluster import PgCluster
from lab.registrar_cluster import RegistrarCluster

CONFIGS = [("sqlite", 1), ("postgresql", 1), ("sqlite", 2), ("postgresql", 2)]


def measure_one(pg: PgCluster, engine: str, registrars: int, pledges: int, concurrency: int,
                work: Path) -> dict[str, object]:
    tag = f"{engine[:2]}{registrars}"
    serials = [[f"{tag}-{link}-{i:03d}" for i in range(pledges)] for link in (0, 1)]
    urls = ({"store_url": pg.new_database("bench"), "masa_store_url": pg.new_database("benchm")}
            if engine == "postgresql" else {})
    with Lab(Topology(pledges=2, registrars=registrars, join_links=2),
             log_dir=work / "logs") as lab:
        cluster = RegistrarCluster(lab, work, serials, registrars=registrars,
                                   **urls)
        try:
            cluster.start()
            pids = [s.process("registrar").pid for s in cluster.services]
            before = sum(cpu_seconds(pid) for pid in pids)
            started = time.monotonic()
            runs = [sim.wait(600) for sim in cluster.enroll(concurrency, deadline=500)]
            elapsed = time.monotonic() - started
            cpu = sum(cpu_seconds(pid) for pid in pids) - before
        finally:
            cluster.stop()
    results = [r for run in runs for r in run.results]
    enrolled = sum(1 for r in results if r.get("ok"))
    return {"engine": engine, "registrars": registrars, "pledges": 2 * pledges,
            "enrolled": enrolled, "seconds": round(elapsed, 2),
            "enrollments_per_second": round(enrolled / elapsed, 2),
            "registrar_cpu_ms_per_enrollment": round(1000 * cpu / max(enrolled, 1), 1)}


def measure(pledges: int, concurrency: int) -> list[dict[str, object]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="enroll-cluster-") as tmp, \
            PgCluster.start(durable=True) as pg:
        for n, (engine, registrars) in enumerate(CONFIGS):
            out.append(measure_one(pg, engine, registrars, pledges, concurrency,
                                   Path(tmp) / f"run{n}"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pledges", type=int, default=40, help="per join link and configuration")
    p.add_argument("--concurrency", type=int, default=8, help="per pledge-sim (join link)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 pledges a link at concurrency 2")
    args = p.parse_args()
    if args.quick:
        args.pledges, args.concurrency = 2, 2
    if os.geteuid() != 0:
        print("enroll_cluster: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    if min(args.pledges, args.concurrency) < 1:
        print("enroll_cluster: --pledges and --concurrency must be at least 1",
              file=sys.stderr)
        return 2
    rows = measure(args.pledges, args.concurrency)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"enroll_cluster: {2 * args.pledges} pledges per configuration through two "
              f"joinproxyd, concurrency {args.concurrency} per link")
        print(f"{'store':<11} {'registrars':>10} {'enrolled':>9} {'per s':>7} "
              f"{'registrar CPU ms/enrollment':>28}")
        for r in rows:
            print(f"{r['engine']:<11} {r['registrars']:>10} "
                  f"{r['enrolled']:>5}/{r['pledges']:<3} {r['enrollments_per_second']:>7.2f} "
                  f"{r['registrar_cpu_ms_per_enrollment']:>28.1f}")
    from _report import record  # make bench (bench/run_all.py), which runs this repeatedly

    for r in sorted(rows, key=lambda r: r["engine"] != "sqlite"):  # the baselines first
        name = f"{r['engine']}, {r['registrars']} registrar(s)"
        record(name, r["enrollments_per_second"], "enrollments/s",
               baseline=None if r["engine"] == "sqlite" else f"sqlite, {r['registrars']} "
               "registrar(s)")
        record(f"{name}: registrar CPU", r["registrar_cpu_ms_per_enrollment"],
               "ms/enrollment", better="lower")
    return 0 if all(r["enrolled"] == r["pledges"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
