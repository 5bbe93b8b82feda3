"""The join-port guard with its shipped rates, both sides measured at once (issue 11, item 7).

    pledge0 (SYN flood) ───┐
    pledge1 (6 connections)┴─ [join0] ─ proxy: jp_guard (XDP) ─ circuit ─ bb0 ─ registrar0
                                                                              (TCP echo)

The [guard] table of the shipped packaging/joinproxyd.toml is what the daemon runs with.
While pledge0 sends a bounded SYN flood (a fixed count of SYNs over a fixed time, each from
another port, so every one is a new connection), pledge1 opens 6 TCP connections at once
through the circuit proxy and sends data both ways on each: far more packets in a burst
than the guard's buckets hold, but only 6 of them are SYNs.

- the flood is held to the SYN rate: what got through is at most syn_burst plus syn_rate
  per second of flood (and one clock tick of slack); the rest is dropped and counted in
  pledge0's bucket;
- pledge1 loses nothing: its bucket counts no drop, the guard's total drop counter is
  pledge0's alone, its TCP stack repaired no loss (no SYN retransmitted, no timeout, and
  every retransmitted segment, a tail-loss probe on a busy host, came back D-SACKed as a
  duplicate) and every byte came back.

A second test checks the UDP numbers against a real DTLS 1.2 handshake with certificates
(OpenSSL, the IDevID with its CA as the client's chain, 1024-byte MTU), three back to back.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ipip_daemon import bpffs, map_dump, show, xdp_progs

from joinproxyd.guard import REPORT_SECONDS
from lab import Host, Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config
from lab.topology import PROXY_LL

pytestmark = pytest.mark.netns

__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon

SHIPPED = Path(__file__).resolve().parent.parent / "packaging" / "joinproxyd.toml"
PORT = 8443
FLOOD_SYNS = 3000
FLOOD_SECONDS = 1.5
CONNECTIONS = 6
BYTES_EACH = 64 * 1024
TCP, UDP = 6, 17

ECHO = r"""
import socket, sys, threading
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", int(sys.argv[1])))
server.listen(64)
print("listening", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# SYNs from one source, each from another port, paced evenly over a bounded time; written
# straight to the link (AF_PACKET), so the sender's own TCP stack neither retransmits nor
# remembers them. Waits for the go file, then prints what it sent and for how long.
FLOOD = r"""
import os, socket, sys, time
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.inet import TCP
src_mac, dst_mac, src, dst, port, count, seconds, go = sys.argv[1:9]
count, seconds = int(count), float(seconds)
frames = [bytes(Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=dst) /
                TCP(sport=20000 + i, dport=int(port), flags="S", seq=1000 + i))
          for i in range(count)]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
print("built", flush=True)
while not os.path.exists(go):
    time.sleep(0.005)
start = time.monotonic()
for i, frame in enumerate(frames):
    while time.monotonic() < start + seconds * i / count:
        pass
    sock.send(frame)
print("sent", count, time.monotonic() - start, flush=True)
"""

# A well-behaved pledge: CONNECTIONS connections opened at once through the circuit proxy,
# BYTES_EACH sent and echoed back on each; the netns' TCP retransmission counters around it.
BURST = r"""
import json, os, socket, sys, threading, time
target, port, connections, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def mib():
    counters = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = open(path).read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix = names.split(":")[0]
            for name, value in zip(names.split()[1:], values.split()[1:]):
                counters[f"{prefix}{name}"] = int(value)
    return counters

addr = socket.getaddrinfo(target, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
results = [None] * connections
start = threading.Barrier(connections)

def one(i):
    payload = os.urandom(size)
    got = b""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            start.wait()
            began = time.monotonic()
            s.connect(addr)
            sender = threading.Thread(target=lambda: (s.sendall(payload),
                                                      s.shutdown(socket.SHUT_WR)))
            sender.start()
            while chunk := s.recv(65536):
                got += chunk
            sender.join()
            results[i] = {"ok": got == payload, "bytes": len(got),
                          "seconds": round(time.monotonic() - began, 3)}
    except OSError as exc:
        results[i] = {"ok": False, "error": repr(exc), "bytes": len(got)}

before = mib()
threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
for t in threads:
    t.start()
for t in threads:
    t.join()
time.sleep(0.5)  # a retransmission would have happened by now (RTO >= 200 ms)
after = mib()
delta = {name: after[name] - before[name]
         for name in ("TcpRetransSegs", "TcpExtTCPDSACKRecvSegs", "TcpExtTCPLossProbes",
                      "TcpExtTCPSynRetrans", "TcpExtTCPTimeouts")}
print(json.dumps({"results": results,
                  "retrans_segs": delta["TcpRetransSegs"],
                  "dsacked_segs": delta["TcpExtTCPDSACKRecvSegs"],
                  "loss_probes": delta["TcpExtTCPLossProbes"],
                  "syn_retrans": delta["TcpExtTCPSynRetrans"],
                  "timeouts": delta["TcpExtTCPTimeouts"]}))
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def shipped_guard() -> dict[str, Any]:
    return tomllib.loads(SHIPPED.read_text())["guard"]


def mac(host: Host, ifname: str) -> str:
    (link,) = json.loads(host.run(["ip", "-j", "link", "show", ifname]).stdout)
    return str(link["address"])


def buckets(pin_dir: Path) -> dict[tuple[str, int], dict[str, int]]:
    """The guard's buckets: (source, protocol) -> tokens, last_ns, drops."""
    out = {}
    for entry in map_dump(pin_dir, "jp_guard_bkt"):
        key, value = entry["formatted"]["key"], entry["formatted"]["value"]
        source = str(ipaddress.IPv6Address(bytes(key["addr"])))
        out[(source, int(key["proto"]))] = value
    return out


def test_a_syn_flood_is_held_while_a_bursting_pledge_loses_nothing(lab: Lab, bpffs: Path,
                                                                    tmp_path: Path) -> None:
    guard = shipped_guard()
    assert guard["enabled"]
    syn_rate, syn_burst = guard["syn_rate"], guard["syn_burst"]
    pin_dir = bpffs / "joinproxyd"
    flooder, victim = lab.pledges
    flooder_ll = flooder.address("eth0", link_local=True)
    victim_ll = victim.address("eth0", link_local=True)
    # The default circuit limits: a burst of 6 connections is within them too.
    config = base_config(tmp_path / "proxy", daemon={"bpf_pin_dir": str(pin_dir)},
                         guard=guard)
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config)
    echo = lab.registrars[0].spawn([sys.executable, "-c", ECHO, str(PORT)], name="echo")
    go = tmp_path / "go"
    flood = None
    try:
        wait_for(lambda: "listening" in echo.log(), 10, "the echo server")
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        assert xdp_progs(lab.proxy, "join0") == ["jp_guard"]
        flood = flooder.spawn([sys.executable, "-c", FLOOD, mac(flooder, "eth0"),
                               mac(lab.proxy, "join0"), flooder_ll, PROXY_LL, str(PORT),
                               str(FLOOD_SYNS), str(FLOOD_SECONDS), str(go)], name="flood")
        wait_for(lambda: "built" in flood.log(), 60, "the flood's frames")

        go.touch()  # both at once
        burst = victim.run([sys.executable, "-c", BURST, f"{PROXY_LL}%eth0", str(PORT),
                            str(CONNECTIONS), str(BYTES_EACH)], timeout=60)
        assert flood.popen.wait(FLOOD_SECONDS + 20) == 0
        _, sent, seconds = flood.log().split()[-3:]
        assert int(sent) == FLOOD_SYNS
        report = json.loads(burst.stdout)
        print("burst:", report, "flood:", sent, "SYNs in", seconds, "s")

        # The well-behaved pledge: every byte back, nothing retransmitted, nothing dropped.
        assert all(r["ok"] for r in report["results"]), report
        # A retransmission the other end reports as a duplicate (D-SACK, RFC 2883) repaired
        # no loss: on a busy host an ACK held past the tail-loss probe's 2 jiffies sends
        # one. Any other retransmission, a SYN's or a timeout's, means a packet was lost.
        unrepaired = report["retrans_segs"] - report["dsacked_segs"]
        assert (max(unrepaired, 0), report["syn_retrans"], report["timeouts"]) == (0, 0, 0), \
            report
        seen = buckets(pin_dir)
        assert seen[(victim_ll, TCP)]["drops"] == 0, seen  # its SYNs were counted, not cut
        assert (victim_ll, UDP) not in seen

        # The flood: held to syn_burst + syn_rate per second (a clock tick of slack).
        flood_drops = seen[(flooder_ll, TCP)]["drops"]
        through = FLOOD_SYNS - flood_drops
        assert through <= syn_burst + syn_rate * (float(seconds) + 0.1) + 1, (through, seen)
        assert through >= syn_burst, "the burst is let through"
        # Every drop of the guard is the flooder's.
        wait_for(lambda: daemon.drops("guard", "rate-limit") == flood_drops, 5,
                 "the guard's drop counter")
        # The operator is told who: the flooder, once, and never the well-behaved pledge.
        named = f"join-port guard drops TCP SYNs from {flooder_ll} on join0"
        wait_for(lambda: named in daemon.log(), REPORT_SECONDS + 5, "the flooder named")
        said = [line for line in daemon.log().splitlines() if "guard drops" in line]
        assert len(said) == 1 and victim_ll not in said[0], said
        # status lists who lost the most, as of the last look (every REPORT_SECONDS while
        # the guard drops).
        top = [{"source": flooder_ll, "interface": "join0", "protocol": "tcp",
                "drops": flood_drops}]
        wait_for(lambda: daemon.ctl()["guard"]["dropped_most"] == top, REPORT_SECONDS + 5,
                 "the flooder on top of the status")
    finally:
        show(daemon, flood, echo)
        if flood is not None:
            flood.stop()
        daemon.stop()


def test_dtls_handshakes_with_certificates_fit_the_shipped_udp_bucket(lab: Lab, bpffs: Path,
                                                                      tmp_path: Path) -> None:
    """What the UDP numbers were chosen for: a cBRSKI-like DTLS 1.2 handshake (cookie round,
    the IDevID and its CA as the client's chain, records of at most 1024 bytes), three times
    back to back from one pledge, to a DTLS server on the join port behind the guard. A lost
    datagram would cost the handshake OpenSSL's 1 s retransmission timer."""
    from lab.brski_services import make_pki

    pki = make_pki(tmp_path / "pki", ["dtls-0"])
    pin_dir = bpffs / "joinproxyd"
    pledge = lab.pledges[0]
    pledge_ll = pledge.address("eth0", link_local=True)
    config = base_config(tmp_path / "proxy", daemon={"bpf_pin_dir": str(pin_dir)},
                         guard=shipped_guard())
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config)
    # s_server ends at the end of its input: give it one that stays open.
    server = lab.proxy.spawn(["sh", "-c", "sleep 600 | exec openssl s_server -dtls1_2 -listen "
                              f"-6 -accept [::]:{PORT} -cert {pki}/domain/registrar.crt "
                              f"-key {pki}/domain/registrar.key -Verify 2 "
                              f"-CAfile {pki}/manufacturer/ca.crt -mtu 1024"],
                             name="dtls-server")
    timings = []
    try:
        daemon.start()
        assert xdp_progs(lab.proxy, "join0") == ["jp_guard"]
        wait_for(lambda: lab.proxy.run(["ss", "-Hlun", f"sport = :{PORT}"]).stdout.strip(), 10,
                 "the DTLS server")
        for _ in range(3):
            began = time.monotonic()
            # One source port for all three: s_server's socket stays connected to its
            # first peer.
            done = pledge.run(["openssl", "s_client", "-dtls1_2", "-connect",
                               f"[{PROXY_LL}%eth0]:{PORT}", "-bind", f"[{pledge_ll}%eth0]:40000",
                               "-mtu", "1024",
                               "-cert", str(pki / "manufacturer/idevid/dtls-0.crt"),
                               "-key", str(pki / "manufacturer/idevid/dtls-0.key"),
                               "-cert_chain", str(pki / "manufacturer/ca.crt")],
                              input="", check=False, timeout=20)
            timings.append(round(time.monotonic() - began, 3))
            assert "New, TLSv1.2, Cipher is" in done.stdout, done.stdout + done.stderr
        print("DTLS handshakes (s):", timings)  # each with s_client's start and exit
        seen = buckets(pin_dir)
        assert seen[(pledge_ll, UDP)]["drops"] == 0, seen  # rationed, never cut
        assert daemon.drops("guard", "rate-limit") == 0
    finally:
        show(daemon, server)
        server.stop()
        daemon.stop()
