"""BRSKI enrollments through joinproxyd's stateless IPIP mode (issue 6 acceptance), all real.

    pledge0 ── [join0] ─┐                                  ┌ registrar0: brski-registrar --ipip
    pledge1 ── [join1] ─┴ proxy (joinproxyd, ipip)   bb0 ─┘  (fd4a:5044::100, listens [::]:8443)
                fe80::1 on both,                   fd4a:5044::1:<ifindex of join0>
                ND answered for fe80::1234         fd4a:5044::1:<ifindex of join1>

The registrar terminates IPIP itself (a TUN device per proxy, registrar/ipip.py) and announces
``[O_IPv6_LOCATOR, fe80::1234, 41|98, nil]`` next to its TCP locator, initiator
fd4a:5044::100 (or is configured statically). The pledges learn the proxy's AN_Proxy flood,
whose locator is the registrar's link-local address, and run pledge-sim against it: TLS
between pledge and registrar, carried inside IPv6-in-IPv6 between proxy and registrar, with no
socket of the daemon's in between.

Checked: the pledges' own reports and LDevIDs; a tshark capture on the registrar's link shows
the outer next header (41, or 98 when configured) from the proxy's per-link backbone address
(two join links, two addresses: how each reply finds its link with no state in the proxy);
the proxy holds no per-pledge state (the IPIP maps are byte-for-byte the same before and after
the enrollments, and there are no circuits); the daemon's status and metrics count the
encapsulations; a clean stop leaves no program, proxy entry, address or pin behind.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from joinproxyd.daemon import XDP_RECHECK_SECONDS
from joinproxyd.kernel import ndp
from lab import Host, Lab, Topology, wait_for
from lab.brski_services import (
    REGISTRAR_PORT,
    Services,
    enroll,
    enroll_each,
    ldevid_verifies,
    make_pki,
)
from lab.proxyd import ProxyDaemon, base_config, echo_registrar

pytestmark = pytest.mark.netns

REGISTRAR_LL = "fe80::1234"  # the registrar's IPIP link-local address, announced to pledges
REGISTRAR = "fd4a:5044::100"  # its backbone address: the GRASP initiator, the outer dst
BACKBONE_PREFIX = "fd4a:5044::1:0/112"  # the proxy's backbone address per join link
IPIP_MAPS = ("jp_join_cfg", "jp_bb_addrs", "jp_registrars")


# -- helpers shared by the other ipip/guard test modules -------------------------------------

@pytest.fixture
def bpffs(as_root: None, tmp_path: Path) -> Iterator[Path]:
    """A bpf filesystem of the test's own; the daemon pins its maps in <it>/joinproxyd."""
    mnt = tmp_path / "bpffs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def ifindex(host: Host, ifname: str) -> int:
    (link,) = json.loads(host.run(["ip", "-j", "link", "show", ifname]).stdout)
    return int(link["ifindex"])


def backbone_address(host: Host, join: str = "join0") -> str:
    """The address the daemon derives for a join link: the prefix plus its ifindex."""
    import ipaddress

    return str(ipaddress.IPv6Network(BACKBONE_PREFIX).network_address + ifindex(host, join))


def map_dump(pin_dir: Path, name: str) -> list[dict[str, Any]]:
    done = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin_dir / name)],
                          capture_output=True, text=True, check=True, timeout=30)
    return sorted(json.loads(done.stdout), key=json.dumps)


def ipip_maps(pin_dir: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: map_dump(pin_dir, name) for name in IPIP_MAPS}


def prog_ids(host: Host) -> set[int]:
    """Ids of every XDP and tc program attached in the host's namespace (bpftool net)."""
    net = bpftool_net(host)
    return {int(entry["id"]) for entry in net["xdp"] + net["tc"]}


def xdp_progs(host: Host, dev: str) -> list[str]:
    """Names of the XDP programs on dev, from `ip -d link`."""
    (link,) = json.loads(host.run(["ip", "-j", "-d", "link", "show", "dev", dev]).stdout)
    return [a["prog"]["name"] for a in (link.get("xdp") or {}).get("attached", [])]


def tc_progs(host: Host, dev: str) -> list[str]:
    """Names of the bpf filters on dev's clsact ingress, from `tc filter show`."""
    out = host.run(["tc", "-j", "filter", "show", "dev", dev, "ingress"], check=False).stdout
    return [f["options"]["prog"]["name"] for f in json.loads(out or "[]") if "options" in f]


def bpftool_net(host: Host) -> dict[str, list[dict[str, Any]]]:
    return json.loads(host.run(["bpftool", "-j", "net"]).stdout)[0]


def proxy_entries(host: Host) -> str:
    return host.run(["ip", "-6", "neigh", "show", "proxy"]).stdout.strip()


def ipip_services(lab: Lab, pki: Path, work: Path, *, grasp: bool = True) -> Services:
    return Services(lab.registrars[0], pki, work,
                    registrar_listen=[f"[::]:{REGISTRAR_PORT}"], announce_interfaces=["eth0"],
                    grasp=grasp, mdns=False,
                    ipip={"link_local": REGISTRAR_LL, "address": REGISTRAR,
                          "protocols": [41, 98], "proxies": [BACKBONE_PREFIX]})


def ipip_config(run_dir: Path, pin_dir: Path, *, protocol: int = 41, static: bool = False,
                guard: dict[str, Any] | None = None, xdp: str | None = None) -> dict[str, Any]:
    if static:
        registrars: dict[str, Any] = {
            "discovery": ["static"],
            "static": [{"address": REGISTRAR, "port": REGISTRAR_PORT, "preference": 10,
                        "ipip": {"link_local": REGISTRAR_LL, "protocols": [41, 98]}}]}
    else:
        registrars = {"discovery": ["grasp"], "static": []}
    return base_config(
        run_dir, daemon={"bpf_pin_dir": str(pin_dir)},
        join=[{"interfaces": ["join*"], "modes": ["ipip"], "port": REGISTRAR_PORT}],
        registrars=registrars,
        ipip={"protocol": protocol, "backbone_prefix": BACKBONE_PREFIX,
              **({"xdp": xdp} if xdp is not None else {})},
        guard=guard or {"enabled": True, "rate": 100, "burst": 200},
        announce={"grasp": True, "mdns": False})


def relaying(daemon: ProxyDaemon) -> dict[str, Any] | None:
    """The status once the ipip mode relays and every link is programmed (the control socket
    answers between the steps of a reconcile, so 'relaying' alone can come first)."""
    status = daemon.ctl()
    ipip = status["relays"].get("ipip", {})
    links = ipip.get("interfaces", [])
    done = ipip.get("relaying") and status["interfaces"] and links \
        and all(link["proxy_ndp"] for link in links)
    return status if done else None


def show(*parts: Services | ProxyDaemon | Any) -> None:
    for part in parts:
        if isinstance(part, Services):
            print(part.logs())
        elif isinstance(part, ProxyDaemon):
            print(f"--- joinproxyd:\n{part.log()[-8000:]}")
        elif part is not None:
            print(f"--- {part.name}:\n{part.log()[-3000:]}")


# -- the acceptance test ----------------------------------------------------------------------

@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


@pytest.fixture
def two_links(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    """pledge0 on join0, pledge1 on join1."""
    with Lab(Topology(pledges=2, registrars=1, join_links=2),
             log_dir=tmp_path / "logs") as lab:
        yield lab


def knob(host: Host, key: str) -> str:
    return host.run(["sysctl", "-n", key]).stdout.strip()


@pytest.mark.parametrize(("protocol", "static"), [(41, False), (98, True)],
                         ids=["41-grasp", "98-static"])
def test_pledges_enroll_over_ipip_and_the_proxy_keeps_no_state(
        two_links: Lab, bpffs: Path, tmp_path: Path, protocol: int, static: bool) -> None:
    lab = two_links
    serials = [f"ipip{protocol}-{i}" for i in range(len(lab.pledges))]
    pki = make_pki(tmp_path / "pki", serials)
    pin_dir = bpffs / "joinproxyd"
    services = ipip_services(lab, pki, tmp_path / "r0", grasp=not static)
    daemon = ProxyDaemon(lab, tmp_path / "proxy",
                         ipip_config(tmp_path / "proxy", pin_dir, protocol=protocol,
                                     static=static))
    capture = None
    registrar_host = lab.registrars[0]
    try:
        services.start()
        daemon.start()
        status = wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        joins = ("join0", "join1")
        outer = {join: backbone_address(lab.proxy, join) for join in joins}
        ipip = status["relays"]["ipip"]
        assert ipip["registrar"] == {"link_local": REGISTRAR_LL, "address": REGISTRAR,
                                     "protocols": [41, 98], "ports": [REGISTRAR_PORT]}
        assert ipip["interfaces"] == [{"interface": join, "index": ifindex(lab.proxy, join),
                                       "backbone_address": outer[join], "proxy_ndp": True}
                                      for join in joins]
        assert ipip["protocol"] == protocol
        assert (next(r for r in status["registrars"] if r["active"])["source"]
                == ("static" if static else "grasp"))
        # each link announces the registrar's address and port; the proxy answers ND for it
        assert [(i["port"], i["announce"]) for i in status["interfaces"]] == \
            [(REGISTRAR_PORT, [REGISTRAR_LL])] * 2
        bb0 = lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        for join in joins:
            assert f"{REGISTRAR_LL} dev {join} proxy" in proxy_entries(lab.proxy)
            assert f"{outer[join]}/128" in bb0
            assert xdp_progs(lab.proxy, join) == ["jp_guard"]
            assert tc_progs(lab.proxy, join) == ["jp_tc_join"]
            assert knob(lab.proxy, f"net.ipv6.conf.{join}.proxy_ndp") == "1"
        assert tc_progs(lab.proxy, "bb0") == ["jp_tc_backbone"]
        assert knob(lab.proxy, "net.ipv6.conf.all.forwarding") == "0", "the proxy routes nothing"
        maps_before = ipip_maps(pin_dir)
        assert len(maps_before["jp_join_cfg"]) == 2 and len(maps_before["jp_bb_addrs"]) == 2
        assert len(maps_before["jp_registrars"]) == 1

        capture = registrar_host.spawn(
            ["tshark", "-i", "eth0", "-n", "-l", "-f", f"ip6 proto {protocol}",
             "-T", "fields", "-e", "ipv6.nxt", "-e", "ipv6.src", "-e", "ipv6.dst",
             "-c", "10", "-a", "duration:60"], name="tshark")
        wait_for(lambda: "Capturing on" in capture.log(), 15, "tshark to start")

        results = enroll_each(lab.pledges, pki, tmp_path / "out", serials,
                              "--discover", "grasp", "--deadline", "40")

        assert sorted(r["serial"] for r in results) == serials
        for r in results:
            assert r["ok"], json.dumps(r, indent=1)
            # the pledge connected to the registrar's own link-local address, via the proxy
            assert r["proxy"] == f"[{REGISTRAR_LL}%eth0]:{REGISTRAR_PORT}", r
            assert ldevid_verifies(pki, r["ldevid_path"]), r["ldevid_path"]
        assert services.issued() == set(serials)
        # curl, an independent TLS client with a pledge's IDevID, through the encapsulation
        idevid = pki / "manufacturer" / "idevid"
        done = lab.pledges[0].run(
            ["curl", "-sS", "-k", "--max-time", "20", "--cert", str(idevid / f"{serials[0]}.crt"),
             "--key", str(idevid / f"{serials[0]}.key"), "-o", "/dev/null", "-w",
             "%{http_code} %{size_download}",
             f"https://[{REGISTRAR_LL}%eth0]:{REGISTRAR_PORT}/.well-known/est/cacerts"],
            check=False)
        assert done.stdout.split()[:1] == ["200"] and int(done.stdout.split()[1]) > 100, (
            done.stdout, done.stderr)
        # The registrar saw the pledges' own link-local addresses (no proxy in the TLS path).
        peers = set(services.peers())
        assert peers and all(p.startswith("fe80::") for p in peers), peers

        capture.popen.wait(70)
        lines = [line.split("\t") for line in capture.log().splitlines()
                 if line[:1].isdigit() and "\t" in line]
        assert len(lines) == 10, capture.log()
        for nxt, src, dst in lines:
            # the outer header first: next header 41 (tshark then decodes the inner IPv6
            # header too) or 98
            assert nxt.split(",")[0] == str(protocol), (nxt, src, dst)
            ends = {src.split(",")[0], dst.split(",")[0]}
            assert REGISTRAR in ends and len(ends & set(outer.values())) == 1, ends
        # each join link is its own scope at the registrar: one TUN device per backbone address
        links = json.loads(registrar_host.run(["ip", "-j", "link", "show"]).stdout)
        assert len([x for x in links if x["ifname"].startswith("ipip-")]) == 2, links

        # Stateless: the same maps, no circuits, nothing per pledge.
        assert ipip_maps(pin_dir) == maps_before
        assert daemon.ctl("circuits") == []
        counters = {(s[0], dict(s[1]).get("program"), dict(s[1]).get("action")): v
                    for s, v in daemon.metrics().items()
                    if s[0] == "joinproxyd_bpf_packets_total"}
        assert counters[("joinproxyd_bpf_packets_total", "jp_tc_join", "encap")] > 10
        assert counters[("joinproxyd_bpf_packets_total", "jp_tc_backbone", "decap")] > 10
        assert counters[("joinproxyd_bpf_packets_total", "jp_guard", "allow")] > 10
        # No circuit or byte series for a mode that has no flows: a zero kept for ever would
        # say nothing was relayed.
        flow_series = [(s[0], dict(s[1])) for s in daemon.metrics()
                       if s[0] in ("joinproxyd_circuits_total", "joinproxyd_relayed_bytes_total")]
        assert not [x for x in flow_series if x[1].get("mode") == "ipip"], flow_series
        assert daemon.drops("ipip", "no-registrar") == 0
        assert daemon.drops("guard", "rate-limit") == 0
        text = lab.proxy.run([sys_python(), "-m", "joinproxyd.ctl", "--socket",
                              daemon.config["daemon"]["control_socket"], "status"]).stdout
        assert "jp_tc_join: " in text and "encap " in text, text

        assert daemon.stop() == 0
        # A clean stop leaves nothing: programs, proxy entries, addresses, pins, knobs.
        net = bpftool_net(lab.proxy)
        assert net["xdp"] == [] and net["tc"] == [], net
        assert proxy_entries(lab.proxy) == ""
        bb0 = lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert not any(address in bb0 for address in outer.values())
        assert knob(lab.proxy, "net.ipv6.conf.join0.proxy_ndp") == "0"
        assert knob(lab.proxy, "net.ipv6.conf.join0.forwarding") == "0"
        assert not pin_dir.exists()
    finally:
        show(services, daemon, capture)


def sys_python() -> str:
    import sys

    return sys.executable


# -- kill -9 and restart ------------------------------------------------------------------------

def hooks(host: Host) -> dict[str, list[str]]:
    """Every program of ours per hook, as an operator would list them."""
    return {"join0 xdp": xdp_progs(host, "join0"), "join0 tc": tc_progs(host, "join0"),
            "bb0 xdp": xdp_progs(host, "bb0"), "bb0 tc": tc_progs(host, "bb0")}


ONE_EACH = {"join0 xdp": ["jp_guard"], "join0 tc": ["jp_tc_join"], "bb0 xdp": [],
            "bb0 tc": ["jp_tc_backbone"]}


def test_kill_9_and_restart_leaves_one_program_per_hook_and_enrollment_works(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["again-0", "again-1"])
    pin_dir = bpffs / "joinproxyd"
    services = ipip_services(lab, pki, tmp_path / "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", ipip_config(tmp_path / "proxy", pin_dir))
    try:
        services.start()
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        assert hooks(lab.proxy) == ONE_EACH
        first_ids = prog_ids(lab.proxy)
        map_ids = {p.name: p.stat().st_ino for p in pin_dir.iterdir()}
        outer_src = backbone_address(lab.proxy)

        daemon.kill()
        # A killed daemon's data plane keeps working: programs, maps, entries, address.
        assert hooks(lab.proxy) == ONE_EACH
        assert f"{REGISTRAR_LL} dev join0 proxy" in proxy_entries(lab.proxy)
        run = enroll(lab.pledges[0], pki, tmp_path / "out", "--serial", "again-0",
                     "--registrar", f"[{REGISTRAR_LL}%eth0]:{REGISTRAR_PORT}",
                     "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]

        daemon.start()
        status = wait_for(lambda: relaying(daemon), 15, "the restarted ipip mode relaying")
        # Exactly one program of ours per hook, this run's (new ids), and the pinned maps
        # adopted (the same files).
        assert hooks(lab.proxy) == ONE_EACH
        net = bpftool_net(lab.proxy)
        assert len(net["xdp"]) == 1 and len(net["tc"]) == 2, net
        attached = {a["program"]: a for a in status["bpf"]["attached"]}
        assert set(attached) == {"jp_guard", "jp_tc_join", "jp_tc_backbone"}
        assert prog_ids(lab.proxy).isdisjoint(first_ids), "the killed run's were replaced"
        assert {p.name: p.stat().st_ino for p in pin_dir.iterdir()
                if p.name in map_ids and not p.name.startswith("prog_")} == \
            {k: v for k, v in map_ids.items() if not k.startswith("prog_")}
        assert proxy_entries(lab.proxy).count(REGISTRAR_LL) == 1
        assert lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout.count(
            outer_src + "/128") == 1

        run = enroll(lab.pledges[1], pki, tmp_path / "out", "--serial", "again-1",
                     "--discover", "grasp", "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        assert services.issued() == {"again-0", "again-1"}
        assert daemon.stop() == 0
        assert hooks(lab.proxy) == {k: [] for k in ONE_EACH}
        assert proxy_entries(lab.proxy) == ""
    finally:
        show(services, daemon)


# -- the join links' sysctls across kill -9 ----------------------------------------------------

# An operator's values, none of them what the ipip mode sets (proxy_delay: the kernel keeps
# it in jiffies, 40 survives the conversion exactly).
OPERATOR_KNOBS = {"proxy_ndp": "0", "forwarding": "0", "proxy_delay": "40"}


def knob_key(link: str, name: str) -> str:
    return f"net.ipv6.{'neigh' if name == 'proxy_delay' else 'conf'}.{link}.{name}"


def link_knobs(host: Host, link: str) -> dict[str, str]:
    return {name: knob(host, knob_key(link, name)) for name in OPERATOR_KNOBS}


def set_link_knobs(host: Host, link: str, values: dict[str, str]) -> None:
    host.run(["sysctl", "-qw", *(f"{knob_key(link, k)}={v}" for k, v in values.items())])


def recorded(path: Path) -> dict[str, Any]:
    return {name: entry["knobs"] for name, entry in
            json.loads(path.read_text())["links"].items()}


def test_kill_9_and_restart_restores_the_join_links_sysctls_from_before_the_first_run(
        two_links: Lab, bpffs: Path, tmp_path: Path) -> None:
    """The killed run leaves proxy_ndp/forwarding at 1; the restarted one must not take those
    for the operator's. join1 disappears while no daemon runs: it is forgotten, not written."""
    lab = two_links
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    record = run_dir / "ipip-knobs.json"
    for join in ("join0", "join1"):
        set_link_knobs(lab.proxy, join, OPERATOR_KNOBS)
    daemon = ProxyDaemon(lab, run_dir, ipip_config(run_dir, pin_dir, static=True))
    echo_registrar(lab.registrars[0], "r0")
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        for join in ("join0", "join1"):
            assert link_knobs(lab.proxy, join) == ndp.PROXY_KNOBS
        assert recorded(record) == {"join0": OPERATOR_KNOBS, "join1": OPERATOR_KNOBS}
        join0 = ifindex(lab.proxy, "join0")
        assert json.loads(record.read_text())["links"]["join0"]["ifindex"] == join0

        daemon.kill()
        assert link_knobs(lab.proxy, "join0") == ndp.PROXY_KNOBS, "what the killed run left"
        lab.remove_join_link("join1")

        daemon.start()
        status = wait_for(lambda: relaying(daemon), 15, "the restarted ipip mode relaying")
        assert [i["name"] for i in status["interfaces"]] == ["join0"]
        ipip = status["relays"]["ipip"]
        assert ipip["knobs_before"] == {"join0": OPERATOR_KNOBS}
        assert ipip["knob_record"] == {"path": str(record), "error": None}
        assert recorded(record) == {"join0": OPERATOR_KNOBS}, "not the 1s the killed run set"
        assert link_knobs(lab.proxy, "join0") == ndp.PROXY_KNOBS
        assert "join1: gone since an earlier run recorded its sysctls" in daemon.log()

        assert daemon.stop() == 0
        assert link_knobs(lab.proxy, "join0") == OPERATOR_KNOBS
        assert not record.exists(), "removed once everything is restored"
        assert sorted(p.name for p in run_dir.iterdir() if "knobs" in p.name) == []
    finally:
        show(daemon)


def test_a_corrupt_knob_record_is_logged_and_the_daemon_serves_on(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    run_dir.mkdir()
    record = run_dir / "ipip-knobs.json"
    record.write_text('{"version": 1, "links": {"join0": {"ifindex": ')
    set_link_knobs(lab.proxy, "join0", OPERATOR_KNOBS)
    daemon = ProxyDaemon(lab, run_dir, ipip_config(run_dir, pin_dir, static=True))
    echo_registrar(lab.registrars[0], "r0")
    try:
        daemon.start()
        status = wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        assert status["relays"]["ipip"]["error"] is None
        assert f"the record of the join links' sysctls from before an earlier run, {record}, " \
               "not JSON" in daemon.log()
        assert (run_dir / "ipip-knobs.json.corrupt").exists()
        assert recorded(record) == {"join0": OPERATOR_KNOBS}, "a good record replaces it"
        assert daemon.stop() == 0
        assert link_knobs(lab.proxy, "join0") == OPERATOR_KNOBS
        assert not record.exists()
    finally:
        show(daemon)


def test_a_killed_ipip_run_is_cleaned_up_by_a_start_without_bpf(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """kill -9, then a circuit-only configuration with the guard off: the next start removes
    the programs, pins, proxy entries and backbone address the killed run left, restores the
    join link's sysctls it changed, and loads no BPF of its own."""
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    set_link_knobs(lab.proxy, "join0", OPERATOR_KNOBS)
    daemon = ProxyDaemon(lab, run_dir, ipip_config(run_dir, pin_dir, static=True))
    echo_registrar(lab.registrars[0], "r0")  # something for the health probe to reach
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        outer_src = backbone_address(lab.proxy)
        daemon.kill()
        assert hooks(lab.proxy) == ONE_EACH and pin_dir.exists()
        assert link_knobs(lab.proxy, "join0") == ndp.PROXY_KNOBS

        daemon.write_config(base_config(run_dir, daemon={"bpf_pin_dir": str(pin_dir)},
                                        guard={"enabled": False}))
        daemon.start()
        assert hooks(lab.proxy) == {k: [] for k in ONE_EACH}
        assert not pin_dir.exists()
        assert proxy_entries(lab.proxy) == ""
        assert outer_src not in lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert daemon.ctl()["bpf"] is None
        # the join link's sysctls from before the killed run, from its record
        assert link_knobs(lab.proxy, "join0") == OPERATOR_KNOBS
        assert not (run_dir / "ipip-knobs.json").exists()
        assert daemon.stop() == 0
    finally:
        show(daemon)


def test_a_restart_that_serves_no_link_removes_the_killed_runs_entries(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """kill -9, then ipip still configured but no link to serve (the join pattern matches
    nothing now): the proxy neighbour entry and backbone address the killed run left are
    removed at the first reconcile, not kept until some link is served again."""
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    config = ipip_config(run_dir, pin_dir, static=True)
    daemon = ProxyDaemon(lab, run_dir, config)
    echo_registrar(lab.registrars[0], "r0")
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        outer_src = backbone_address(lab.proxy)
        daemon.kill()
        assert f"{REGISTRAR_LL} dev join0 proxy" in proxy_entries(lab.proxy)

        config["join"][0]["interfaces"] = ["nolink*"]
        daemon.write_config(config)
        daemon.start()
        wait_for(lambda: proxy_entries(lab.proxy) == "" or None, 10,
                 "the killed run's proxy entry removed")
        assert outer_src not in lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert daemon.stop() == 0
    finally:
        show(daemon)


def test_joining_follows_the_registrar(lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """Habit 14: without a healthy registrar the link stops answering ND for the registrar's
    address and the maps hold nothing; when it answers again, both come back."""
    pki = make_pki(tmp_path / "pki", ["back-0"])
    pin_dir = bpffs / "joinproxyd"
    services = ipip_services(lab, pki, tmp_path / "r0", grasp=False)
    daemon = ProxyDaemon(lab, tmp_path / "proxy",
                         ipip_config(tmp_path / "proxy", pin_dir, static=True))
    try:
        services.start()
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        assert proxy_entries(lab.proxy)

        services.stop("registrar")
        wait_for(lambda: not daemon.ctl()["relays"]["ipip"]["relaying"], 10, "relaying to stop")
        assert proxy_entries(lab.proxy) == ""
        assert ipip_maps(pin_dir) == {name: [] for name in IPIP_MAPS}
        outer_src = backbone_address(lab.proxy)
        assert outer_src not in lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert daemon.ctl()["relays"]["ipip"]["refusal"] == "no registrar is known"
        # still attached (they pass everything untouched), and still exactly once
        assert hooks(lab.proxy) == ONE_EACH

        services.start("registrar")
        wait_for(lambda: relaying(daemon), 15, "relaying again")
        assert f"{REGISTRAR_LL} dev join0 proxy" in proxy_entries(lab.proxy)
        assert outer_src in lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        run = enroll(lab.pledges[0], pki, tmp_path / "out", "--serial", "back-0",
                     "--discover", "grasp", "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        assert daemon.stop() == 0
    finally:
        show(services, daemon)


# -- the XDP fast path -----------------------------------------------------------------------------

def bpf_counters(daemon: ProxyDaemon) -> dict[tuple[str, str], float]:
    return {(dict(labels)["program"], dict(labels)["action"]): value
            for (name, labels), value in daemon.metrics().items()
            if name == "joinproxyd_bpf_packets_total"}


def backbone_takes_xdp_frames(lab: Lab, on: bool = True) -> None:
    """GRO on bb0's peer (in the backbone switch) gives it the NAPI that makes bb0 advertise
    ndo-xmit; forwarding on bb0 lets bpf_fib_lookup find the XDP program its next hop."""
    lab.proxy.run(["ip", "netns", "exec", lab.ns_name("bb"), "ethtool", "-K", "proxy", "gro",
                   "on" if on else "off"])


def xdp_status(daemon: ProxyDaemon) -> dict[str, Any]:
    return daemon.ctl()["relays"]["ipip"]["xdp"]


@pytest.mark.parametrize("guard", [True, False], ids=["guard-on", "guard-off-dispatcher"])
def test_pledges_enroll_through_the_xdp_fast_path(lab: Lab, bpffs: Path, tmp_path: Path,
                                                   guard: bool) -> None:
    """ipip.xdp = "on" with a backbone that takes the frames: the XDP encapsulation carries
    the pledges' packets (its encap counter), the tc program stays as the fallback. With the
    guard off, its program is attached anyway, limiting nothing, as the dispatcher."""
    serials = [f"xdp-{guard}-{i}" for i in range(len(lab.pledges))]
    pki = make_pki(tmp_path / "pki", serials)
    pin_dir = bpffs / "joinproxyd"
    backbone_takes_xdp_frames(lab)
    lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1"])
    services = ipip_services(lab, pki, tmp_path / "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", ipip_config(
        tmp_path / "proxy", pin_dir, xdp="on",
        guard=None if guard else {"enabled": False}))
    try:
        services.start()
        daemon.start()
        status = wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        xdp = status["relays"]["ipip"]["xdp"]
        assert (xdp["setting"], xdp["active"], xdp["why"]) == ("on", True, "ipip.xdp is on")
        assert "ndo-xmit" in xdp["backbone"]["xdp_features"]
        assert xdp["backbone"]["forwarding"] == "1"
        assert status["bpf"]["ipip_xdp"] is True
        assert status["guard"]["enabled"] is guard
        assert status["guard"]["interfaces"] == {"join0": "native"}, "attached either way"
        assert hooks(lab.proxy) == ONE_EACH
        assert (status["bpf"]["guard"]["rate_pps"] == 0) is (not guard), "off: limits nothing"
        if not guard:
            assert "join-port guard's program on join0 (XDP native) as the ipip fast path's " \
                   "dispatcher" in daemon.log()
        before = bpf_counters(daemon)

        results = enroll_each(lab.pledges, pki, tmp_path / "out", serials,
                              "--discover", "grasp", "--deadline", "40")
        for r in results:
            assert r["ok"], json.dumps(r, indent=1)
            assert ldevid_verifies(pki, r["ldevid_path"]), r["ldevid_path"]
        assert services.issued() == set(serials)

        after = bpf_counters(daemon)
        encap = after[("jp_xdp_join", "encap")] - before.get(("jp_xdp_join", "encap"), 0)
        assert encap > 10, after
        # tc encapsulated only what the XDP program handed on to it
        fallback = after[("jp_xdp_join", "fallback")] - before.get(("jp_xdp_join", "fallback"), 0)
        assert after[("jp_tc_join", "encap")] - before.get(("jp_tc_join", "encap"), 0) \
            <= fallback, after
        # the guard's verdict comes first: with it off, every packet is a plain pass
        assert after[("jp_guard", "pass" if not guard else "allow")] > 10, after
        assert after[("jp_tc_backbone", "decap")] > 10, after
        assert daemon.drops("ipip", "send-error") == 0
        assert daemon.drops("guard", "rate-limit") == 0

        assert daemon.stop() == 0
        assert hooks(lab.proxy) == {k: [] for k in ONE_EACH}
        assert not pin_dir.exists()
    finally:
        show(services, daemon)


def test_auto_follows_what_the_backbone_can_take(lab: Lab, bpffs: Path,
                                                 tmp_path: Path) -> None:
    """auto: off while bb0 takes no redirected frames, off while it has no forwarding, on
    when it has both (decided again at each reconcile, which a reload makes, and every few
    seconds when only the backbone changed); "off" turns it
    off; a restart after kill -9 decides afresh instead of keeping the pinned fast path."""
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    config = ipip_config(run_dir, pin_dir, static=True)  # xdp not given: auto
    daemon = ProxyDaemon(lab, run_dir, config)
    echo_registrar(lab.registrars[0], "r0")
    backbone_takes_xdp_frames(lab, False)
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        xdp = xdp_status(daemon)
        assert (xdp["setting"], xdp["active"]) == ("auto", False)
        assert "bb0 does not take XDP-redirected frames" in xdp["why"], xdp
        assert "ndo-xmit" not in xdp["backbone"]["xdp_features"]
        assert daemon.ctl()["bpf"]["ipip_xdp"] is False

        backbone_takes_xdp_frames(lab)
        daemon.reload(config)
        xdp = wait_for(lambda: (x := xdp_status(daemon))["backbone"]["xdp_features"]
                       and "ndo-xmit" in x["backbone"]["xdp_features"] and x, 10,
                       "the backbone's new flags")
        assert not xdp["active"]
        assert "net.ipv6.conf.bb0.forwarding is 0" in xdp["why"], xdp

        # no reload now: the daemon looks at the backbone again every few seconds
        lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1"])
        xdp = wait_for(lambda: (x := xdp_status(daemon))["active"] and x,
                       XDP_RECHECK_SECONDS * 3, "auto turning on by itself")
        assert "the backbone's XDP flags or forwarding changed; reconciling" in daemon.log()
        assert xdp["why"] == "ipip.xdp is auto, and bb0 takes XDP-redirected frames " \
                             "(ndo-xmit) with forwarding on"
        assert daemon.ctl()["bpf"]["ipip_xdp"] is True
        assert "ipip: XDP fast path on: ipip.xdp is auto" in daemon.log()

        off = ipip_config(run_dir, pin_dir, static=True, xdp="off")
        daemon.reload(off)
        assert xdp_status(daemon)["active"] is False
        assert daemon.ctl()["bpf"]["ipip_xdp"] is False
        daemon.reload(config)
        assert xdp_status(daemon)["active"] is True

        # kill -9 with the fast path on (it stays in the pinned program array), then a start
        # told "off": this run's decision wins over what it adopted
        daemon.kill()
        daemon.write_config(off)
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the restarted ipip mode relaying")
        assert xdp_status(daemon)["active"] is False
        assert daemon.ctl()["bpf"]["ipip_xdp"] is False
        assert daemon.stop() == 0
    finally:
        show(daemon)
