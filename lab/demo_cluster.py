"""``joinproxy-lab demo --registrars 2`` (``make demo DEMO_REGISTRARS=2``): one domain served
by two registrars sharing a PostgreSQL store, behind two join proxies.

    pledge0 (join0) ─ joinproxyd A ─┐                 ┌─ registrar0 ─┐
                                    ├─ [backbone] ────┤              ├─ PostgreSQL (one
    pledge1 (join1) ─ joinproxyd B ─┘                 └─ registrar1 ─┘   store per role)

A throw-away PostgreSQL cluster (Debian's server, run as an unprivileged user in a temporary
directory, its own socket: lab.pgcluster) holds the registrars' store and the MASAs'. Each
join proxy prefers its own registrar and knows both. PLEDGES pledges per join link enroll at
once; after registrar0's third LDevID it is killed with SIGKILL: joinproxyd A moves its
pledges to registrar1, which answers their retries from the same store. At the end: who
issued what, and the store's own account (``brski-registrar store check``), every
certificate serial unique. Exit status 0 only if every pledge enrolled and every LDevID
verifies against the domain CA.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .brski_services import ldevid_verifies
from .pgcluster import PgCluster
from .registrar_cluster import ULAS, RegistrarCluster
from .topology import Lab, Topology, wait_for

PLEDGES = 10  # per join link
KILL_AFTER = 3  # registrar0's LDevIDs before it is killed


def run() -> int:
    started = time.monotonic()
    ok = False
    with tempfile.TemporaryDirectory(prefix="joinproxy-demo2-") as tmp, PgCluster.start() as pg:
        work = Path(tmp)
        print(f"PostgreSQL {pg.bindir.parent.name}: throw-away cluster in {pg.root} "
              f"(socket {pg.socket_dir}, port {pg.port})")
        store_url = pg.new_database("registrars")
        serials = [[f"demo{link}-{i:02d}" for i in range(PLEDGES)] for link in (0, 1)]
        with Lab(Topology(pledges=2, registrars=2, join_links=2),
                 log_dir=work / "logs") as lab:
            cluster = RegistrarCluster(lab, work, serials, store_url=store_url,
                                       masa_store_url=pg.new_database("masas"))
            try:
                cluster.start()
                print(lab.describe())
                print(f"registrar0 [{ULAS[0]}] and registrar1 [{ULAS[1]}]: one domain CA "
                      f"(the same certificate and key files), one store ({store_url})")
                print("joinproxyd on join0 prefers registrar0, on join1 registrar1; each "
                      "knows both")
                sims = cluster.enroll(concurrency=4, deadline=90)
                wait_for(lambda: len(cluster.issued_by(0)) >= KILL_AFTER, 90,
                         f"registrar0's LDevID number {KILL_AFTER}")
                cluster.services[0].stop("registrar", sig=signal.SIGKILL)
                killed = set(cluster.issued_by(0))
                print(f"registrar0 killed (SIGKILL) after {len(killed)} LDevIDs")
                wait_for(lambda: cluster.active(0) == ULAS[1], 15,
                         "joinproxyd on join0 to fail over")
                print("joinproxyd on join0 now sends new circuits to registrar1")
                runs = [sim.wait(120) for sim in sims]
                results = [r for run in runs for r in run.results]
                enrolled = [r for r in results if r.get("ok")]
                verified = sum(ldevid_verifies(cluster.pki, r.get("ldevid_path"))
                               for r in enrolled)
                by1 = set(cluster.issued_by(1))
                print(f"enrolled {len(enrolled)}/{2 * PLEDGES}; LDevIDs by registrar0 "
                      f"{len(killed)}, by registrar1 {len(by1)} (of them from join0: "
                      f"{len(by1 & set(serials[0]))}); openssl verify: "
                      f"{verified}/{len(enrolled)} OK")
                check = subprocess.run([sys.executable, "-m", "registrar.cli", "store",
                                        "check", "--store", store_url],
                                       capture_output=True, text=True, timeout=60)
                print("brski-registrar store check: " + (check.stdout or check.stderr).strip())
                ok = (len(enrolled) == 2 * PLEDGES and verified == len(enrolled)
                      and check.returncode == 0)
            finally:
                if not ok:
                    print(cluster.logs(1500))
                cluster.stop()
    print(f"lab and PostgreSQL cluster removed; demo {'passed' if ok else 'FAILED'} in "
          f"{time.monotonic() - started:.1f} s")
    return 0 if ok else 1
