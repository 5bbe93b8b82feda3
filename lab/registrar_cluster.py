"""Several registrars, one domain, one PostgreSQL store: the lab setup shared by the cluster
tests (tests/test_registrar_cluster.py), the two-registrar demo (``joinproxy-lab demo
--registrars 2``) and the benchmark (bench/enroll_cluster.py).

    pledge0 ─ [join0] ─ joinproxyd A ─┐                 ┌─ registrar0 (+ MASA)
                          (proxy ns)  ├─ [backbone] ────┤
    pledge1 ─ [join1] ─ joinproxyd B ─┘                 └─ registrar1 (+ MASA)

One joinproxyd (circuit mode) per join link, each configured with every registrar and
preferring its own (link n -> registrar n), so both registrars work at once and each proxy
fails over to the other registrar. The registrars share the domain CA's certificate and key
(the same files: in a deployment, the same secret on each registrar host) and one store; the
MASAs share another. With ``store_url=None`` each registrar keeps its own SQLite file (the
benchmark's baseline; not a shared domain).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .brski_services import REGISTRAR_PORT, PledgeSim, Services, make_pki, spawn_enroll
from .proxyd import ProxyDaemon, base_config
from .topology import Lab, wait_for

ULAS = ["fd4a:5044::100", "fd4a:5044::101"]  # registrar0, registrar1 on the backbone
PROXY = f"[fe80::1%eth0]:{REGISTRAR_PORT}"  # what a pledge reaches its join proxy by


def proxy_config(run_dir: Path, link: int, registrars: int, metrics_port: int) -> dict:
    static = [{"address": ULAS[r], "port": REGISTRAR_PORT,
               "preference": 10 if r == link % registrars else 20}
              for r in range(registrars)]
    return base_config(
        run_dir,
        daemon={"log_level": "info", "control_socket": str(run_dir / "control.sock"),
                "drain_seconds": 1},
        metrics={"listen": f"[::1]:{metrics_port}"},
        join=[{"interfaces": [f"join{link}"], "modes": ["circuit"], "port": REGISTRAR_PORT}],
        # One pledge host (one link-local address) stands for a whole fleet here: the
        # per-pledge circuit limits would otherwise pace the fleet at 2 new circuits a second.
        limits={"circuits_per_pledge": 1000, "circuits_per_interface": 1000,
                "new_circuits_per_second": 1000.0, "new_circuits_burst": 1000},
        registrars={"discovery": ["static"], "static": static, "health_interval": 0.3,
                    "health_timeout": 0.3},
        announce={"interval": 1, "mdns": False, "grasp": False})


class RegistrarCluster:
    """``registrars`` registrar hosts (+ MASAs) and one joinproxyd per join link of ``lab``
    (a Topology with ``join_links`` links and one pledge host per link). ``service_config``:
    more ``write_configs`` settings for every registrar and MASA."""

    def __init__(self, lab: Lab, work: Path, serials: Sequence[Sequence[str]], *,
                 registrars: int = 2, store_url: str | None = None,
                 masa_store_url: str | None = None, log_level: str = "info",
                 **service_config: Any) -> None:
        self.lab = lab
        self.serials = [list(batch) for batch in serials]
        self.pki = make_pki(work / "pki", [s for batch in self.serials for s in batch])
        self.store_url = store_url
        self.masa_store_url = masa_store_url
        extra: dict[str, Any] = {"log_level": log_level, **service_config}
        if store_url:
            extra["store_url"] = store_url
        if masa_store_url:
            extra["masa_store_url"] = masa_store_url
        self.services = [
            Services(lab.registrars[r], self.pki, work / f"r{r}",
                     registrar_listen=[f"[{ULAS[r]}]:{REGISTRAR_PORT}"],
                     announce_interfaces=[], **extra)
            for r in range(registrars)]
        self.proxies = [ProxyDaemon(lab, work / f"proxy{link}",
                                    proxy_config(work / f"proxy{link}", link, registrars,
                                                 9465 + link))
                        for link in range(len(self.serials))]
        self.out = work / "out"

    def active(self, link: int) -> str | None:
        return next((r["address"] for r in self.proxies[link].ctl()["registrars"]
                     if r["active"]), None)

    def start(self) -> RegistrarCluster:
        for s in self.services:
            s.start()
        for p in self.proxies:
            p.start()
        for link in range(len(self.proxies)):
            mine = ULAS[link % len(self.services)]
            wait_for(lambda link=link, mine=mine: self.active(link) == mine, 15,
                     f"joinproxyd on join{link} to use {mine}")
        return self

    def enroll(self, concurrency: int = 8, deadline: float = 150) -> list[PledgeSim]:
        """One pledge-sim per join link, all of its serials at once (in the background)."""
        args = ["--concurrency", str(concurrency), "--registrar", PROXY,
                "--deadline", str(deadline)]
        return [spawn_enroll(self.lab.pledges[link], self.pki, self.out,
                             *[a for s in batch for a in ("--serial", s)], *args,
                             verbose=False)
                for link, batch in enumerate(self.serials)]

    def issued_by(self, registrar: int) -> list[str]:
        """Serials the registrar logged an LDevID for, over all its runs."""
        return [line.split("LDevID issued for ", 1)[1].split(":", 1)[0]
                for line in self.services[registrar].log("registrar").splitlines()
                if "LDevID issued for " in line]

    def logs(self, tail: int = 3000) -> str:
        return "\n".join([*(s.logs(tail) for s in self.services),
                          *(f"--- joinproxyd {n}:\n{p.log()[-tail:]}"
                            for n, p in enumerate(self.proxies))])

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()
        for s in self.services:
            s.stop()
