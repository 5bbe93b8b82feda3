"""`joinproxyctl trace` (issue 19 item 4) against the real daemon, in a lab.

    pledge0 ── [join0] ── proxy: jp_guard (XDP) + circuit ── bb0 ── registrar0 (a TCP listener)

One trace of pledge0 shows the three kinds of drop an operator asks about: the guard's
(rate-limit, from its per-source buckets: XDP drops never reach kfree_skb), a full table
(the circuit limit per pledge: a user-space refusal, from the refusal log) and the kernel's
own (UDP to a port nobody listens on: skb_drop_reason NO_SOCKET, from skb:kfree_skb). A trace
of another address shows none of them. While nobody traces, the daemon holds no tracing
program; after Ctrl-C it holds none again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ipip_daemon import bpffs

from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config

pytestmark = pytest.mark.netns
__all__ = ["bpffs"]

PLEDGE = "fe80::1:1"  # pledge0's link-local address (lab/topology.py)
JOIN_PORT = 8443

# A registrar that accepts TCP and holds the connections (the circuit relay's far end).
LISTENER = """
import socket, time
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("fd4a:5044::100", 8443)); s.listen(64)
held = []
while True:
    held.append(s.accept()[0])
"""

# pledge0: UDP datagrams to a port (argv[1]) of the proxy, argv[2] of them.
UDP = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
dst = ("fe80::1", int(sys.argv[1]), 0, socket.if_nametoindex("eth0"))
for _ in range(int(sys.argv[2])):
    s.sendto(b"x" * 16, dst)
"""

# pledge0: two TCP connections to the join port, held open a while (the second is refused).
TCP = """
import socket, time
held = []
for _ in range(2):
    c = socket.create_connection(("fe80::1%eth0", 8443), timeout=5)
    held.append(c)
    time.sleep(0.5)
time.sleep(2)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


class Trace:
    """`joinproxyctl trace [PLEDGE] --json` running in the proxy's namespace."""

    def __init__(self, daemon: ProxyDaemon, pledge: str | None) -> None:
        argv = [PYTHON, "-m", "joinproxyd.ctl", "--socket",
                daemon.config["daemon"]["control_socket"], "trace", "--json"]
        self.popen = subprocess.Popen(["ip", "netns", "exec", daemon.host.ns, *argv,
                                       *([pledge] if pledge else [])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = self.popen.stdout.readline() if self.popen.stdout else ""
        assert first, self.popen.stderr.read() if self.popen.stderr else ""
        self.head = json.loads(first)

    def stop(self) -> tuple[int, list[dict[str, Any]], str]:
        """Ctrl-C; the exit status, the events printed and stderr."""
        # SIGINT to joinproxyctl itself (not to `ip netns exec`, which passes no signal on
        # to a python that is its child: it execs, so the pid is the same process).
        self.popen.send_signal(signal.SIGINT)
        out, err = self.popen.communicate(timeout=10)
        return (self.popen.returncode, [json.loads(line) for line in out.splitlines() if line],
                err)


def tracing_programs(daemon: ProxyDaemon) -> list[str]:
    """Names of the tracing programs the daemon's process holds an fd on (its fdinfo)."""
    held: set[int] = set()
    fdinfo = Path(f"/proc/{daemon.ctl()['pid']}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue  # closed meanwhile
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "prog_id" in fields:
            held.add(int(fields["prog_id"]))
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    return [p.get("name", "") for p in progs if p.get("type") == "tracing" and p["id"] in held]


def test_trace_shows_the_guard_a_full_table_and_the_kernel(lab: Lab, bpffs: Path,
                                                          tmp_path: Path) -> None:
    config = base_config(tmp_path / "proxy", daemon={"bpf_pin_dir": str(bpffs / "joinproxyd")},
                         guard={"enabled": True, "rate": 5, "burst": 5},
                         limits={"circuits_per_pledge": 1})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config)
    registrar = lab.registrars[0].spawn([sys.executable, "-c", LISTENER], name="listener")
    pledge, other = None, None
    try:
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        assert tracing_programs(daemon) == []
        assert daemon.ctl()["trace"]["attached"] is False

        pledge = Trace(daemon, PLEDGE)
        other = Trace(daemon, "fe80::1:99")
        assert pledge.head == {"pledge": PLEDGE, "links": ["bb0", "join0"], "attached": True}
        assert tracing_programs(daemon) == ["jp_trace_drop"]  # one program for both traces
        assert daemon.ctl()["trace"]["tracing"] == 2

        # the guard: 50 datagrams to the join port at once, 5 of them within the burst (and
        # those meet no UDP socket on the TCP join port: the kernel drops them, NO_SOCKET)
        lab.pledges[0].run([sys.executable, "-c", UDP, str(JOIN_PORT), "50"])
        # the kernel: a port nobody listens on (ICMPv6 port unreachable, NO_SOCKET)
        lab.pledges[0].run([sys.executable, "-c", UDP, "9999", "3"])
        # a full table: the second circuit of the pledge is over circuits_per_pledge
        lab.pledges[0].run([sys.executable, "-c", TCP], check=False)
        time.sleep(1.0)  # the daemon compares counters and refusals every 0.25 s

        code, events, err = pledge.stop()
        assert code == 0, err
        guard = [e for e in events if e["source"] == "jp_guard"]
        assert guard and all(e["reason"] == "rate-limit" and e["interface"] == "join0"
                             and e["packet"]["src"] == PLEDGE for e in guard), events
        assert sum(e["count"] for e in guard) >= 40, guard
        kernel = [e for e in events if e["source"] == "kernel"]
        assert all(e["interface"] == "join0" and e["packet"]["src"] == PLEDGE
                   for e in kernel), kernel
        # (TCP segments of the refused circuit, which the proxy aborted, may show too)
        kernel = [e for e in kernel if e["packet"]["proto"] == "udp"]
        unreachable = [e for e in kernel if e["packet"]["dport"] == 9999]
        assert [e["reason"] for e in unreachable] == ["NO_SOCKET"] * 3, kernel
        assert all(e["where"].startswith("__udp6_lib_rcv") for e in unreachable), unreachable
        # to the join port: what the guard let through meets no UDP socket either; what it
        # dropped, the veth's XDP path freed (reason NOT_SPECIFIED, but the place says XDP)
        passed = [e for e in kernel if e["packet"]["dport"] == JOIN_PORT
                  and e["reason"] == "NO_SOCKET"]
        assert 5 <= len(passed) <= 7, kernel
        xdp = [e for e in kernel if e["packet"]["dport"] == JOIN_PORT
               and e["reason"] != "NO_SOCKET"]
        assert all("xdp" in e.get("where", "") for e in xdp), xdp
        refusals = [e for e in events if e["source"] == "refusal"]
        assert [(e["reason"], e["mode"]) for e in refusals] == [("limit-pledge", "circuit")], \
            events
        # the other trace is still attached and saw none of it
        assert tracing_programs(daemon) == ["jp_trace_drop"]
        code, events, err = other.stop()
        assert code == 0 and events == [], (events, err)
        wait_for(lambda: tracing_programs(daemon) == [], 5, "the tracer detached")
        assert daemon.ctl()["trace"] == {"attached": False, "tracing": 0, "links": []}
        assert daemon.stop() == 0
    finally:
        for trace in (pledge, other):
            if trace is not None and trace.popen.poll() is None:
                trace.popen.kill()
                trace.popen.wait()
        registrar.stop()
        if daemon.process is not None and daemon.process.alive:
            daemon.stop()
        print(daemon.log()[-4000:] if hasattr(daemon, "log") else "")


def test_trace_of_a_non_address_is_refused(lab: Lab, tmp_path: Path) -> None:
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
    try:
        daemon.start()
        done = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                                daemon.config["daemon"]["control_socket"], "trace",
                                "not-an-address"], check=False)
        assert done.returncode == 1
        assert done.stderr.strip() == ("joinproxyctl: the daemon refused: trace: "
                                       "'not-an-address' is not an IP address"), done.stderr
        assert daemon.ctl()["trace"]["attached"] is False
    finally:
        daemon.stop()


def test_trace_shows_a_packet_the_kernel_has_no_route_for(as_root: None,
                                                         tmp_path: Path) -> None:
    """A pledge with a ULA address sends through the proxy (a router) to a destination it
    has no route for: the kernel drops it (IP_INNOROUTES) and the trace of that pledge says
    so, with the addresses and the place."""
    with Lab(Topology(pledges=1, registrars=1, join_ula=True),
             log_dir=tmp_path / "logs") as lab:
        lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
        trace = None
        try:
            daemon.start()
            pledge = lab.pledges[0].address("eth0", link_local=False)
            trace = Trace(daemon, pledge)
            lab.pledges[0].run([sys.executable, "-c",
                                "import socket; s = socket.socket(socket.AF_INET6, "
                                "socket.SOCK_DGRAM); [s.sendto(b'x', ('fd99::1', 7, 0, 0)) "
                                "for _ in range(2)]"])
            time.sleep(0.5)
            code, events, err = trace.stop()
            assert code == 0, err
            assert [(e["source"], e["reason"], e["interface"], e["packet"]["dst"])
                    for e in events] == [("kernel", "IP_INNOROUTES", "join0", "fd99::1")] * 2, \
                events
            assert all(e["packet"]["src"] == pledge for e in events), events
            wait_for(lambda: daemon.ctl()["trace"]["attached"] is False, 5, "detached")
        finally:
            if trace is not None and trace.popen.poll() is None:
                trace.popen.kill()
                trace.popen.wait()
            daemon.stop()
