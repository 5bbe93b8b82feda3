"""The stateless jpy relay mode through the real daemon, in namespaces.

Two pledges talk UDP to the proxy's join port; a stand-in JPY registrar on the backbone (a
real process: it decodes each JPY message and answers [same header, b"echo:" + content])
answers. Then the stand-in, from the registrar's own JPY port, injects 1,000 forged replies
at the proxy's fixed socket: random headers, bit-flipped real ones, exact replays of real
replies and headers under a key id that is not live. All are dropped and counted by reason,
and none reaches a pledge. A capture on the backbone shows the headers: one per pledge flow
(the registrar keys its DTLS connection on it, brski/jpy.py), different across pledges, and
never the pledge's address or port in clear.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from lab import Host, Lab, LabProcess, Topology, wait_for
from lab.netns import LabError
from lab.proxyd import PYTHON, ProxyDaemon, base_config
from tests.coaps_probe import hello_verify_request

pytestmark = pytest.mark.netns

JPY_PORT = 5684
JOIN_PORT = 8443

# The stand-in registrar: echo, and on b"INJECT" fire the forged replies, 250 of each kind.
REGISTRAR = """
import os, random, socket, sys
import cbor2
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
sent = []
while True:
    data, peer = s.recvfrom(65535)
    header, content = cbor2.loads(data)[:2]
    if content[:1] == b"\x16":  # the daemon's DTLS health probe: a HelloVerifyRequest will do
        hvr = bytes.fromhex("@HVR@")
        s.sendto(cbor2.dumps([header, hvr]), peer)
        continue
    print("header", header.hex(), flush=True)
    if content == b"OLD":  # every reply sent so far again: after a restart, old-key headers
        for datagram in sent:
            s.sendto(datagram, peer)
        print("resent", len(sent), flush=True)
        continue
    if content == b"INJECT":
        rng = random.Random(7)
        forged = []
        for i in range(250):
            forged.append(cbor2.dumps([header[:1] + rng.randbytes(31), b"SECRET"]))
            flipped = bytearray(header)
            bit = rng.randrange(8, 8 * len(header))
            flipped[bit // 8] ^= 1 << (bit % 8)
            forged.append(cbor2.dumps([bytes(flipped), b"SECRET"]))
            forged.append(sent[i % len(sent)])
            forged.append(cbor2.dumps([bytes([(header[0] + 1 + i % 200) & 0xFF]) + header[1:],
                                       b"SECRET"]))
        for datagram in forged:
            s.sendto(datagram, peer)
        print("injected", len(forged), flush=True)
        continue
    reply = cbor2.dumps([header, b"echo:" + content])
    sent.append(reply)
    s.sendto(reply, peer)
""".replace("@HVR@", hello_verify_request().hex())

# A pledge: three datagrams (their echoes printed), then the trigger, then everything that
# arrives in the next seconds.
PLEDGE = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(3)
target = ("fe80::1%eth0", int(sys.argv[1]))
for i in range(3):
    s.sendto(b"hello-%d" % i, target)
    print(s.recv(2048).decode(), flush=True)
if sys.argv[2] == "inject":
    s.sendto(b"INJECT", target)
s.settimeout(1)
deadline = time.time() + float(sys.argv[3])
while time.time() < deadline:
    try:
        print("late", s.recv(2048), flush=True)
    except TimeoutError:
        pass
print("done", flush=True)
"""


# Every test runs twice: with the kernel path (tc programs, ebpf/jpy.bpf.c; this kernel has
# the BPF crypto kfuncs, so "auto" must pick it) and with it forced off.
DATAPATH = {"mode": "auto"}


@pytest.fixture(params=["auto", "user"], autouse=True)
def datapath(request: pytest.FixtureRequest) -> Iterator[str]:
    DATAPATH["mode"] = request.param
    yield request.param
    DATAPATH["mode"] = "auto"


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def jpy_config(run_dir: Path) -> dict:
    return base_config(
        run_dir, join=[{"interfaces": ["join*"], "modes": ["jpy"], "port": JOIN_PORT}],
        registrars={"discovery": ["static"],
                    "static": [{"address": "fd4a:5044::100", "port": 8443, "preference": 10,
                                "jpy_port": JPY_PORT}],
                    "health_interval": 0.3, "health_timeout": 0.3},
        jpy={"datapath": DATAPATH["mode"]})


def start(lab: Lab, tmp_path: Path) -> tuple[ProxyDaemon, LabProcess]:
    # The health probe is a TCP connect to the registrar's port: something must listen.
    lab.registrars[0].spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"],
                            name="tcp-health")
    registrar = lab.registrars[0].spawn([PYTHON, "-c", REGISTRAR, str(JPY_PORT)],
                                        name="jpy-registrar")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", jpy_config(tmp_path / "proxy")).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    jpy = daemon.ctl()["relays"]["jpy"]
    assert jpy["datapath"] == ("kernel" if DATAPATH["mode"] == "auto" else "user"), jpy
    return daemon, registrar


def pledge(host: Host, name: str, inject: bool = False, linger: float = 1) -> LabProcess:
    return host.spawn([PYTHON, "-c", PLEDGE, str(JOIN_PORT), "inject" if inject else "-",
                       str(linger)], name=name)


def udp_payloads(pcap: Path, port: int) -> list[bytes]:
    """UDP payloads to `port` in a tcpdump file (Ethernet, IPv6 without extension headers)."""
    data = pcap.read_bytes()
    out, offset = [], 24
    while offset + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16: offset + 16 + caplen]
        offset += 16 + caplen
        if frame[12:14] != b"\x86\xdd" or frame[20] != 17:
            continue
        udp = frame[54:]
        if struct.unpack_from(">H", udp, 2)[0] == port:
            out.append(udp[8:])
    return out


def test_jpy_relays_both_ways_and_drops_every_forged_reply(lab: Lab, tmp_path: Path) -> None:
    capture = tmp_path / "backbone.pcap"
    tcpdump = lab.registrars[0].spawn(["tcpdump", "-i", "eth0", "-U", "-w", str(capture),
                                       "udp", "port", str(JPY_PORT)], name="tcpdump")
    daemon, registrar = start(lab, tmp_path)
    sniffers = [host.spawn([PYTHON, "-c", SNIFF], name=f"sniff{i}")
                for i, host in enumerate(lab.pledges)]
    wait_for(lambda: all("ready" in s.log() for s in sniffers), 10, "the sniffers")
    quiet = pledge(lab.pledges[1], "pledge1", linger=6)
    attacked = pledge(lab.pledges[0], "pledge0", inject=True, linger=4)
    wait_for(lambda: "done" in attacked.log() and "done" in quiet.log(), 20, "the pledges")
    for process in (attacked, quiet):
        lines = process.log().split("\n")
        assert lines[:3] == ["echo:hello-0", "echo:hello-1", "echo:hello-2"], process.log()
        assert not [line for line in lines if line.startswith("late")], process.log()
    assert "injected 1000" in registrar.log()
    time.sleep(0.5)  # the sniffers have printed what the pledges received
    for sniffer in sniffers:  # every UDP datagram on each pledge's link: the echoes only
        from_proxy = [bytes.fromhex(line.split()[1]) for line in sniffer.log().splitlines()
                      if line.startswith("fe80::1 ")]
        assert from_proxy == [b"echo:hello-%d" % i for i in range(3)], sniffer.log()
    assert daemon.drops("jpy", "jpy-forged") == 500
    assert daemon.drops("jpy", "jpy-replayed") == 250
    assert daemon.drops("jpy", "jpy-stale") == 250
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="jpy",
                         direction="upstream") == 2 * 3 * len("hello-0") + len("INJECT")
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="jpy",
                         direction="downstream") == 2 * 3 * len("echo:hello-0")
    for direction, count in (("upstream", 7), ("downstream", 6)):
        assert daemon.sample("joinproxyd_relayed_datagrams_total", mode="jpy",
                             direction=direction) == count
    jpy = daemon.ctl()["relays"]["jpy"]
    assert jpy["datagrams"] == {"upstream": 7, "downstream": 6}, jpy
    if DATAPATH["mode"] == "auto":  # the programs did it all, and counted it
        counts = jpy["kernel"]["counts"]
        assert "up" in counts, jpy
        assert (counts["up"], counts["down"], counts["forged"], counts["stale"],
                counts["replayed"]) == (7, 6, 500, 250, 250), counts
    assert jpy["registrar"] == f"[fd4a:5044::100]:{JPY_PORT}"
    assert jpy["listeners"] == [{"interface": "join0", "address": "fe80::1",
                                 "port": JOIN_PORT, "protocol": "udp"}]
    human = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                             daemon.config["daemon"]["control_socket"], "status"]).stdout
    assert '  jpy: {"datagrams": {"downstream": 6, "upstream": 7}' in human, human

    # The backbone: one header per pledge flow, distinct across pledges, nothing in clear.
    wait_for(lambda: capture.exists() and len(udp_payloads(capture, JPY_PORT)) >= 7, 5,
             "the capture")
    tcpdump.stop()
    headers: dict[bytes, set[bytes]] = {}
    for payload in udp_payloads(capture, JPY_PORT):
        header, content = cbor2.loads(payload)[:2]
        assert len(header) <= 32
        if content[:1] == b"\x16":
            continue  # the daemon's DTLS health probe of the JPY port, not a pledge's flow
        headers.setdefault(header, set()).add(content)
    assert len(headers) == 2, headers
    for header in headers:
        for iid in (bytes.fromhex("0000000000010001"), bytes.fromhex("0000000000010002")):
            assert iid not in header
    daemon.stop()


def test_too_big_and_closed_window_refused_and_counted(lab: Lab, tmp_path: Path) -> None:
    daemon, _ = start(lab, tmp_path)
    big = lab.pledges[0].run([PYTHON, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
        f"s.sendto(b'x' * 1200, ('fe80::1%eth0', {JOIN_PORT}))")])
    assert big.returncode == 0
    wait_for(lambda: daemon.drops("jpy", "too-big") == 1, 5, "the too-big count")
    daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                     daemon.config["daemon"]["control_socket"], "window", "close"])
    closed = pledge(lab.pledges[0], "closed")
    wait_for(lambda: not closed.alive(), 15, "the pledge to give up")
    assert "echo:" not in closed.log()
    assert daemon.drops("jpy", "window-closed") >= 1
    daemon.stop()


def test_a_registrar_without_a_jpy_port_leaves_the_link_unserved(lab: Lab,
                                                                 tmp_path: Path) -> None:
    """Status is true: with no JPY port to relay to, joining on the jpy link is closed and
    says why, and nothing is announced (no TCP locator lures pledges)."""
    lab.registrars[0].spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"],
                            name="tcp-health")
    config = jpy_config(tmp_path / "proxy")
    del config["registrars"]["static"][0]["jpy_port"]
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start(wait_ready=False)
    def status_text() -> str:
        try:
            return json.dumps(daemon.ctl())
        except LabError:  # the control socket is not there yet
            return ""
    wait_for(lambda: '"healthy": true' in status_text(), 10, "the TCP-healthy registrar")
    status = daemon.ctl()
    assert status["joining"] is False, status
    assert "no constrained registrar answers the DTLS probe" in status["joining_reason"], status
    assert status["joining_modes"]["jpy"]["open"] is False, status
    sent = pledge(lab.pledges[0], "unserved")
    wait_for(lambda: not sent.alive(), 15, "the pledge to give up")
    assert "echo:" not in sent.log()
    assert daemon.drops("jpy", "no-registrar") >= 1
    assert daemon.sample("joinproxyd_announcements_total", method="grasp",
                         interface="join0") == 0
    daemon.stop()


SNIFF = """
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    print(peer[0], data[8:].hex(), flush=True)
"""


def test_kill_9_and_restart_old_key_replies_dropped_pledge_retries_succeed(
        lab: Lab, tmp_path: Path) -> None:
    """After kill -9 the key is new: replies sealed by the old run (the registrar sends every
    one again) are dropped and counted, none reaches the pledge link (a raw socket there sees
    every UDP datagram), and the pledge's next datagrams are relayed. Nothing of the old run
    is left: the new one binds the same join port."""
    daemon, registrar = start(lab, tmp_path)
    sniffer = lab.pledges[0].spawn([PYTHON, "-c", SNIFF], name="sniffer")
    wait_for(lambda: "ready" in sniffer.log(), 10, "the sniffer")
    first = pledge(lab.pledges[0], "before")
    wait_for(lambda: "done" in first.log(), 15, "the first pledge run")
    assert first.log().split("\n")[:3] == ["echo:hello-0", "echo:hello-1", "echo:hello-2"]
    daemon.kill()
    daemon = ProxyDaemon(lab, tmp_path / "proxy", jpy_config(tmp_path / "proxy")).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar again")
    old = lab.pledges[0].run([PYTHON, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
        f"s.sendto(b'OLD', ('fe80::1%eth0', {JOIN_PORT}))")])
    assert old.returncode == 0
    wait_for(lambda: "resent 3" in registrar.log(), 5, "the old replies")
    wait_for(lambda: daemon.drops("jpy", "jpy-stale") + daemon.drops("jpy", "jpy-forged") == 3,
             5, "the old-key drops")
    after = pledge(lab.pledges[0], "after")
    wait_for(lambda: "done" in after.log(), 15, "the pledge after the restart")
    assert after.log().split("\n")[:3] == ["echo:hello-0", "echo:hello-1", "echo:hello-2"]
    def heard() -> list[str]:
        return [line.split()[1] for line in sniffer.log().splitlines()
                if line.startswith("fe80::1 ")]
    wait_for(lambda: len(heard()) >= 6, 5, "the sniffer to see the six echoes")
    time.sleep(0.5)  # and nothing else arrives
    from_proxy = heard()
    assert [bytes.fromhex(p).decode() for p in from_proxy] == [
        f"echo:hello-{i}" for i in range(3)] * 2, sniffer.log()
    daemon.stop()
