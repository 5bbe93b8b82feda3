"""Issue 14 acceptance on the wire: what the stateless jpy relay puts on the backbone.

1. Real processes in namespaces: the registrar (with its [jpy] endpoint) and MASA, joinproxyd
   in `jpy` mode, and libcoap's coap-client-openssl with an IDevID on two pledges (twice on
   one of them), while dumpcap captures the proxy's backbone interface. The capture shows:
   every JPY message decodes (brski.jpy); a header is at most 32 bytes and never carries a
   pledge's link-local address or interface identifier in clear (nor does any byte of any
   backbone frame); headers never repeat across pledge flows (each coap-client run is a flow,
   two runs from one pledge address get different headers), while every datagram of one flow,
   both ways, carries that flow's one header, because the draft (§4.4) makes the registrar
   key its DTLS connection on the header (brski/jpy.py explains why a header per datagram
   cannot work). Then the DTLS inside the CBOR arrays is decoded by tshark: the contents are
   taken out by hand with brski.jpy and written, one synthetic UDP flow per header, into a
   pcap that tshark reads as DTLS, and, with the registrar's key log, as CoAP inside it.
2. Negative: 1,000 forged replies injected from the registrar's JPY port, 250 of each kind:
   random headers, bit-flipped real headers, exact replays of relayed replies, and headers
   really sealed under an old key (by the daemon's previous run, killed with -9). All are
   dropped and counted by reason; a sniffer on the join link sees none reach a pledge.
   (tests/test_field_jpy_relay.py has the same count with made-up key ids for "old key".)
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import PcapWriter, rdpcap

from brski.jpy import JpyMessage
from coaps_io import keylog
from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon
from lab.registrar_setup import READY_MARK, write_configs
from tests.coaps_probe import hello_verify_request
from tests.test_field_jpy_relay import JOIN_PORT, SNIFF, jpy_config
from tests.test_masa import brski_pki
from tests.test_registrar_coaps_capture import (
    CLIENT_HELLO,
    HELLO_VERIFY_REQUEST,
    TSHARK,
    check_handshake,
    coap,
    decode,
    handshake_types,
)

pytestmark = pytest.mark.netns

JPY_PORT = 5684
COAP_CLIENT = "coap-client-openssl"


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def registrar(lab: Lab, tmp_path: Path, serials: list[str]) -> tuple[Path, Path]:
    """The real registrar (CoAPS service behind its JPY port, key log on) and MASA."""
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), *[a for s in serials for a in ("--serial", s)])
    registrar_toml, masa_toml = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=["[fd4a:5044::100]:8443"], masa_timeout=5, mdns=False, grasp=False)
    with registrar_toml.open("a") as toml:
        toml.write(f'\n[jpy]\nlisten = "[::]:{JPY_PORT}"\n')
    keys = tmp_path / "registrar.keylog"
    host = lab.registrars[0]
    masa = host.spawn([PYTHON, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                      name="masa")
    reg = host.spawn([PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml)],
                     name="registrar", env={**os.environ, keylog.ENV: str(keys)})
    wait_for(lambda: READY_MARK in reg.log() and READY_MARK in masa.log(), 30,
             "the registrar and MASA")
    return pki, keys


def get_crts(lab: Lab, pledge: int, pki: Path, serial: str, out: Path) -> None:
    idevid = pki / "manufacturer/idevid"
    done = lab.pledges[pledge].run(
        [COAP_CLIENT, "-B", "20", "-c", str(idevid / f"{serial}.crt"), "-j",
         str(idevid / f"{serial}.key"), "-C", str(pki / "domain/ca.crt"), "-o", str(out),
         "-m", "get", "-A", "281", f"coaps://[fe80::1%eth0]:{JOIN_PORT}/.well-known/est/crts"],
        check=False, timeout=60)
    # coap-client exits 0 even when it fails (platform.md): the file is the proof.
    assert out.exists() and out.stat().st_size > 200, done.stdout + done.stderr


def jpy_datagrams(capture: Path, relay_port: int) -> list[tuple[bool, JpyMessage, bytes]]:
    """(upstream?, message, whole frame) for each datagram between the relay's fixed socket
    and the registrar's JPY port, in capture order."""
    out = []
    for frame in rdpcap(str(capture)):
        if UDP not in frame:
            continue
        udp = frame[UDP]
        ports = (udp.sport, udp.dport)
        if ports not in ((relay_port, JPY_PORT), (JPY_PORT, relay_port)):
            continue  # e.g. the daemon's DTLS probe, from its own socket
        out.append((udp.dport == JPY_PORT, JpyMessage.decode(bytes(udp.payload)),
                    bytes(frame)))
    return out


def unwrap_to_pcap(datagrams: list[tuple[bool, JpyMessage, bytes]], path: Path) -> None:
    """The DTLS inside the CBOR arrays as plain UDP: one synthetic pledge (fd00::N, port
    40000+N) per header, so tshark sees each flow as the registrar's DTLS stack saw it."""
    flows: dict[bytes, int] = {}
    writer = PcapWriter(str(path), linktype=229)  # LINKTYPE_IPV6: raw IPv6 packets
    for up, message, _ in datagrams:
        n = flows.setdefault(message.header, len(flows) + 1)
        pledge, port = f"fd00::{n:x}", 40000 + n
        if up:
            packet = IPv6(src=pledge, dst="fd4a:5044::100") / UDP(sport=port, dport=JPY_PORT)
        else:
            packet = IPv6(src="fd4a:5044::100", dst=pledge) / UDP(sport=JPY_PORT, dport=port)
        writer.write(packet / message.content)
    writer.close()


def test_backbone_capture_headers_and_the_dtls_inside(lab: Lab, tmp_path: Path) -> None:
    assert TSHARK, "tshark missing: make setup installs it"
    pki, keys = registrar(lab, tmp_path, ["SN-P0", "SN-P1"])
    daemon = ProxyDaemon(lab, tmp_path / "proxy", jpy_config(tmp_path / "proxy")).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    relay_port = daemon.ctl()["relays"]["jpy"]["source_port"]
    capture = tmp_path / "backbone.pcap"
    dumpcap = daemon.host.spawn(["dumpcap", "-i", "bb0", "-f", f"udp port {JPY_PORT}",
                                 "-P", "-w", str(capture)], name="dumpcap")
    wait_for(lambda: "Capturing on" in dumpcap.log(), 10, "dumpcap")
    # Three flows: pledge 0 twice (two source ports), pledge 1 once.
    for n, (pledge, serial) in enumerate([(0, "SN-P0"), (1, "SN-P1"), (0, "SN-P0")]):
        get_crts(lab, pledge, pki, serial, tmp_path / f"crts{n}.p7")
    relayed = daemon.ctl()["relays"]["jpy"]["datagrams"]
    # dumpcap writes each packet as it comes; wait until all are in the file, then stop.
    wait_for(lambda: len(jpy_datagrams(capture, relay_port)) >= relayed["upstream"]
             + relayed["downstream"], 10, "the capture")
    dumpcap.stop()
    datagrams = jpy_datagrams(capture, relay_port)
    assert len(datagrams) == relayed["upstream"] + relayed["downstream"], relayed

    # The header: never the pledge's address in clear, one per flow, never repeated across.
    secrets = []
    for host in lab.pledges:
        address = IPv6Address(host.address("eth0", link_local=True))
        secrets += [address.packed, address.packed[8:]]
    for _, message, frame in datagrams:
        assert len(message.header) <= 32
        for secret in secrets:
            assert secret not in message.header and secret not in frame
    flows: dict[bytes, list[bool]] = {}
    for up, message, _ in datagrams:
        flows.setdefault(message.header, []).append(up)
    assert len(flows) == 3, [h.hex() for h in flows]  # three flows, three headers
    for directions in flows.values():
        assert directions[0] and False in directions  # a flow starts upstream, is answered
    # Upstream, a new header appears only with a ClientHello that starts a flow: no datagram
    # of one flow is sent under another flow's header.
    first_seen: dict[bytes, int] = {}
    for i, (_, message, _) in enumerate(datagrams):
        first_seen.setdefault(message.header, i)
    for header, i in first_seen.items():
        assert datagrams[i][1].content[:1] == b"\x16" and datagrams[i][1].content[13] == \
            CLIENT_HELLO, header.hex()

    # tshark: the DTLS inside, each flow a full handshake; with the key log, the CoAP in it.
    unwrapped = tmp_path / "unwrapped.pcap"
    unwrap_to_pcap(datagrams, unwrapped)
    frames = decode(unwrapped, JPY_PORT, keys)
    by_flow: dict[str, list[dict[str, str]]] = {}
    done = subprocess.run([TSHARK, "-r", str(unwrapped), "-T", "fields", "-e", "ipv6.src",
                           "-e", "ipv6.dst"], capture_output=True, text=True, timeout=60)
    for frame, line in zip(frames, done.stdout.splitlines(), strict=True):
        src, dst = line.split("\t")
        by_flow.setdefault(src if src.startswith("fd00::") else dst, []).append(frame)
    assert sorted(by_flow) == ["fd00::1", "fd00::2", "fd00::3"], sorted(by_flow)
    for flow in by_flow.values():
        check_handshake(flow, decrypted=True)
        types = handshake_types(flow)
        assert types[:2] == [CLIENT_HELLO, HELLO_VERIFY_REQUEST]
        requests = [m for m in coap(flow) if m["coap.code"] == "1"]  # 0.01 GET
        assert requests and all(r["coap.opt.uri_path"] == ".well-known;est;crts"
                                for r in requests), flow
        assert any(m["coap.code"] == "69" for m in coap(flow))  # 2.05 Content
    # Without the key log the handshake still decodes, the CoAP does not.
    assert coap(decode(unwrapped, JPY_PORT, None)) == []
    daemon.stop()


# The stand-in registrar: records the headers it sees in order; echoes; on b"INJECT" fires
# 250 replies of each forged kind at the proxy, from its own JPY port.
INJECTOR = """
import random, socket, sys
import cbor2
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
headers, sent = [], []
while True:
    data, peer = s.recvfrom(65535)
    header, content = cbor2.loads(data)[:2]
    if content[:1] == b"\\x16":  # the daemon's DTLS health probe: a HelloVerifyRequest will do
        hvr = bytes.fromhex("@HVR@")
        s.sendto(cbor2.dumps([header, hvr]), peer)
        continue
    if header not in headers:
        headers.append(header)
    if content != b"INJECT":
        reply = cbor2.dumps([header, b"echo:" + content])
        if len(headers) > 1:  # replies of the current run only: those are the replays
            sent.append(reply)
        s.sendto(reply, peer)
        continue
    old = headers[0]  # sealed by the daemon's previous run
    assert old != header
    rng = random.Random(14)
    forged = []
    for i in range(250):
        forged.append(cbor2.dumps([header[:1] + rng.randbytes(len(header) - 1), b"RANDOM"]))
        flipped = bytearray(header)
        bit = 8 + i % (8 * len(header) - 8)  # every bit after the key id
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        forged.append(cbor2.dumps([bytes(flipped), b"FLIPPED"]))
        forged.append(sent[i % len(sent)])
        forged.append(cbor2.dumps([old, b"OLD-KEY-%d" % i]))
    for datagram in forged:
        s.sendto(datagram, peer)
    print("injected", len(forged), flush=True)
""".replace("@HVR@", hello_verify_request().hex())

PLEDGE = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", 40001))  # one source port for both runs: the same pledge flow
s.settimeout(3)
target = ("fe80::1%eth0", int(sys.argv[1]))
for i in range(3):
    s.sendto(b"hello-%d" % i, target)
    print(s.recv(2048).decode(), flush=True)
if sys.argv[2] == "inject":
    s.sendto(b"INJECT", target)
    s.settimeout(0.5)
    deadline = time.time() + 4
    while time.time() < deadline:
        try:
            print("late", s.recv(2048), flush=True)
        except TimeoutError:
            pass
print("done", flush=True)
"""


def test_a_thousand_forged_replies_of_four_kinds_all_dropped(lab: Lab, tmp_path: Path) -> None:
    host = lab.registrars[0]
    host.spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"], name="tcp-health")
    injector = host.spawn([PYTHON, "-c", INJECTOR, str(JPY_PORT)], name="injector")
    config = jpy_config(tmp_path / "proxy")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    old_key = daemon.ctl()["relays"]["jpy"]["key_id"]
    first = lab.pledges[0].spawn([PYTHON, "-c", PLEDGE, str(JOIN_PORT), "-"], name="first")
    wait_for(lambda: "done" in first.log(), 15, "the first run's pledge")
    assert first.log().split("\n")[:3] == ["echo:hello-0", "echo:hello-1", "echo:hello-2"]
    daemon.kill()  # its key dies with it: the headers it sealed are old-key headers now
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar again")
    new_key = daemon.ctl()["relays"]["jpy"]["key_id"]
    sniffers = [p.spawn([PYTHON, "-c", SNIFF], name=f"sniff{i}")
                for i, p in enumerate(lab.pledges)]
    wait_for(lambda: all("ready" in s.log() for s in sniffers), 10, "the sniffers")
    attacked = lab.pledges[0].spawn([PYTHON, "-c", PLEDGE, str(JOIN_PORT), "inject"],
                                    name="attacked")
    wait_for(lambda: "done" in attacked.log(), 20, "the attacked pledge")
    assert "injected 1000" in injector.log(), injector.log()
    lines = attacked.log().split("\n")
    assert lines[:3] == ["echo:hello-0", "echo:hello-1", "echo:hello-2"], attacked.log()
    assert not [line for line in lines if line.startswith("late")], attacked.log()
    time.sleep(0.5)
    for n, sniffer in enumerate(sniffers):  # every UDP datagram to a pledge on the join link
        heard = [bytes.fromhex(line.split()[1]) for line in sniffer.log().splitlines()
                 if line.startswith("fe80::1 ")]
        assert heard == ([b"echo:hello-%d" % i for i in range(3)] if n == 0 else []), heard
    # An old header whose key id the new run happens to use opens under the wrong key:
    # forged, not stale (1 in 256 runs).
    old_forged = 250 if old_key == new_key else 0
    wait_for(lambda: daemon.drops("jpy", "jpy-forged") == 500 + old_forged, 5,
             "the forged count")
    assert daemon.drops("jpy", "jpy-replayed") == 250
    assert daemon.drops("jpy", "jpy-stale") == 250 - old_forged
    assert daemon.sample("joinproxyd_relayed_datagrams_total", mode="jpy",
                         direction="downstream") == 3
    assert "Traceback" not in daemon.log()
    daemon.stop()
