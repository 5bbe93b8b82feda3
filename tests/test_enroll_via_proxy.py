"""BRSKI enrollments through the real joinproxyd: issue 5's acceptance, all real.

    pledge0 ─┐                                        ┌─ registrar0: brski-registrar + MASA
    pledge1 ─┴─ [join0] ─ fe80::1  proxy  bb0 ─ [backbone] ─┴─ registrar1 (failover test)
                          (joinproxyd, circuit mode)

The pledges have link-local addresses only and the proxy does not route: every byte between
a pledge-sim and the registrar passes through the daemon's circuits (TLS end to end, the
daemon sees only ciphertext). Each test checks the pledges' own reports (the proxy they used
and how they found it), their LDevIDs against the domain CA with openssl, the daemon's
status and metrics, and the registrar's access log, which must show the proxy as the only
client.

How the daemon finds the registrar, by test:
- GRASP: the registrar floods AN_join_registrar on the backbone with its link-local
  locator (it listens on [fe80::b:2%eth0]:8443 only); the daemon learns it with the
  backbone's ifindex as scope. The pledges hear the daemon's AN_Proxy floods. In the
  grasp-ula case the registrar listens on [::]:8443 and so announces its ULA.
- mDNS: the registrar registers _brski-registrar._tcp (same link-local address), the daemon
  browses for it, and advertises _brski-proxy._tcp on join0, which the pledges browse for.
- static: the registrar listens on its ULA only and announces nothing; the daemon has it in
  its configuration.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import Host, Lab, Topology, wait_for
from lab.brski_services import (
    REGISTRAR_PORT,
    Services,
    enroll_each,
    ldevid_verifies,
    make_pki,
    spawn_enroll,
)
from lab.proxyd import ProxyDaemon, base_config

pytestmark = pytest.mark.netns

PROXY = f"[fe80::1%eth0]:{REGISTRAR_PORT}"  # what a pledge on join0 reaches the proxy by
PROXY_BACKBONE_LL = "fe80::b:1"
PROXY_BACKBONE_ULA = "fd4a:5044::1"


def ifindex(host: Host, ifname: str) -> int:
    (link,) = json.loads(host.run(["ip", "-j", "link", "show", ifname]).stdout)
    return int(link["ifindex"])


def circuits(daemon: ProxyDaemon) -> float:
    return daemon.sample("joinproxyd_circuits_total", mode="circuit")


def active(daemon: ProxyDaemon) -> dict[str, Any] | None:
    return next((r for r in daemon.ctl()["registrars"] if r["active"]), None)


def show(*parts: Services | ProxyDaemon) -> None:
    """Logs, printed for pytest to show when the test fails."""
    for part in parts:
        if isinstance(part, Services):
            print(part.logs())
        else:
            print(f"--- joinproxyd:\n{part.log()[-6000:]}")


@dataclass(frozen=True)
class Case:
    """One way for the daemon to find the registrar, and for the pledges to find the proxy."""

    name: str
    registrar: dict[str, Any]  # write_configs settings (listen, announcements)
    daemon: dict[str, Any]  # joinproxyd.toml sections over base_config
    pledge_discovery: str  # pledge-sim --discover
    source: str  # how the daemon's status says it learned the registrar
    address: str  # the registrar's address in the daemon's status (scoped if link-local)


CASES = [
    Case("grasp",
         {"announce_interfaces": ["eth0"], "grasp": True, "mdns": False},
         {"registrars": {"discovery": ["grasp"], "static": []},
          "announce": {"grasp": True, "mdns": False}},
         "grasp", "grasp", "fe80::b:2"),
    # A registrar listening on [::] announces its ULA (registrar/announce.py).
    Case("grasp-ula",
         {"registrar_listen": [f"[::]:{REGISTRAR_PORT}"], "announce_interfaces": ["eth0"],
          "grasp": True, "mdns": False},
         {"registrars": {"discovery": ["grasp"], "static": []},
          "announce": {"grasp": True, "mdns": False}},
         "grasp", "grasp", "fd4a:5044::100"),
    Case("mdns",
         {"announce_interfaces": ["eth0"], "grasp": False, "mdns": True},
         {"registrars": {"discovery": ["mdns"], "static": []},
          "announce": {"grasp": False, "mdns": True}},
         "mdns", "mdns", "fe80::b:2"),
    Case("static",
         {"registrar_listen": [f"[fd4a:5044::100]:{REGISTRAR_PORT}"],
          "announce_interfaces": []},
         {"registrars": {"discovery": ["static"],
                         "static": [{"address": "fd4a:5044::100", "port": REGISTRAR_PORT,
                                     "preference": 10}]},
          "announce": {"grasp": True, "mdns": False}},
         "grasp", "static", "fd4a:5044::100"),
]


@pytest.fixture
def two_pledges(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pledges_enroll_through_the_circuit_proxy(two_pledges: Lab, tmp_path: Path,
                                                  case: Case) -> None:
    lab = two_pledges
    serials = [f"{case.name}-{i}" for i in range(len(lab.pledges))]
    pki = make_pki(tmp_path / "pki", serials)
    services = Services(lab.registrars[0], pki, tmp_path / "r0", **case.registrar)
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy",
                                                              **case.daemon))
    try:
        services.start()
        daemon.start()
        registrar = wait_for(lambda: active(daemon), 15, f"a registrar found by {case.source}")
        assert registrar["source"] == case.source
        assert registrar["healthy"] is True
        assert registrar["address"] == case.address
        # A link-local registrar is reachable only through the link it was heard on.
        link_local = case.address.startswith("fe80:")
        assert registrar["scope_id"] == (ifindex(lab.proxy, "bb0") if link_local else 0)
        if case.pledge_discovery == "mdns":
            wait_for(lambda: daemon.sample("joinproxyd_announcements_total", method="mdns",
                                           interface="join0") >= 1, 15,
                     "the proxy's mDNS advertisement on join0")
        before = circuits(daemon)

        results = enroll_each(lab.pledges, pki, tmp_path / "out", serials,
                              "--discover", case.pledge_discovery, "--deadline", "40")

        assert sorted(r["serial"] for r in results) == serials
        for r in results:
            assert r["ok"], json.dumps(r, indent=1)
            assert r["proxy"] == PROXY and r["method"] == case.pledge_discovery, r
            assert f"serialNumber={r['serial']}" in r["ldevid_subject"]
            assert ldevid_verifies(pki, r["ldevid_path"]), r["ldevid_path"]
        assert services.issued() == set(serials)
        # A provisional TLS session for the voucher, a pinned one for the LDevID: each
        # pledge opened at least two circuits.
        assert circuits(daemon) - before >= 2 * len(serials)
        # The registrar's only client was the proxy, from its backbone address.
        proxy_address = PROXY_BACKBONE_LL if link_local else PROXY_BACKBONE_ULA
        peers = set(services.peers())
        assert peers == {proxy_address}, peers
        assert daemon.drops("circuit", "registrar-unreachable") == 0
        assert daemon.stop() == 0
    finally:
        show(services, daemon)


# -- failover between two registrars ------------------------------------------------------------

R0, R1 = "fd4a:5044::100", "fd4a:5044::101"


@pytest.fixture
def two_registrars(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=5, registrars=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def test_registrar_killed_mid_run_new_circuits_go_to_the_second(two_registrars: Lab,
                                                                 tmp_path: Path) -> None:
    """Ten pledges (two after another in each of five namespaces) start enrolling against
    registrar0; it is SIGKILLed after its first LDevID. The daemon moves new circuits to
    registrar1 (same domain CA, its own MASA) within 10 s and every pledge finishes."""
    lab = two_registrars
    serials = [f"fo-{i:02d}" for i in range(10)]
    pki = make_pki(tmp_path / "pki", serials)
    first = Services(lab.registrars[0], pki, tmp_path / "r0",
                     registrar_listen=[f"[{R0}]:{REGISTRAR_PORT}"], announce_interfaces=[])
    second = Services(lab.registrars[1], pki, tmp_path / "r1",
                      registrar_listen=[f"[{R1}]:{REGISTRAR_PORT}"], announce_interfaces=[])
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(
        tmp_path / "proxy", registrars={"static": [
            {"address": R0, "port": REGISTRAR_PORT, "preference": 10},
            {"address": R1, "port": REGISTRAR_PORT, "preference": 20}]}))
    try:
        first.start()
        second.start()
        daemon.start()
        wait_for(lambda: (active(daemon) or {}).get("address") == R0, 10, "registrar0 active")
        pledges = [spawn_enroll(host, pki, tmp_path / "out", "--serial", serials[2 * i],
                                "--serial", serials[2 * i + 1], "--concurrency", "1",
                                "--registrar", PROXY, "--deadline", "50")
                   for i, host in enumerate(lab.pledges)]

        wait_for(lambda: "LDevID issued" in first.log("registrar"), 30,
                 "registrar0's first LDevID")
        first.stop("registrar", sig=signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: (active(daemon) or {}).get("address") == R1, 10,
                 "new circuits to go to registrar1")
        assert time.monotonic() - killed < 10
        assert daemon.sample("joinproxyd_registrar_active",
                             registrar=f"[{R1}]:{REGISTRAR_PORT}") == 1
        assert daemon.sample("joinproxyd_registrar_active",
                             registrar=f"[{R0}]:{REGISTRAR_PORT}") == 0
        at_failover = circuits(daemon)

        runs = [p.wait(60) for p in pledges]
        results = {r["serial"]: r for run in runs for r in run.results}
        assert sorted(results) == serials, [run.stderr[-2000:] for run in runs]
        for r in results.values():
            assert r["ok"], json.dumps(r, indent=1)
            assert ldevid_verifies(pki, r["ldevid_path"]), r["ldevid_path"]
        assert all(run.rc == 0 for run in runs)
        # Pledges were cut off mid-enrollment by the kill, and retried.
        assert any(r["attempts"] > 1 for r in results.values())
        by_first, by_second = first.issued(), second.issued()
        assert by_first and by_second, (by_first, by_second)  # both did real work
        assert by_first | by_second == set(serials)
        assert circuits(daemon) > at_failover  # the pledges after the kill went through
        assert set(second.peers()) == {PROXY_BACKBONE_ULA}
        assert (active(daemon) or {}).get("address") == R1
        assert daemon.stop() == 0
    finally:
        show(first, second, daemon)
