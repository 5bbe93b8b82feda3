"""The operator's join window through the real daemon, in namespaces (joinproxyctl window).

Closing it: a pledge's new circuit is refused and counted (drop reason window-closed), the
refusal is listed per pledge (joinproxyctl refusals), GRASP AN_Proxy floods stop on the join
link, and a circuit opened before keeps relaying both ways. Opening it again: new circuits
are relayed and the floods resume. All in one daemon process (same PID), no restart, no
reload. nat66: the same with a pledge's ULA flow, which the kernel stops translating; ipip:
the proxy NDP entry goes and comes back.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ipip_daemon import (
    REGISTRAR_LL,
    bpffs,
    ipip_config,
    ipip_maps,
    proxy_entries,
    relaying,
    show,
)

from joinproxyd import ctl as ctl_module
from lab import Host, Lab, LabProcess, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config, echo_registrar, talk
from lab.sniffers import GRASP_SNIFFER, heard

pytestmark = pytest.mark.netns
__all__ = ["bpffs"]  # a fixture, used by name

# A pledge in the middle of its enrollment: one line before the window closes, then, once
# the flag file exists, another one over the same connection.
CONVERSATION = """
import os, socket, sys, time
target, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((target, port), timeout=20)
f = s.makefile("rwb")
f.write(b"before\\n"); f.flush()
print(f.readline().decode().strip(), f.readline().decode().strip(), flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
f.write(b"after\\n"); f.flush()
print(f.readline().decode().strip(), flush=True)
"""

# A pledge holding a circuit open and silent until the proxy ends it.
HOLD = """
import socket
s = socket.create_connection(("fe80::1%eth0", 8443), timeout=600)
try:
    while s.recv(4096):
        pass
except OSError:
    pass
"""



@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2, join_ula=True), log_dir=tmp_path / "logs") as lab:
        yield lab


def ctl(daemon: ProxyDaemon, *args: str, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    return daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                            daemon.config["daemon"]["control_socket"], *args], check=check)


def ctl_json(daemon: ProxyDaemon, *args: str) -> Any:
    return json.loads(ctl(daemon, *args, "--json").stdout)


def floods(sniffer: LabProcess) -> list[float]:
    return [arrived for arrived, _ in heard(sniffer.log())]


def conversation(pledge: Host, target: str, flag: Path, name: str) -> LabProcess:
    process = pledge.spawn([PYTHON, "-c", CONVERSATION, target, "8443", str(flag)], name=name)
    wait_for(lambda: "r0 before" in process.log(), 10, "the first exchange")
    return process


def test_closing_and_opening_the_join_window_without_a_restart(lab: Lab,
                                                                tmp_path: Path) -> None:
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy")).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    pid = daemon.ctl()["pid"]
    sniffer = lab.pledges[1].spawn([PYTHON, "-c", GRASP_SNIFFER], name="grasp-sniffer")
    wait_for(lambda: len(floods(sniffer)) >= 1, 5, "AN_Proxy floods on the join link")
    assert daemon.sample("joinproxyd_join_window_open") == 1
    flag = tmp_path / "go-on"
    established = conversation(lab.pledges[0], "fe80::1%eth0", flag, "established")

    closing = ctl(daemon, "window", "close")
    closed_at = time.time()
    assert "join window: closed" in closing.stdout and "uid 0" in closing.stdout
    status = daemon.ctl()
    assert status["joining"] is False and status["join_window"]["state"] == "closed"
    assert status["joining_reason"].startswith("join window closed by uid 0")
    assert daemon.sample("joinproxyd_join_window_open") == 0
    assert "join window closed by uid 0" in daemon.log()

    # A new circuit is refused and counted; the refusal is listed per pledge.
    assert talk(lab.pledges[1], timeout=1) == ""
    wait_for(lambda: daemon.drops("circuit", "window-closed") >= 1, 5, "the refusal count")
    refusals = ctl_json(daemon, "refusals", "--pledge", "fe80::1:2")
    assert [(r["last_reason"], r["interface"], r["mode"]) for r in refusals] == [
        ("window-closed", "join0", "circuit")]
    assert refusals[0]["pledge"].startswith("fe80::1:2%")
    table = ctl(daemon, "refusals").stdout
    assert "window-closed" in table and "fe80::1:2" in table
    assert ctl_json(daemon, "refusals", "--pledge", "fe80::dead") == []

    # The circuit opened before goes on relaying both ways.
    flag.touch()
    wait_for(lambda: not established.alive(), 10, "the established pledge to finish")
    assert established.log().split() == ["r0", "before", "after"]

    # No flood while closed (one already in flight may land just after the close).
    time.sleep(3)  # three announce intervals
    assert [t for t in floods(sniffer) if t > closed_at + 0.5] == []
    assert daemon.ctl()["pid"] == pid

    opening = ctl(daemon, "window", "open")
    opened_at = time.time()
    assert "join window: open" in opening.stdout
    assert daemon.ctl()["joining"] is True
    assert talk(lab.pledges[1]).startswith("r0")
    wait_for(lambda: [t for t in floods(sniffer) if t > opened_at], 5,
             "AN_Proxy floods to resume")
    assert daemon.sample("joinproxyd_join_window_open") == 1
    assert "join window opened by uid 0" in daemon.log()
    assert daemon.ctl()["pid"] == pid and daemon.process is not None \
        and daemon.process.alive()
    # Refusals are remembered after the window opens; the count went up only once.
    assert daemon.drops("circuit", "window-closed") == 1
    daemon.stop()


def test_a_circuit_is_dropped_by_id_or_pledge_and_counted(lab: Lab, tmp_path: Path) -> None:
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(
        tmp_path / "proxy", limits={"idle_timeout": 60})).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    holders = [lab.pledges[i].spawn([PYTHON, "-c", HOLD], name=f"hold{i}") for i in range(2)]
    circuits = wait_for(lambda: len(c := daemon.ctl("circuits")) == 2 and c, 5,
                        "two circuits")
    first = next(c for c in circuits if c["pledge"].startswith("fe80::1:1%"))
    assert "id" in ctl(daemon, "circuits").stdout.splitlines()[0]
    dropped = ctl(daemon, "drop", str(first["id"]))
    assert f"dropped circuit {first['id']} fe80::1:1%join0" in dropped.stdout
    wait_for(lambda: not holders[0].alive(), 5, "the dropped pledge's connection to end")
    assert holders[1].alive()
    assert daemon.drops("circuit", "operator") == 1
    assert "dropped by uid 0" in daemon.log()
    # By pledge address, as an operator copies it (with brackets, without the scope).
    assert ctl_json(daemon, "drop", "[fe80::1:2]")[0]["pledge"] == "fe80::1:2%join0"
    wait_for(lambda: not holders[1].alive(), 5, "the second connection to end")
    assert daemon.drops("circuit", "operator") == 2
    # Nothing left to drop: one clear line, non-zero exit.
    missing = ctl(daemon, "drop", "fe80::1:2", check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("joinproxyctl: the daemon refused: drop: no open circuit")
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = ctl(daemon, "window", "ajar", check=False)
    assert bad.returncode == 2  # argparse: an invalid choice
    # Malformed arguments straight on the socket: refused in one line, the daemon serves on.
    socket_path = Path(daemon.config["daemon"]["control_socket"])
    for command, args, error in (
            ("drop", {"circuit": 5}, "drop: give a circuit id"),
            ("drop", {}, "drop: give a circuit id"),
            ("window", {"state": ["close"]}, "window: state must be open or close"),
            ("refusals", {"pledge": {"x": 1}}, "refusals: pledge must be an address")):
        with pytest.raises(ctl_module.CtlError, match=f"the daemon refused: {error}"):
            ctl_module.request(socket_path, command, args=args)
    assert daemon.ctl()["join_window"]["state"] == "open"
    daemon.stop()


def test_nat66_new_flows_stop_while_the_window_is_closed(lab: Lab, tmp_path: Path) -> None:
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy", join=[
        {"interfaces": ["join*"], "modes": ["nat66", "circuit"], "port": 8443}])).start()
    wait_for(lambda: daemon.ctl()["relays"]["nat66"]["relaying"], 10, "NAT66 relaying")
    ula = "fd4a:5044:0:100::1"

    def via_nat66(pledge: Host) -> str:
        done = pledge.run(["socat", "-t1", "-T1", "-", f"TCP6:[{ula}]:8443,connect-timeout=1"],
                          input="hi\n", check=False, timeout=15)
        return done.stdout

    assert via_nat66(lab.pledges[1]).startswith("r0")
    flag = tmp_path / "go-on"
    established = conversation(lab.pledges[0], ula, flag, "established-nat66")
    ctl(daemon, "window", "close")
    status = daemon.ctl()
    assert status["relays"]["nat66"]["relaying"] is False
    assert status["relays"]["nat66"]["window_closed"] is True
    assert via_nat66(lab.pledges[1]) == ""
    wait_for(lambda: daemon.drops("nat66", "window-closed") >= 1, 5, "the kernel's count")
    flag.touch()
    wait_for(lambda: not established.alive(), 10, "the established flow to finish")
    assert established.log().split() == ["r0", "before", "after"]
    ctl(daemon, "window", "open")
    assert daemon.ctl()["relays"]["nat66"]["relaying"] is True
    assert via_nat66(lab.pledges[1]).startswith("r0")
    daemon.stop()


def test_the_configured_window_applies_at_start_and_when_a_reload_changes_it(
        lab: Lab, tmp_path: Path) -> None:
    echo_registrar(lab.registrars[0], "r0")
    run_dir = tmp_path / "proxy"
    closed = base_config(run_dir, daemon={"join_window": "closed"})
    daemon = ProxyDaemon(lab, run_dir, closed).start()
    assert daemon.notify is not None
    wait_for(lambda: daemon.ctl()["registrars"] and daemon.ctl()["registrars"][0]["healthy"],
             10, "a healthy registrar")
    status = daemon.ctl()
    assert status["joining"] is False
    assert status["join_window"]["state"] == "closed"
    assert status["join_window"]["by"] == "configuration"
    assert daemon.sample("joinproxyd_join_window_open") == 0
    assert talk(lab.pledges[0], timeout=1) == ""
    wait_for(lambda: any("join window CLOSED by configuration" in m
                         for m in daemon.notify.poll()), 5, "STATUS= to say it")
    ctl(daemon, "window", "open")
    # A reload with the same key keeps what joinproxyctl set ...
    daemon.reload(closed)
    assert daemon.ctl()["join_window"]["state"] == "open"
    assert talk(lab.pledges[0]).startswith("r0")
    # ... and one that changes it applies it.
    reopened = {**closed, "daemon": {**closed["daemon"], "join_window": "open"}}
    daemon.reload(reopened)
    ctl(daemon, "window", "close")
    daemon.reload(reopened)
    assert daemon.ctl()["join_window"]["state"] == "closed"
    daemon.reload(closed)
    assert daemon.ctl()["join_window"]["state"] == "closed"
    daemon.reload(reopened)
    window = daemon.ctl()["join_window"]
    assert window == {**window, "state": "open", "by": "configuration reload"}
    daemon.stop()


def neighbour(pledge: Host, address: str) -> str:
    """The pledge's neighbour entry for `address` after it tried to reach it."""
    pledge.run(["ping", "-6", "-c1", "-W1", f"{address}%eth0"], check=False)
    return pledge.run(["ip", "-6", "neigh", "show", address, "dev", "eth0"]).stdout.strip()


def test_ipip_answers_no_neighbour_solicitation_while_the_window_is_closed(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """Stateless ipip: closing withdraws the proxy NDP entry (a pledge cannot resolve the
    registrar's address any more) and keeps the maps and programs (a pledge that resolved it
    is still relayed); opening puts the entry back. Same daemon, no restart."""
    pin_dir = bpffs / "joinproxyd"
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy",
                         ipip_config(tmp_path / "proxy", pin_dir, static=True))
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        pid = daemon.ctl()["pid"]
        assert "lladdr" in wait_for(lambda: "lladdr" in (n := neighbour(lab.pledges[0],
                                                                          REGISTRAR_LL)) and n,
                                    10, "pledge0 to resolve the registrar's address")
        maps = ipip_maps(pin_dir)
        assert maps["jp_join_cfg"]

        ctl(daemon, "window", "close")
        assert proxy_entries(lab.proxy) == ""
        ipip = daemon.ctl()["relays"]["ipip"]
        assert ipip["relaying"] is True and ipip["window_open"] is False
        assert [link["proxy_ndp"] for link in ipip["interfaces"]] == [False]
        assert ipip_maps(pin_dir) == maps  # what is established is still relayed
        time.sleep(3)  # longer than the kernel's proxy delay, three solicitations
        assert "lladdr" not in neighbour(lab.pledges[1], REGISTRAR_LL)

        ctl(daemon, "window", "open")
        wait_for(lambda: relaying(daemon), 10, "the proxy entry back")
        assert f"{REGISTRAR_LL} dev join0 proxy" in proxy_entries(lab.proxy)
        lab.pledges[1].run(["ip", "-6", "neigh", "flush", "dev", "eth0"])
        wait_for(lambda: "lladdr" in neighbour(lab.pledges[1], REGISTRAR_LL), 10,
                 "pledge1 to resolve the registrar's address")
        assert daemon.ctl()["pid"] == pid
        assert daemon.stop() == 0
    finally:
        show(daemon)


def mdns_proxies(pledge: Host) -> list[dict[str, Any]]:
    done = pledge.run([PYTHON, "-m", "pledge_sim.cli", "discover", "--methods", "mdns",
                       "--timeout", "2", "--json"], check=False, timeout=30)
    if done.returncode != 0:
        return []
    return json.loads(done.stdout)["candidates"]


def test_the_mdns_advertisement_is_withdrawn_and_comes_back(lab: Lab, tmp_path: Path) -> None:
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(
        tmp_path / "proxy", announce={"interval": 1, "mdns": True})).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    wait_for(lambda: mdns_proxies(lab.pledges[0]), 15, "the proxy's _brski-proxy._tcp")
    ctl(daemon, "window", "close")
    wait_for(lambda: not mdns_proxies(lab.pledges[1]), 10, "the advertisement withdrawn")
    ctl(daemon, "window", "open")
    found = wait_for(lambda: mdns_proxies(lab.pledges[1]), 15, "the advertisement back")
    assert {c["method"] for c in found} == {"mdns"}
    daemon.stop()
