"""Two registrars, one domain, one PostgreSQL store (issue 17's acceptance), all real
(lab.registrar_cluster: two join links, a joinproxyd on each, two registrar hosts, the
registrars' store one database of the session's throw-away cluster, the MASAs' another).

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
from lab.brski_services import spawn_enroll
from lab.registrar_cluster import PROXY, ULAS, RegistrarCluster
from registrar.store import Store

pytestmark = pytest.mark.netns

PER_LINK = 100


@pytest.fixture
def cluster(as_root: None, tmp_path: Path, pg_cluster) -> Iterator[RegistrarCluster]:
    with Lab(Topology(pledges=2, registrars=2, join_links=2),
             log_dir=tmp_path / "logs") as lab:
        c = RegistrarCluster(lab, tmp_path,
                             [[f"c{link}-{i:03d}" for i in range(PER_LINK)] for link in (0, 1)],
                             store_url=pg_cluster.new_database("registrars"),
                             masa_store_url=pg_cluster.new_database("masas"))
        try:
            yield c
        finally:
            print(c.logs())
            c.stop()


def check_results(c: RegistrarCluster, runs: list) -> dict[str, dict]:
    results = {r["serial"]: r for run in runs for r in run.results}
    every = [s for batch in c.serials for s in batch]
    assert sorted(results) == sorted(every), [run.stderr[-1500:] for run in runs]
    bad = [r for r in results.values() if not r["ok"]]
    assert not bad, json.dumps(bad[:3], indent=1)
    return results


def check_store(c: RegistrarCluster, results: dict[str, dict], *, exact: bool) -> dict[str, int]:
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


def test_two_registrars_enroll_200_pledges_into_one_postgresql_store(
        cluster: RegistrarCluster) -> None:
    c = cluster
    c.start()
    started = time.monotonic()
    runs = [sim.wait(240) for sim in c.enroll()]
    elapsed = time.monotonic() - started
    results = check_results(c, runs)
    counts = check_store(c, results, exact=True)
    # Both registrars worked, and each LDevID was issued by exactly one of them.
    by = [c.issued_by(r) for r in (0, 1)]
    assert min(len(b) for b in by) > 0, by
    assert sorted(by[0] + by[1]) == sorted(results)
    print(f"200 enrollments through 2 proxies and 2 registrars in {elapsed:.1f} s "
          f"({200 / elapsed:.1f}/s); per registrar {[len(b) for b in by]}; store {counts}")


def test_a_registrar_killed_halfway_its_pledges_fail_over_and_finish(
        cluster: RegistrarCluster) -> None:
    c = cluster
    c.start()
    sims = c.enroll()
    wait_for(lambda: len(c.issued_by(0)) >= PER_LINK // 2, 180, "registrar0 halfway")
    c.services[0].stop("registrar", sig=signal.SIGKILL)
    before_kill = set(c.issued_by(0))
    wait_for(lambda: c.active(0) == ULAS[1], 15, "joinproxyd on join0 to fail over")
    runs = [sim.wait(240) for sim in sims]
    results = check_results(c, runs)
    counts = check_store(c, results, exact=False)
    # registrar0 stopped halfway; registrar1 enrolled the rest of join0's pledges too.
    assert len(before_kill) < PER_LINK
    after = set(c.issued_by(1))
    assert set(c.serials[0]) - before_kill <= after
    assert set(c.serials[1]) <= after | before_kill
    print(f"killed registrar0 after {len(before_kill)} LDevIDs; registrar1 issued "
          f"{len(after)}; store {counts}")


def test_a_202_retry_is_answered_by_the_other_registrar_from_the_shared_record(
        as_root: None, tmp_path: Path, pg_cluster) -> None:
    """registrar0 cannot reach its MASA and answers 202; while the pledge waits Retry-After,
    registrar0 stops, joinproxyd moves to registrar1, and the same signed request finds its
    pending record there: one request record, one voucher, the pledge enrolled."""
    with Lab(Topology(pledges=2, registrars=2, join_links=2),
             log_dir=tmp_path / "logs") as lab:
        url = pg_cluster.new_database("retry")
        c = RegistrarCluster(lab, tmp_path, [["late-0"], ["late-1"]], store_url=url,
                             retry_after=4)
        try:
            c.start()
            c.services[0].stop("masa")
            sim = spawn_enroll(lab.pledges[0], c.pki, c.out, "--serial", "late-0",
                               "--registrar", PROXY, "--deadline", "60", verbose=False)
            wait_for(lambda: 'requestvoucher HTTP/1.1" 202' in c.services[0].log("registrar"),
                     30, "registrar0 to answer 202")
            c.services[0].stop("registrar")
            wait_for(lambda: c.active(0) == ULAS[1], 10, "joinproxyd on join0 to fail over")
            run = sim.wait(90)
            (result,) = run.results
            assert result["ok"] and result["waits"] >= 1, json.dumps(result, indent=1)
            assert "voucher for late-0 obtained" in c.services[1].log("registrar")
            with Store(url, "registrar") as store:
                (request,) = store.voucher_requests("late-0")
                assert request.status == "vouchered"
                (voucher,) = store.vouchers("late-0")
                assert voucher.request_id == request.id
        finally:
            print(c.logs())
            c.stop()
