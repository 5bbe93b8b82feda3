"""Two registrars, one domain, one PostgreSQL store (issue 17's acceptance), all real.

    pledge0 ─ [join0] ─ joinproxyd A ─┐                 ┌─ registrar0 (+ MASA)
                          (proxy ns)  ├─ [backbone] ────┤
    pledge1 ─ [join1] ─ joinproxyd B ─┘                 └─ registrar1 (+ MASA)
                                  registrar stores: one PostgreSQL database (throw-away
                                  cluster); the two MASAs: another, shared too

Two joinproxyd daemons (circuit mode), one per join link, each preferring its own registrar
and configured with both. One pledge-sim per join link enrolls 100 IDevIDs at once (200 in
all). Both registrars share the domain CA's certificate and key (the same files) and the
store. Afterwards the store must hold every pledge's LDevID exactly once, all certificate
serial numbers distinct and drawn from the store's sequence, each voucher once for its
request, and one audit record per certificate and per voucher. In the second test
registrar0 is SIGKILLed halfway: proxy A fails over to registrar1 and every pledge finishes.
"""

from __future__ import annotations

import collections
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from lab import Lab, Topology, wait_for
from lab.brski_services import REGISTRAR_PORT, Services, make_pki, spawn_enroll
from lab.proxyd import ProxyDaemon, base_config
from registrar.store import Store

pytestmark = pytest.mark.netns

PER_LINK = 100
R = ["fd4a:5044::100", "fd4a:5044::101"]
PROXY = f"[fe80::1%eth0]:{REGISTRAR_PORT}"


def proxy_config(run_dir: Path, link: int, metrics_port: int) -> dict:
    mine, other = R[link], R[1 - link]
    return base_config(
        run_dir,
        metrics={"listen": f"[::1]:{metrics_port}"},
        join=[{"interfaces": [f"join{link}"], "modes": ["circuit"], "port": REGISTRAR_PORT}],
        registrars={"static": [{"address": mine, "port": REGISTRAR_PORT, "preference": 10},
                               {"address": other, "port": REGISTRAR_PORT, "preference": 20}]},
        announce={"interval": 1, "mdns": False, "grasp": False})


class Cluster:
    def __init__(self, lab: Lab, tmp: Path, pg_cluster) -> None:
        self.lab = lab
        self.serials = [[f"c{link}-{i:03d}" for i in range(PER_LINK)] for link in (0, 1)]
        self.pki = make_pki(tmp / "pki", [s for batch in self.serials for s in batch])
        self.store_url = pg_cluster.new_database("registrars")
        self.masa_store_url = masa_url = pg_cluster.new_database("masas")
        self.services = [
            Services(lab.registrars[r], self.pki, tmp / f"r{r}",
                     registrar_listen=[f"[{R[r]}]:{REGISTRAR_PORT}"], announce_interfaces=[],
                     store_url=self.store_url, masa_store_url=masa_url, log_level="info")
            for r in (0, 1)]
        self.proxies = [ProxyDaemon(lab, tmp / f"proxy{link}",
                                    proxy_config(tmp / f"proxy{link}", link, 9465 + link))
                        for link in (0, 1)]
        self.out = tmp / "out"

    def start(self) -> None:
        for s in self.services:
            s.start()
        for p in self.proxies:
            p.start()
        for link, p in enumerate(self.proxies):
            wait_for(lambda p=p, link=link: any(r["active"] and r["address"] == R[link]
                                                for r in p.ctl()["registrars"]),
                     15, f"proxy {link} using registrar{link}")

    def enroll(self) -> list:
        args = ["--concurrency", "8", "--registrar", PROXY, "--deadline", "150"]
        return [spawn_enroll(self.lab.pledges[link], self.pki, self.out,
                             *[a for s in self.serials[link] for a in ("--serial", s)], *args,
                             verbose=False)
                for link in (0, 1)]

    def show(self) -> None:
        for s in self.services:
            print(s.logs(3000))
        for p in self.proxies:
            print(f"--- joinproxyd:\n{p.log()[-3000:]}")

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()
        for s in self.services:
            s.stop()


@pytest.fixture
def cluster(as_root: None, tmp_path: Path, pg_cluster) -> Iterator[Cluster]:
    with Lab(Topology(pledges=2, registrars=2, join_links=2),
             log_dir=tmp_path / "logs") as lab:
        c = Cluster(lab, tmp_path, pg_cluster)
        try:
            yield c
        finally:
            c.show()
            c.stop()


def check_results(c: Cluster, runs: list) -> dict[str, dict]:
    results = {r["serial"]: r for run in runs for r in run.results}
    every = [s for batch in c.serials for s in batch]
    assert sorted(results) == sorted(every), [run.stderr[-1500:] for run in runs]
    bad = [r for r in results.values() if not r["ok"]]
    assert not bad, json.dumps(bad[:3], indent=1)
    return results


def check_store(c: Cluster, results: dict[str, dict], *, exact: bool) -> dict[str, int]:
    """Every pledge's LDevID in the store exactly once; serials unique and from the store's
    sequence; each voucher once for its request; one audit record per certificate and per
    voucher. ``exact``: no retry happened, so one of everything per pledge."""
    with Store(c.store_url, "registrar") as store:
        certs = store.certificates()
        vouchers = store.vouchers()
        audit = store.audit_events()
        _, requests = store.table_rows("voucher_requests")
        sequence = dict(store.table_rows("sequences")[1])["cert_serial"]
    by_serial = collections.Counter(c.cert_serial for c in certs)
    assert max(by_serial.values()) == 1
    high_bits = sorted(int(cert.cert_serial, 16) >> 64 for cert in certs)
    assert len(set(high_bits)) == len(certs) and high_bits[-1] <= sequence
    der_in_store = collections.Counter(cert.der for cert in certs)
    for serial, r in results.items():
        der = x509.load_pem_x509_certificate(Path(r["ldevid_path"]).read_bytes()).public_bytes(
            Encoding.DER)
        assert der_in_store[der] == 1, serial
    cert_events = collections.Counter(e.detail["cert_serial"] for e in audit
                                      if e.event == "certificate")
    assert cert_events == collections.Counter({cert.cert_serial: 1 for cert in certs})
    voucher_events = collections.Counter(e.detail["voucher"] for e in audit
                                         if e.event == "voucher")
    assert voucher_events == collections.Counter({v.id: 1 for v in vouchers})
    per_request = collections.Counter(v.request_id for v in vouchers)
    assert max(per_request.values()) == 1
    request_events = collections.Counter(e.detail["request"] for e in audit
                                         if e.event == "voucher-request")
    assert request_events == collections.Counter({row[0]: 1 for row in requests})
    # The two MASAs' shared store: each voucher they issued recorded and audited once, and at
    # least one for every voucher the registrars hold.
    with Store(c.masa_store_url, "masa") as masa:
        issued = masa.vouchers()
        masa_events = collections.Counter(e.detail["voucher"] for e in masa.audit_events()
                                          if e.event == "voucher")
    assert masa_events == collections.Counter({v.id: 1 for v in issued})
    assert len(issued) >= len(vouchers)
    if exact:
        n = len(results)
        assert len(issued) == n
        assert (len(certs), len(vouchers), len(requests)) == (n, n, n)
        assert {cert.serial for cert in certs} == set(results)
    return {"certificates": len(certs), "vouchers": len(vouchers),
            "voucher_requests": len(requests), "audit": len(audit)}


def issued_by(service: Services) -> int:
    return service.log("registrar").count("LDevID issued")


def test_two_registrars_enroll_200_pledges_into_one_postgresql_store(cluster: Cluster) -> None:
    c = cluster
    c.start()
    started = time.monotonic()
    runs = [sim.wait(240) for sim in c.enroll()]
    elapsed = time.monotonic() - started
    results = check_results(c, runs)
    counts = check_store(c, results, exact=True)
    # Both registrars worked, and each LDevID was issued by exactly one of them.
    by = [issued_by(s) for s in c.services]
    assert min(by) > 0 and sum(by) == counts["certificates"], by
    print(f"200 enrollments through 2 proxies and 2 registrars in {elapsed:.1f} s "
          f"({200 / elapsed:.1f}/s); per registrar {by}; store {counts}")


def test_a_registrar_killed_halfway_its_pledges_fail_over_and_finish(cluster: Cluster) -> None:
    c = cluster
    c.start()
    sims = c.enroll()
    first = c.services[0]
    wait_for(lambda: issued_by(first) >= PER_LINK // 2, 180, "registrar0 halfway")
    first.stop("registrar", sig=signal.SIGKILL)
    killed_at = issued_by(first)
    wait_for(lambda: any(r["active"] and r["address"] == R[1]
                         for r in c.proxies[0].ctl()["registrars"]), 15,
             "proxy 0 to fail over to registrar1")
    runs = [sim.wait(240) for sim in sims]
    results = check_results(c, runs)
    counts = check_store(c, results, exact=False)
    # registrar0 stopped halfway; registrar1 finished the rest of join0's pledges too.
    assert killed_at < PER_LINK
    link0_after = [s for s in c.serials[0]
                   if s not in set(_issued_serials(first))]
    assert link0_after, "registrar0 enrolled all of join0 before it was killed"
    assert issued_by(c.services[1]) >= PER_LINK + len(link0_after) - 0
    print(f"killed registrar0 after {killed_at} LDevIDs; registrar1 issued "
          f"{issued_by(c.services[1])}; store {counts}")


def _issued_serials(service: Services) -> list[str]:
    return [line.split(" for ", 1)[1].split(":", 1)[0]
            for line in service.log("registrar").splitlines() if "LDevID issued for " in line]
