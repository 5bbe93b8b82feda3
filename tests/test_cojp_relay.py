"""The cojp relay mode (RFC 9031 stateless join proxy) through the real daemon, in namespaces.

Pledges speak plain UDP CoAP (brski.coap_datagram) to the proxy's link-local address, port 5683:
CoJP-shaped join requests (POST, Proxy-Scheme "coap", Uri-Host "6tisch.arpa", an OSCORE option
and an opaque payload; the proxy never reads OSCORE). A stand-in JRC on the backbone is an
aiocoap server with the RFC 8974 codec fix (coaps_io.extended_tokens), which answers 2.04 with
b"cfg:" + the payload and logs what it received. Checked: the JRC sees NON requests without
the two proxy options, with the sealed 38+ byte token; the pledge gets a piggybacked ACK (its
CON's message ID) or a NON, with its own token; both links carry the packets marked AF43; the
backbone never shows the pledge's interface identifier. Negative: 1,000 forged responses
injected from the JRC's address and port (random tokens, bit-flipped, replayed, sealed by the
killed previous run) are all dropped and counted and none reaches a pledge; the join rate limit
per link; non-join CoAP and garbage are dropped and counted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from brski.coap_datagram import CoapDatagram
from joinproxyd.config import ConfigError, parse
from lab import Lab, LabProcess, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config
from tests.test_field_jpy_relay import SNIFF

pytestmark = pytest.mark.netns

JRC_PORT = 5683
JOIN_PORT = 5683
AF43 = 0x98

JRC = """
import asyncio
from coaps_io import extended_tokens
extended_tokens.install()
import aiocoap
from aiocoap import resource

class Join(resource.Resource):
    async def render_post(self, request):
        numbers = sorted(int(o.number) for o in request.opt.option_list())
        print("request", request.mtype.name, request.token.hex(), numbers,
              request.payload.hex(), flush=True)
        answer = aiocoap.Message(code=aiocoap.CHANGED, payload=b"cfg:" + request.payload)
        answer.opt.oscore = b""
        return answer

async def main():
    site = resource.Site()
    site.add_resource([], Join())
    await aiocoap.Context.create_server_context(site, bind=("fd4a:5044::100", %d))
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()

asyncio.run(main())
""".replace("%d", str(JRC_PORT))

# A pledge: argv = port, then requests as "con|non:token-hex:payload"; prints each answer.
PLEDGE = """
import socket, sys
from brski.coap_datagram import CoapDatagram, MessageType
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[2]))
target = ("fe80::1%eth0", int(sys.argv[1]))
for n, spec in enumerate(sys.argv[3:]):
    kind, token, payload = spec.split(":")
    options = ((3, b"6tisch.arpa"), (9, bytes.fromhex("0900") + b"pledge-1"), (39, b"coap"))
    if kind == "plain":  # a CoAP request to the proxy itself, not a join request
        options = ((11, b"j"),)
    mtype = MessageType.CON if kind == "con" else MessageType.NON
    mid = 0x1000 + n
    s.sendto(CoapDatagram(mtype, 2, mid, bytes.fromhex(token), options,
                          payload.encode()).encode(), target)
    try:
        data = s.recv(2048)
    except TimeoutError:
        print("timeout", mid, flush=True)
        continue
    a = CoapDatagram.decode(data)
    print("answer", a.mtype.name, a.message_id == mid, a.token.hex(), a.code,
          [n for n, _ in a.options], a.payload.decode(), flush=True)
print("done", flush=True)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def cojp_config(run_dir: Path, **cojp: float) -> dict:
    config = base_config(
        run_dir, join=[{"interfaces": ["join*"], "modes": ["cojp"]}],
        registrars={"discovery": ["static"],
                    "static": [{"address": "fd4a:5044::100", "port": 8443, "preference": 10,
                                "cojp_port": JRC_PORT}],
                    "health_interval": 0.3, "health_timeout": 0.3})
    if cojp:
        config["cojp"] = cojp
    return config


def start_jrc(lab: Lab) -> LabProcess:
    host = lab.registrars[0]
    # The registrar's TCP health check is what makes it active: something must listen.
    host.spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"], name="tcp-health")
    jrc = host.spawn([PYTHON, "-c", JRC], name="jrc")
    wait_for(lambda: "ready" in jrc.log(), 15, "the stand-in JRC")
    return jrc


def start_daemon(lab: Lab, tmp_path: Path, config: dict) -> ProxyDaemon:
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    return daemon


def pledge(lab: Lab, n: int, *requests: str, timeout: float = 3) -> str:
    done = lab.pledges[n].run([PYTHON, "-c", PLEDGE, str(JOIN_PORT), str(timeout),
                               *requests], timeout=60)
    assert "done" in done.stdout, done.stdout + done.stderr
    return done.stdout


def capture(lab: Lab, host_index: int | None, path: Path) -> LabProcess:
    host = lab.registrars[0] if host_index is None else lab.pledges[host_index]
    # --immediate-mode -U: every packet is written as it comes (tests/test_registrar_coaps_
    # capture.py: without it, packets in the kernel's ring at the stop are never written).
    dump = host.spawn(["tcpdump", "-i", "eth0", "--immediate-mode", "-U", "-w", str(path),
                       "udp"], name="tcpdump")
    wait_for(lambda: "listening on" in dump.log(), 10, "tcpdump")
    return dump


def from_jrc(pcap: Path) -> list[tuple[str, bytes, int, int]]:
    """(destination, UDP payload, destination port, traffic class) of each JRC datagram."""
    return [(f[IPv6].dst, bytes(f[UDP].payload), f[UDP].dport, f[IPv6].tc)
            for f in rdpcap(str(pcap)) if UDP in f and f[UDP].sport == JRC_PORT
            and not is_ping(bytes(f[UDP].payload))]


def is_ping(payload: bytes) -> bool:
    """The daemon's JRC health probe (an empty CON) and its Reset: CoAP code 0.00."""
    return len(payload) >= 2 and payload[1] == 0


def test_join_requests_relayed_both_ways_statelessly(lab: Lab, tmp_path: Path) -> None:
    backbone = capture(lab, None, tmp_path / "backbone.pcap")
    link = capture(lab, 0, tmp_path / "link.pcap")
    jrc = start_jrc(lab)
    daemon = start_daemon(lab, tmp_path, cojp_config(tmp_path / "proxy"))
    out0 = pledge(lab, 0, "con:08:join-a", "non::join-b", "con:0102030405060708:join-c")
    out1 = pledge(lab, 1, "con:cafe:join-d")
    # The pledge's CON is answered with a piggybacked ACK (its message ID), its NON with a
    # NON; its own token comes back; the OSCORE option (9) passes through; 2.04 = 68.
    assert out0.splitlines()[:3] == [
        "answer ACK True 08 68 [9] cfg:join-a",
        "answer NON False  68 [9] cfg:join-b",
        "answer ACK True 0102030405060708 68 [9] cfg:join-c"], out0
    assert out1.splitlines()[0] == "answer ACK True cafe 68 [9] cfg:join-d", out1
    # The JRC saw NON requests, with the OSCORE option only (no Proxy-Scheme, no Uri-Host)
    # and an extended token: the sealed state, different for every request.
    seen = [line.split() for line in jrc.log().splitlines() if line.startswith("request")]
    assert len(seen) == 4, jrc.log()
    assert {(kind, opts) for _, kind, _, opts, _ in seen} == {("NON", "[9]")}, seen
    tokens = [bytes.fromhex(token) for _, _, token, _, _ in seen]
    assert len(set(tokens)) == 4 and all(38 <= len(t) <= 46 for t in tokens), tokens
    assert [bytes.fromhex(p) for *_, p in seen] == [b"join-a", b"join-b", b"join-c",
                                                    b"join-d"]
    relay = daemon.ctl()["relays"]["cojp"]
    assert relay["datagrams"] == {"upstream": 4, "downstream": 4}, relay
    assert relay["jrc"] == f"[fd4a:5044::100]:{JRC_PORT}"
    assert relay["listeners"] == [{"interface": "join0", "address": "fe80::1",
                                   "port": JOIN_PORT, "protocol": "udp"}]
    def udp(pcap: Path, sport: int | None = None, dport: int | None = None) -> list[Any]:
        return [f for f in rdpcap(str(pcap)) if UDP in f
                and (sport is None or f[UDP].sport == sport)
                and (dport is None or f[UDP].dport == dport)
                and not is_ping(bytes(f[UDP].payload))]
    wait_for(lambda: len(udp(tmp_path / "backbone.pcap", dport=JRC_PORT)) >= 4
             and len(udp(tmp_path / "link.pcap", sport=JOIN_PORT)) >= 3, 5, "the captures")
    time.sleep(0.3)  # and nothing more comes
    backbone.stop()
    link.stop()
    # Marked AF43 both ways out of the proxy; no pledge address on the backbone.
    frames = rdpcap(str(tmp_path / "backbone.pcap"))
    to_jrc = udp(tmp_path / "backbone.pcap", dport=JRC_PORT)
    assert len(to_jrc) == 4 and {f[IPv6].tc for f in to_jrc} == {AF43}
    secrets = []
    for host in lab.pledges:
        address = IPv6Address(host.address("eth0", link_local=True))
        secrets += [address.packed, address.packed[8:]]
    assert not [f for f in frames for s in secrets if s in bytes(f)]
    answers = udp(tmp_path / "link.pcap", sport=JOIN_PORT)
    assert len(answers) == 3 and {f[IPv6].tc for f in answers} == {AF43}
    assert daemon.sample("joinproxyd_relayed_datagrams_total", mode="cojp",
                         direction="upstream") == 4
    assert "Traceback" not in daemon.log()
    daemon.stop()


INJECT = """
import sys
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import send
dst, port = sys.argv[1], int(sys.argv[2])
packets = [IPv6(src="fd4a:5044::100", dst=dst) / UDP(sport=%d, dport=port) / bytes.fromhex(h)
           for h in open(sys.argv[3]).read().split()]
send(packets, verbose=0)
print("sent", len(packets), flush=True)
""".replace("%d", str(JRC_PORT))


def test_a_thousand_forged_responses_dropped_none_reaches_a_pledge(lab: Lab,
                                                                  tmp_path: Path) -> None:
    backbone = capture(lab, None, tmp_path / "backbone.pcap")
    start_jrc(lab)
    config = cojp_config(tmp_path / "proxy")
    daemon = start_daemon(lab, tmp_path, config)
    old_key = daemon.ctl()["relays"]["cojp"]["key_id"]
    assert pledge(lab, 0, "non:01:first").startswith("answer NON False 01 68 [9] cfg:first")
    daemon.kill()  # the token key dies with it
    daemon = start_daemon(lab, tmp_path, config)
    new_key = daemon.ctl()["relays"]["cojp"]["key_id"]
    assert pledge(lab, 0, "non:02:second").startswith("answer NON False 02 68 [9] cfg:second")
    wait_for(lambda: len(from_jrc(tmp_path / "backbone.pcap")) >= 2, 5, "the JRC's answers")
    (proxy, old, _, _), (_, current, port, _) = from_jrc(tmp_path / "backbone.pcap")[:2]
    sniffers = [p.spawn([PYTHON, "-c", SNIFF], name=f"sniff{i}")
                for i, p in enumerate(lab.pledges)]
    wait_for(lambda: all("ready" in s.log() for s in sniffers), 10, "the sniffers")

    reply = CoapDatagram.decode(current)
    old_reply = CoapDatagram.decode(old)
    rng = random.Random(15)
    forged = []
    for i in range(250):
        token = bytes([reply.token[0]]) + rng.randbytes(len(reply.token) - 1)
        forged.append(CoapDatagram(reply.mtype, reply.code, i, token, reply.options,
                                   b"random").encode())
        flipped = bytearray(reply.token)
        bit = 8 + i % (8 * len(flipped) - 8)  # every bit after the key id
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        forged.append(CoapDatagram(reply.mtype, reply.code, i, bytes(flipped), reply.options,
                                   b"flipped").encode())
        forged.append(current)  # an exact replay of the relayed answer
        forged.append(CoapDatagram(old_reply.mtype, old_reply.code, i, old_reply.token,
                                   old_reply.options, b"old-key-%d" % i).encode())
    listing = tmp_path / "forged.hex"
    listing.write_text("\n".join(d.hex() for d in forged))
    sent = lab.registrars[0].run([PYTHON, "-c", INJECT, proxy, str(port), str(listing)],
                                 timeout=120)
    assert "sent 1000" in sent.stdout, sent.stdout + sent.stderr
    old_forged = 250 if old_key == new_key else 0  # same key id, other key: forged
    wait_for(lambda: daemon.drops("cojp", "cojp-forged") == 500 + old_forged, 10,
             "the forged count")
    assert daemon.drops("cojp", "cojp-replayed") == 250
    assert daemon.drops("cojp", "cojp-stale") == 250 - old_forged
    assert daemon.ctl()["relays"]["cojp"]["datagrams"]["downstream"] == 1
    time.sleep(0.5)
    for sniffer in sniffers:  # nothing reached a pledge after the sniffers started
        assert not [line for line in sniffer.log().splitlines()
                    if line.startswith("fe80::1 ")], sniffer.log()
    backbone.stop()
    daemon.stop()


def test_join_rate_limit_and_what_is_not_a_join_request(lab: Lab, tmp_path: Path) -> None:
    jrc = start_jrc(lab)
    daemon = start_daemon(lab, tmp_path, cojp_config(tmp_path / "proxy", rate=0.5, burst=3))
    out = pledge(lab, 0, *[f"non:{i:02x}:burst-{i}" for i in range(8)], timeout=0.3)
    assert sum(line.startswith("answer NON") for line in out.splitlines()) == 3, out
    assert daemon.drops("cojp", "rate-limit") == 5
    assert len([line for line in jrc.log().splitlines() if line.startswith("request")]) == 3
    # Not a join request: a plain CoAP request to the proxy, garbage, a 9-byte token.
    out = pledge(lab, 1, "plain:01:x", timeout=0.3)
    assert "timeout" in out
    wait_for(lambda: daemon.drops("cojp", "irrelevant") == 1, 5, "the irrelevant count")
    lab.pledges[1].run([PYTHON, "-c", (
        "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM);"
        f"s.sendto(b'\\xff\\x00', ('fe80::1%eth0', {JOIN_PORT}))")])
    wait_for(lambda: daemon.drops("cojp", "malformed") == 1, 5, "the malformed count")
    status = daemon.ctl()["relays"]["cojp"]
    assert status["join_rate"] == {"rate": 0.5, "burst": 3}
    assert "Traceback" not in daemon.log()
    daemon.stop()


def test_config() -> None:
    def error(**join: object) -> str:
        data = {"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["j*"], **join}],
                "registrars": {"static": [{"address": "fd00::1", "cojp_port": 5683}]}}
        try:
            parse(data)
        except ConfigError as exc:
            return str(exc)
        return ""
    assert error(modes=["cojp", "jpy"]).startswith("join[0].modes: cojp cannot share")
    config = parse({"backbone": {"interface": "bb0"},
                    "join": [{"interfaces": ["j*"], "modes": ["cojp"]}],
                    "registrars": {"static": [{"address": "fd00::1", "cojp_port": 5683}]},
                    "cojp": {"rate": 0, "burst": 4}})
    assert config.joins[0].port == 5683 and config.static_registrars[0].cojp_port == 5683
    assert (config.cojp.rate, config.cojp.burst) == (0.0, 4)
    with pytest.raises(ConfigError, match=r"cojp\.burst: must be an integer"):
        parse({"backbone": {"interface": "bb0"}, "cojp": {"burst": 0}})
    with pytest.raises(ConfigError, match=r"cojp\.speed: unknown key"):
        parse({"backbone": {"interface": "bb0"}, "cojp": {"speed": 1}})


# What the CoRE join-port responder (discovery/coap_join.py, aiocoap) holds while a jpy or
# coaps link is served: [::]:5683 with SO_REUSEPORT.
CORE_RESPONDER = """
import socket, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 5683))
print("bound", flush=True)
time.sleep(600)
"""


def test_cojp_binds_beside_the_core_responder_on_5683(lab: Lab, tmp_path: Path) -> None:
    """A daemon serving jpy on one link (CoRE discovery on [::]:5683) and cojp on another
    binds both: the cojp socket, on the link's own address and interface, takes that link's
    unicast join requests."""
    start_jrc(lab)
    responder = lab.proxy.spawn([PYTHON, "-c", CORE_RESPONDER], name="core-responder")
    wait_for(lambda: "bound" in responder.log(), 10, "the stand-in CoRE responder")
    daemon = start_daemon(lab, tmp_path, cojp_config(tmp_path / "proxy"))
    relay = daemon.ctl()["relays"]["cojp"]
    assert relay["listeners"], daemon.log()[-2000:]
    assert pledge(lab, 0, "con:08:beside").startswith("answer ACK True 08 68 [9] cfg:beside")
    daemon.stop()


def test_a_jrc_without_extended_tokens_is_named_once(lab: Lab, tmp_path: Path) -> None:
    """libcoap 4.3.1's coap-server as the JRC: it refuses any token over 8 bytes with RST. The
    pledge gets nothing, each RST is counted (irrelevant) and the log says why, once."""
    host = lab.registrars[0]
    host.spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"], name="tcp-health")
    server = host.spawn(["coap-server-openssl", "-A", "fd4a:5044::100", "-p", str(JRC_PORT),
                         "-v", "6"], name="libcoap-jrc")
    daemon = start_daemon(lab, tmp_path, cojp_config(tmp_path / "proxy"))
    out = pledge(lab, 0, "non:01:a", "non:02:b", timeout=1)
    assert out.count("timeout") == 2, out
    wait_for(lambda: daemon.drops("cojp", "irrelevant") == 2, 5, "the RSTs counted")
    assert server.log().count("discard malformed PDU") == 2, server.log()[-2000:]
    assert daemon.log().count("does it accept RFC 8974 extended tokens") == 1, daemon.log()
    daemon.stop()
