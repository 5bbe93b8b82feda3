"""NAT66 through the real joinproxyd: the kernel relays BRSKI, the daemon only programs it.

    pledge0 eth0: fe80::1:1, fd4a:5044:0:100::100 ── join0 [proxy] bb0 ── registrar0
                                      proxy join0: fe80::1, fd4a:5044:0:100::1    fd4a:5044::100
                                      proxy bb0:   fd4a:5044::1                   (brski-registrar)

join0 serves both modes on port 8443. A pledge that connects to the proxy's ULA uses its own
ULA as source and is DNATed to the registrar and masqueraded behind the proxy's backbone
address (no user-space circuit); one that connects to fe80::1 has a link-local source, which
the kernel cannot forward, and gets a circuit. A pledge that addresses the registrar itself
is relayed and masqueraded the same way (the DNAT to the same address sets no dnat status in
conntrack), one that addresses another backbone host is dropped and counted, and NAT66 flows
and bytes show in joinproxyd_circuits_total and joinproxyd_relayed_bytes_total
{mode="nat66"}. Then the daemon is SIGKILLed and started again
(its nftables table is replaced, not duplicated, and the forwarding value from before the
crashed run is what a clean stop restores).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Host, Lab, LabProcess, Topology, wait_for
from lab.brski_services import REGISTRAR_PORT, Services, enroll, ldevid_verifies, make_pki
from lab.proxyd import ProxyDaemon, base_config

pytestmark = pytest.mark.netns

PLEDGE_ULA = "fd4a:5044:0:100::100"
PROXY_JOIN_ULA = "fd4a:5044:0:100::1"
PROXY_BACKBONE = "fd4a:5044::1"
REGISTRAR = "fd4a:5044::100"
VIA_NAT66 = f"[{PROXY_JOIN_ULA}]:{REGISTRAR_PORT}"
VIA_CIRCUIT = f"[fe80::1%eth0]:{REGISTRAR_PORT}"
DIRECT = f"[{REGISTRAR}]:{REGISTRAR_PORT}"
OTHER_HOST = "fd4a:5044::200"  # another backbone host (an address of the registrar's host)
OTHER_PORT = 2200


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, join_ula=True), log_dir=tmp_path / "logs") as lab:
        yield lab


def joinproxyd_tables(proxy: Host) -> list[dict[str, Any]]:
    doc = json.loads(proxy.run(["nft", "-j", "list", "tables"]).stdout)
    return [obj["table"] for obj in doc["nftables"]
            if "table" in obj and obj["table"]["name"] == "joinproxyd"]


def forwarding(proxy: Host) -> str:
    return proxy.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip()


def circuits(daemon: ProxyDaemon, mode: str = "circuit") -> float:
    return daemon.sample("joinproxyd_circuits_total", mode=mode)


def relayed_bytes(daemon: ProxyDaemon, direction: str) -> float:
    return daemon.sample("joinproxyd_relayed_bytes_total", mode="nat66", direction=direction)


def nat66_relaying(daemon: ProxyDaemon) -> bool:
    status = daemon.ctl()
    nat66 = status["relays"]["nat66"]
    return bool(status["joining"] and nat66["relaying"]
                and nat66["registrar"] == f"[{REGISTRAR}]:{REGISTRAR_PORT}")


def established_peers(host: Host, port: int) -> list[str]:
    """Remote addresses of the TCP connections established to local `port` in `host`."""
    out = host.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"]).stdout
    return [line.split()[-1].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()]


def hold(pledge: Host, target: str) -> LabProcess:
    """A connection that stays open and silent, from the pledge to `target`."""
    return pledge.spawn(["sh", "-c", f"sleep 600 | exec socat - TCP6:{target}"], name="hold")


def test_nat66_enrolls_survives_a_crash_and_cleans_up(lab: Lab, tmp_path: Path) -> None:
    pledge, proxy = lab.pledges[0], lab.proxy
    serials = ["nat-0", "direct-0", "ll-0", "nat-1"]
    pki = make_pki(tmp_path / "pki", serials)
    services = Services(lab.registrars[0], pki, tmp_path / "r0",
                        registrar_listen=[f"[{REGISTRAR}]:{REGISTRAR_PORT}"],
                        announce_interfaces=[])
    config = base_config(tmp_path / "proxy", join=[
        {"interfaces": ["join*"], "modes": ["nat66", "circuit"], "port": REGISTRAR_PORT}])
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config)
    out = tmp_path / "out"
    assert forwarding(proxy) == "0" and joinproxyd_tables(proxy) == []
    try:
        services.start()
        daemon.start()
        wait_for(lambda: nat66_relaying(daemon), 10, "NAT66 relaying to the registrar")
        assert forwarding(proxy) == "1"
        assert pledge.address("eth0", link_local=False) == PLEDGE_ULA

        # Forwarding is on, yet the backbone is out of reach except the registrar's port.
        registrar_host = lab.registrars[0]
        registrar_host.run(["ip", "-6", "addr", "add", f"{OTHER_HOST}/64", "dev", "eth0",
                            "nodad"])
        registrar_host.spawn(["socat", f"TCP6-LISTEN:{OTHER_PORT},fork,reuseaddr",
                              "SYSTEM:echo other"], name="other")
        wait_for(lambda: registrar_host.run(["ss", "-ltnH", f"sport = :{OTHER_PORT}"]).stdout,
                 10, "the other backbone service")
        for target in (OTHER_HOST, REGISTRAR):
            other = pledge.run(["socat", "-", f"TCP6:[{target}]:{OTHER_PORT},"
                                "connect-timeout=1"], input="", check=False, timeout=10)
            assert other.returncode != 0 and "other" not in other.stdout
        wait_for(lambda: daemon.drops("nat66", "not-to-registrar") >= 2, 5,
                 "the forward chain's refusal count")

        # A connection from the pledge's ULA: NATed by the kernel, no circuit.
        holder = hold(pledge, VIA_NAT66)
        flows = wait_for(lambda: [c for c in daemon.ctl("circuits") if c["mode"] == "nat66"],
                         5, "the NAT66 flow in conntrack")
        assert [(f["pledge"].rsplit(":", 1)[0], f["registrar"]) for f in flows] \
            == [(f"[{PLEDGE_ULA}]", f"[{REGISTRAR}]:{REGISTRAR_PORT}")]
        assert wait_for(lambda: established_peers(lab.registrars[0], REGISTRAR_PORT), 5,
                        "the connection at the registrar") == [PROXY_BACKBONE]
        holder.stop()
        assert circuits(daemon) == 0

        # A real enrollment over NAT66.
        run = enroll(pledge, pki, out, "--serial", "nat-0", "--registrar", VIA_NAT66,
                     "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        (result,) = run.results
        assert result["proxy"] == VIA_NAT66 and result["method"] == "static"
        assert ldevid_verifies(pki, result["ldevid_path"])
        assert circuits(daemon) == 0, "NAT66 traffic must not take the circuit path"
        assert set(services.peers()) == {PROXY_BACKBONE}  # masqueraded, never the pledge

        # A pledge that addresses the registrar itself (the DNAT to the same address sets
        # no dnat status in conntrack) is relayed too, and masqueraded the same way.
        run = enroll(pledge, pki, out, "--serial", "direct-0", "--registrar", DIRECT,
                     "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        assert ldevid_verifies(pki, run.results[0]["ldevid_path"])
        assert set(services.peers()) == {PROXY_BACKBONE}
        # Counted like circuits: the held connection and both enrollments (each pledge-sim
        # run opens one or more connections), bytes both ways.
        wait_for(lambda: circuits(daemon, "nat66") >= 3, 5, "NAT66 flows counted")
        assert relayed_bytes(daemon, "upstream") > 2000
        assert relayed_bytes(daemon, "downstream") > 2000
        assert circuits(daemon) == 0

        # The same join port by link-local: the circuit mode serves it.
        run = enroll(pledge, pki, out, "--serial", "ll-0", "--registrar", VIA_CIRCUIT,
                     "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        assert ldevid_verifies(pki, run.results[0]["ldevid_path"])
        assert circuits(daemon) >= 2

        # SIGKILL: the table and forwarding stay behind; a new daemon replaces the table.
        daemon.kill()
        assert len(joinproxyd_tables(proxy)) == 1 and forwarding(proxy) == "1"
        daemon.start()
        wait_for(lambda: nat66_relaying(daemon), 10, "NAT66 relaying after the restart")
        tables = joinproxyd_tables(proxy)
        assert [(t["family"], t["name"]) for t in tables] == [("ip6", "joinproxyd")], tables
        assert "left by an earlier run" in daemon.log()
        assert daemon.ctl()["relays"]["nat66"]["forwarding"] == {"now": "1", "before": "0"}
        run = enroll(pledge, pki, out, "--serial", "nat-1", "--registrar", VIA_NAT66,
                     "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        assert ldevid_verifies(pki, run.results[0]["ldevid_path"])
        assert circuits(daemon) == 0  # a new daemon: its counters start at zero
        assert services.issued() == set(serials)

        # A clean stop gives everything back.
        assert daemon.stop() == 0  # SIGTERM
        assert joinproxyd_tables(proxy) == []
        assert forwarding(proxy) == "0"
    finally:
        print(services.logs())
        print(f"--- joinproxyd:\n{daemon.log()[-6000:]}")
