"""The jpy relay's kernel path through the real daemon, in namespaces: what the wire shows.

The pledge and the registrar send with transmit checksum offload off (as a pledge's radio or
NIC frame arrives: checksum complete), so captures on both ends show the checksums the tc
programs left: every one must verify, for content sizes at each CBOR length-prefix boundary
up to the largest relayed. The guard (XDP, before tc) still rations a flooding pledge; a
too-big datagram is dropped and counted by the program; and `joinproxyctl status` says the
kernel runs (and `user` when forced off, tested in test_field_jpy_relay.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from lab import Lab, Topology, netns, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config

pytestmark = pytest.mark.netns

JPY_PORT, JOIN_PORT = 5684, 8443
EBPF = Path(__file__).resolve().parent.parent / "ebpf"
SIZES = (0, 1, 23, 24, 255, 256, 1000, 1194)

ECHO = """
import socket, sys
import cbor2
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    header, content = cbor2.loads(data)[:2]
    if content[:1] == b"\\x16":  # the daemon's DTLS probe: a HelloVerifyRequest will do
        body = bytes([0xFE, 0xFF, 1, 88])
        n = len(body).to_bytes(3, "big")
        hs = b"\\x03" + n + bytes(5) + n + body
        s.sendto(cbor2.dumps([header, bytes([22, 0xFE, 0xFD]) + bytes(8)
                              + len(hs).to_bytes(2, "big") + hs]), peer)
        continue
    s.sendto(cbor2.dumps([header, content[::-1]]), peer)
"""

PLEDGE = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(3)
for size in map(int, sys.argv[2:]):
    body = bytes((size + i) % 251 for i in range(size))
    s.sendto(body, ("fe80::1%eth0", int(sys.argv[1])))
    print(size, s.recv(4096) == body[::-1], flush=True)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        for host in (lab.pledges[0], lab.registrars[0]):
            host.run(["ethtool", "-K", "eth0", "tx", "off"])
        yield lab


def start(lab: Lab, tmp_path: Path, expect: str = "kernel", **sections: dict) -> ProxyDaemon:
    lab.registrars[0].spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"],
                            name="tcp-health")
    lab.registrars[0].spawn([PYTHON, "-c", ECHO, str(JPY_PORT)], name="jpy-echo")
    config = base_config(
        tmp_path / "proxy", join=[{"interfaces": ["join*"], "modes": ["jpy"],
                                   "port": JOIN_PORT}],
        registrars={"discovery": ["static"],
                    "static": [{"address": "fd4a:5044::100", "port": 8443,
                                "preference": 10, "jpy_port": JPY_PORT}]},
        **sections)
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    jpy = daemon.ctl()["relays"]["jpy"]
    assert jpy["datapath"] == expect, jpy
    return daemon


def udp_checks(pcap: Path, port: int) -> list[tuple[int, bool]]:
    """(UDP payload length, checksum verifies) of every IPv6 UDP packet from port, i.e. what
    the programs sent; each carries flow label 0."""
    out = []
    for pkt in rdpcap(str(pcap)):
        if IPv6 not in pkt or UDP not in pkt or pkt[UDP].sport != port:
            continue
        assert pkt[IPv6].fl == 0, pkt.summary()
        got = pkt[UDP].chksum
        copy = pkt[IPv6].copy()
        del copy[UDP].chksum
        out.append((len(pkt[UDP].payload), IPv6(bytes(copy))[UDP].chksum == got))
    return out


@pytest.mark.parametrize("arrives", ["complete", "partial"])
def test_checksums_on_the_wire_are_right_for_every_length_prefix(lab: Lab, tmp_path: Path,
                                                                arrives: str) -> None:
    """complete: the senders finish their checksums (as a frame from a wire is). partial: the
    pledge and the registrar are local senders whose checksums the stack leaves to the
    device (CHECKSUM_PARTIAL), and the proxy's own links compute them in software on the way
    out (tx checksum offload off), so the captures show what the programs' incremental
    updates add up to for such packets."""
    if arrives == "partial":
        for host in (lab.pledges[0], lab.registrars[0]):
            host.run(["ethtool", "-K", "eth0", "tx", "on"])
        for dev in ("join0", "bb0"):
            lab.proxy.run(["ethtool", "-K", dev, "tx", "off"])
    backbone, join = tmp_path / "backbone.pcap", tmp_path / "join.pcap"
    dump = ["tcpdump", "-i", "eth0", "-U", "--immediate-mode", "-w"]
    dumps = [lab.registrars[0].spawn([*dump, str(backbone)], name="tcpdump-bb"),
             lab.pledges[0].spawn([*dump, str(join)], name="tcpdump-join")]
    daemon = start(lab, tmp_path)
    time.sleep(0.5)  # tcpdump is listening
    run = lab.pledges[0].run([PYTHON, "-c", PLEDGE, str(JOIN_PORT), *map(str, SIZES)])
    assert run.stdout.split("\n")[:len(SIZES)] == [f"{n} True" for n in SIZES], run.stdout
    counts = daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]
    assert (counts["up"], counts["down"]) == (len(SIZES), len(SIZES)), counts
    time.sleep(0.5)
    for dump in dumps:
        dump.stop()
    # the relay's datagrams, not the daemon's DTLS probes (a local socket's, offloaded)
    up = udp_checks(backbone, daemon.ctl()["relays"]["jpy"]["source_port"])
    down = udp_checks(join, JOIN_PORT)
    # wrapped: the content plus 36-38 bytes of CBOR and header; unwrapped: the content
    assert len(up) == len(SIZES), up
    assert all(ok for _, ok in up), up
    assert sorted(n for n, _ in down) == sorted(SIZES), down
    assert all(ok for _, ok in down), down
    for n in SIZES:  # each wrapped length carries its preferred CBOR length prefix
        overhead = 36 if n < 24 else 37 if n < 256 else 38
        assert (n + overhead, True) in up, (n, up)
    daemon.stop()


def test_guard_still_rations_and_too_big_is_counted_in_the_kernel(lab: Lab,
                                                                 tmp_path: Path) -> None:
    daemon = start(lab, tmp_path, guard={"enabled": True, "rate": 5, "burst": 10})
    lab.pledges[0].run([PYTHON, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        f"s.sendto(bytes(1195), ('fe80::1%eth0', {JOIN_PORT}))")])
    wait_for(lambda: daemon.drops("jpy", "too-big") == 1, 5, "the too-big count")
    assert daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]["too-big"] == 1
    flood = lab.pledges[0].run([PYTHON, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        f"for i in range(300): s.sendto(b'x%d' % i, ('fe80::1%eth0', {JOIN_PORT}))")])
    assert flood.returncode == 0
    wait_for(lambda: daemon.drops("guard", "rate-limit") >= 250, 10, "the guard dropping")
    time.sleep(1.5)  # the relay folds the programs' counts in every second
    up = daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]["up"]
    assert 5 <= up <= 40, up  # what the burst (less the too-big one) and the refill let by
    daemon.stop()


@pytest.mark.parametrize("setting", ["auto", "kernel"])
def test_without_the_kernel_path_the_user_space_relay_runs_and_status_says_why(
        lab: Lab, tmp_path: Path, setting: str) -> None:
    """A kernel without the BPF crypto kfuncs cannot load jpy.bpf.o; here the object is
    missing from the object directory, which fails the same way. The relay runs in user space
    (AES-SIV header), relays, and status names the reason; forced `kernel` logs it as an
    error."""
    objects = tmp_path / "bpf"
    objects.mkdir()
    for obj in EBPF.glob("*.bpf.o"):
        if obj.name != "jpy.bpf.o":
            shutil.copy(obj, objects / obj.name)
    daemon = start(lab, tmp_path, expect="user",
                   daemon={"bpf_object_dir": str(objects)}, jpy={"datapath": setting})
    jpy = daemon.ctl()["relays"]["jpy"]
    assert (jpy["datapath"], jpy["header"], jpy["kernel"]) == ("user", "aes-siv", None), jpy
    assert "jpy.bpf.o" in jpy["datapath_reason"], jpy
    # (not 0 bytes: asyncio's sendto drops an empty datagram, so the user-space relay cannot
    # return an empty reply; the kernel path can)
    run = lab.pledges[0].run([PYTHON, "-c", PLEDGE, str(JOIN_PORT), "1", "300"])
    assert run.stdout.split("\n")[:2] == ["1 True", "300 True"], run.stdout
    level = "ERROR" if setting == "kernel" else "INFO"
    assert f"{level} joinproxyd: jpy relay runs in user space" in daemon.log(), daemon.log()
    daemon.stop()


def test_the_xdp_wrap_runs_where_the_backbone_takes_redirects(lab: Lab, tmp_path: Path) -> None:
    """Until the backbone's far end takes XDP-redirected frames (a veth does once its peer has
    GRO on) and the proxy forwards IPv6 on it, status says why the XDP wrap is off; then,
    within the daemon's recheck, the guard tail-calls jp_jpy_xdp_join: the pledge's datagrams
    (complete checksums) are wrapped in XDP, the replies still in tc, the wire's checksums
    verify, and status counts what XDP did."""
    daemon = start(lab, tmp_path, guard={"enabled": True, "rate": 1000, "burst": 1000})
    kernel = daemon.ctl()["relays"]["jpy"]["kernel"]
    assert (kernel["xdp"], kernel["xdp_joins"]) == (False, []), kernel
    assert "bb0" in kernel["xdp_reason"], kernel
    lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1"])
    netns.run(["ip", "netns", "exec", lab.ns_name("bb"), "ethtool", "-K", "proxy", "gro", "on"])
    wait_for(lambda: daemon.ctl()["relays"]["jpy"]["kernel"]["xdp"], 20, "the XDP wrap")
    kernel = daemon.ctl()["relays"]["jpy"]["kernel"]
    assert kernel["xdp_joins"] == [netns.ifindex(lab.proxy.ns, "join0")], kernel
    backbone = tmp_path / "backbone.pcap"
    dump = lab.registrars[0].spawn(["tcpdump", "-i", "eth0", "-U", "--immediate-mode", "-w",
                                    str(backbone)], name="tcpdump-bb")
    time.sleep(0.5)  # tcpdump is listening
    before = daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]
    run = lab.pledges[0].run([PYTHON, "-c", PLEDGE, str(JOIN_PORT), *map(str, SIZES)])
    assert run.stdout.split("\n")[:len(SIZES)] == [f"{n} True" for n in SIZES], run.stdout
    time.sleep(1.5)  # the relay folds the programs' counts in every second
    after = daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]
    assert [after[k] - before[k] for k in ("up", "xdp_up", "down")] == [len(SIZES)] * 3, after
    time.sleep(0.5)
    dump.stop()
    up = udp_checks(backbone, daemon.ctl()["relays"]["jpy"]["source_port"])
    assert len(up) == len(SIZES) and all(ok for _, ok in up), up
    daemon.stop()


def test_without_the_guard_the_xdp_wrap_runs_nowhere_and_status_says_so(lab: Lab,
                                                                       tmp_path: Path) -> None:
    lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1"])
    netns.run(["ip", "netns", "exec", lab.ns_name("bb"), "ethtool", "-K", "proxy", "gro", "on"])
    daemon = start(lab, tmp_path, guard={"enabled": False})
    kernel = daemon.ctl()["relays"]["jpy"]["kernel"]
    assert (kernel["xdp"], kernel["xdp_joins"]) == (False, []), kernel
    assert "guard" in kernel["xdp_reason"], kernel
    run = lab.pledges[0].run([PYTHON, "-c", PLEDGE, str(JOIN_PORT), "10"])
    assert run.stdout.split("\n")[0] == "10 True", run.stdout
    time.sleep(1.5)
    counts = daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]
    assert (counts["up"], counts["xdp_up"]) == (1, 0), counts
    daemon.stop()
