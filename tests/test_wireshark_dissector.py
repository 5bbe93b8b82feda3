"""The shipped Wireshark dissector (packaging/wireshark/joinproxyd.lua), run by tshark.

- In a namespace lab, the real joinproxyd floods AN_Proxy on its join link and a pledge sends
  a JPY message (encoded by brski.jpy: a sealed flow header and the draft's DTLS ClientHello)
  and malformed GRASP and JPY datagrams; tcpdump captures the pledge's link. tshark with the
  dissector must decode the flood field by field as the library decodes the same bytes (and as
  the daemon's configuration says), the JPY header and content byte for byte, and show every
  malformed datagram as malformed (expert info), with no Lua error.
- Offline (text2pcap): the RFC 8995 §4.3 registrar flood with an IPIP locator whose port is
  null, the other GRASP message types, and a corpus of truncated and bit-flipped floods.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from ipaddress import IPv6Address
from pathlib import Path

import cbor2
import pytest

from brski import grasp
from brski.jpy import FlowHeaderSealer, JpyMessage, PledgeEndpoint
from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config, echo_registrar

ROOT = Path(__file__).resolve().parent.parent
DISSECTOR = ROOT / "packaging" / "wireshark" / "joinproxyd.lua"
JPY_PORT = 7634  # the dissector's default jpy.udp_port
GRASP_FIELDS = ["grasp.msg_type", "grasp.session_id", "grasp.initiator", "grasp.ttl",
                "grasp.objective", "grasp.objective.flags", "grasp.objective.loop_count",
                "grasp.objective.value", "grasp.option", "grasp.locator.ipv6",
                "grasp.locator.protocol", "grasp.locator.port"]
JPY_FIELDS = ["jpy.elements", "jpy.header", "jpy.header_length", "jpy.content",
              "jpy.content_length", "dtls.handshake.type"]

# Sends each hex payload given as "host%if:port:hex" as one UDP datagram.
SENDER = """
import socket, sys
for arg in sys.argv[1:]:
    host, port, data = arg.rsplit(":", 2)
    addr, ifname = host.split("%")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.sendto(bytes.fromhex(data), (addr, int(port), 0, socket.if_nametoindex(ifname)))
    s.close()
"""


def tshark(pcap: Path, fields: list[str], *extra: str) -> list[dict[str, list[str]]]:
    """One dict per frame: field -> all its occurrences, plus the raw UDP payload and the
    expert messages. Fails on any Lua error."""
    if shutil.which("tshark") is None:
        pytest.fail("tshark is missing: `make setup` installs it")
    names = ["frame.number", "udp.payload", "_ws.expert.message", *fields]
    # JSON, not -T fields: a mangled text string may contain any separator character
    argv = ["tshark", "-X", f"lua_script:{DISSECTOR}", "-r", str(pcap), "-n", "-T", "json",
            *extra]
    for name in names:
        argv += ["-e", name]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "Lua" not in done.stderr and "lua" not in done.stderr, done.stderr
    frames = []
    for packet in json.loads(done.stdout):
        layers = packet["_source"]["layers"]
        frames.append({n: layers.get(n, []) for n in names})
    return frames


def payload(frame: dict[str, list[str]]) -> bytes:
    return bytes.fromhex(frame["udp.payload"][0].replace(":", ""))


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


class Unshown(Exception):
    """A value whose exact rendering this test does not predict (floats, tags, text with
    control characters): its presence is checked, not its text."""


def diagnostic(value: object) -> str:
    """CBOR diagnostic notation as the dissector writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return f"h'{value[:64].hex()}{'...' if len(value) > 64 else ''}'"
    if isinstance(value, str):
        if any(c in value for c in '"\\') or not all(c.isprintable() for c in value):
            raise Unshown
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(diagnostic(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in value.items()) + "}"
    raise Unshown


def expected_grasp_fields(flood: grasp.Flood) -> dict[str, list[str]]:
    """What the dissector must show for a flood, computed from the library's decoding."""
    exp: dict[str, list[str]] = {f: [] for f in GRASP_FIELDS}
    exp["grasp.msg_type"] = [str(grasp.M_FLOOD)]
    exp["grasp.session_id"] = [str(flood.session_id)]
    exp["grasp.initiator"] = [str(flood.initiator)]
    exp["grasp.ttl"] = [str(flood.ttl_ms)]
    for entry in flood.entries:
        o = entry.objective
        exp["grasp.objective"].append(o.name)
        exp["grasp.objective.flags"].append(f"0x{o.flags:02x}")
        exp["grasp.objective.loop_count"].append(str(o.loop_count))
        if o.value is not grasp.NO_VALUE:
            exp["grasp.objective.value"].append(diagnostic(o.value))
        loc = entry.locator
        if isinstance(loc, grasp.IPv6Locator):
            exp["grasp.option"].append(str(grasp.O_IPV6_LOCATOR))
            exp["grasp.locator.ipv6"].append(str(loc.address))
            exp["grasp.locator.protocol"].append(str(loc.protocol))
            if loc.port is not None:
                exp["grasp.locator.port"].append(str(loc.port))
        elif isinstance(loc, grasp.OtherLocator):
            exp["grasp.option"].append(str(loc.option))
    return exp


def assert_grasp_frame(frame: dict[str, list[str]], flood: grasp.Flood) -> None:
    try:
        expected = expected_grasp_fields(flood)
    except Unshown:
        expected = expected_grasp_fields(grasp.Flood(flood.session_id, flood.initiator,
                                                     flood.ttl_ms, tuple(
            grasp.FloodEntry(grasp.Objective(e.objective.name, e.objective.flags,
                                             e.objective.loop_count), e.locator)
            for e in flood.entries)))
        assert len(frame["grasp.objective.value"]) == len(flood.entries)
        del expected["grasp.objective.value"]
    for field, values in expected.items():
        assert frame[field] == values, (field, frame[field], values)
    assert frame["_ws.expert.message"] == [], frame


def malformed_grasp() -> list[bytes]:
    good = grasp.proxy_flood(lambda n: b"\0\0\0\1", IPv6Address("fe80::1"), 8443).encode()
    return [
        b"\x85\x09\x1a",  # array of 5, truncated inside the session id
        b"\x9b" + b"\xff" * 8,  # an array claiming 2^64-1 elements
        b"\x81" * 40,  # nested 40 deep
        b"\xa1\x01",  # a map with a key and no value
        cbor2.dumps({"not": "an array"}),
        cbor2.dumps([9]),  # M_FLOOD without a session id
        cbor2.dumps([9, "x", b"", 1, []]),  # session id is text
        cbor2.dumps([9, 1, b"\xfe\x80" + b"\0" * 13, 1, [["AN_Proxy", 4, 1, ""], []]]),  # 15 B
        cbor2.dumps([9, 1, b"\0" * 16, 1, [["AN_Proxy", 4, 1, ""], [103, b"\0" * 16, 6]]]),
        cbor2.dumps([9, 1, b"\0" * 16, 1, [["AN_Proxy", 300, 1]]]),  # flags > 255, no pair
        cbor2.dumps([9, 1, b"\0" * 16, 100]),  # a flood without entries
        good[:-3],  # truncated
        b"\x5f\x41\x00\x61\x61\xff",  # indefinite byte string with a text chunk
        b"\xfc",  # reserved additional information
    ]


def malformed_jpy() -> list[bytes]:
    return [
        b"\x82\x50" + b"\x01" * 5,  # header claims 16 bytes, has 5
        cbor2.dumps([b"only one"]),
        cbor2.dumps([b"h", "text content"]),
        cbor2.dumps(["text header", b"c"]),
        cbor2.dumps({b"h": b"c"}),
        cbor2.dumps([b"h", b"c"]) + b"\x00",  # trailing byte
    ]


# ---------------------------------------------------------------- real daemon, real capture

@pytest.fixture
def lab(as_root: None, tmp_path: Path):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


@pytest.mark.netns
def test_tshark_decodes_a_captured_flood_and_jpy_message(lab: Lab, tmp_path: Path,
                                                         vectors: Path) -> None:
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
    pledge = lab.pledges[0]
    pcap = tmp_path / "cap.pcap"
    dump = pledge.spawn(["tcpdump", "-i", "eth0", "-n", "-U", "-w", str(pcap), "udp"],
                        name="tcpdump")
    wait_for(lambda: "listening on" in dump.log(), 10, "tcpdump to listen")

    # A JPY message as a stateless proxy sends it: sealed flow header + a DTLS ClientHello.
    draft = (vectors / "constrained-join-proxy" / "draft-ietf-anima-constrained-join-proxy.md")
    client_hello = bytes.fromhex(re.findall(r"\[ h'([0-9a-f]+)' , h'([0-9a-f]+)' \]",
                                            draft.read_text())[0][1])
    header = FlowHeaderSealer(bytes(range(32))).seal(
        PledgeEndpoint(IPv6Address("fe80::1234:5678"), 45965, 3))
    jpy = JpyMessage(header, client_hello).encode()
    bad_grasp, bad_jpy = malformed_grasp(), malformed_jpy()
    daemon.start()
    try:
        pledge.run([sys.executable, "-c", SENDER, f"fe80::1%eth0:{JPY_PORT}:{jpy.hex()}",
                    *(f"ff02::13%eth0:{grasp.GRASP_PORT}:{d.hex()}" for d in bad_grasp),
                    *(f"fe80::1%eth0:{JPY_PORT}:{d.hex()}" for d in bad_jpy)])
        time.sleep(2.5)  # announce.interval is 1 s: at least two floods on the wire
        assert daemon.ctl()["joining"]
    finally:
        dump.stop()
        assert daemon.stop() == 0

    frames = tshark(pcap, [*GRASP_FIELDS, *JPY_FIELDS])
    by_payload = {payload(f): f for f in frames if f["udp.payload"]}

    # the daemon's floods: decoded as the library decodes them, and as configured
    floods = [f for f in frames if f["grasp.msg_type"] == ["9"] and payload(f) not in bad_grasp]
    assert len(floods) >= 2, frames
    for frame in floods:
        flood = grasp.Flood.decode(payload(frame))
        assert flood.locators_for("AN_Proxy") == [
            grasp.IPv6Locator(IPv6Address("fe80::1"), grasp.IPPROTO_TCP, 8443)]
        assert_grasp_frame(frame, flood)
    assert floods[0]["grasp.objective"] == ["AN_Proxy"]
    assert floods[0]["grasp.objective.flags"] == ["0x04"]
    assert floods[0]["grasp.objective.loop_count"] == ["1"]
    assert floods[0]["grasp.locator.port"] == ["8443"]
    assert floods[0]["grasp.initiator"] == ["fe80::1"]
    # each flood has its own session id
    assert len({f["grasp.session_id"][0] for f in floods}) == len(floods)

    # the JPY message, byte for byte, and the DTLS ClientHello inside it
    frame = by_payload[jpy]
    assert frame["jpy.elements"] == ["2"]
    assert hexbytes(frame["jpy.header"][0]) == header
    assert frame["jpy.header_length"] == [str(len(header))] == ["32"]
    assert hexbytes(frame["jpy.content"][0]) == client_hello
    assert frame["jpy.content_length"] == ["427"]
    assert frame["dtls.handshake.type"] == ["1"]  # client_hello
    assert frame["_ws.expert.message"] == []

    # every malformed datagram is shown as malformed, and nothing else is said about it
    for data in bad_grasp:
        expert = by_payload[data]["_ws.expert.message"]
        assert expert and expert[0].startswith("Malformed GRASP message: "), (data, expert)
    for data in bad_jpy:
        expert = by_payload[data]["_ws.expert.message"]
        assert expert and expert[0].startswith("Malformed JPY message: "), (data, expert)


# ---------------------------------------------------------------- offline, from text2pcap

def write_pcap(tmp_path: Path, datagrams: list[bytes], port: int = grasp.GRASP_PORT) -> Path:
    text = tmp_path / "frames.txt"
    text.write_text("".join("0000 " + " ".join(f"{b:02x}" for b in d) + "\n\n"
                            for d in datagrams))
    pcap = tmp_path / "frames.pcap"
    subprocess.run(["text2pcap", "-q", "-6", "fe80::1,ff02::13", "-u", f"{port},{port}",
                    str(text), str(pcap)], check=True, capture_output=True, timeout=60)
    return pcap


def test_registrar_flood_with_an_ipip_locator(tmp_path: Path) -> None:
    """RFC 8995 §4.3's registrar flood with a TCP locator and an IPIP one (port null)."""
    flood = grasp.registrar_flood(
        lambda n: bytes.fromhex("0316c621"), IPv6Address("fda3:79a6:f6ee:0:200:0:6400:1"),
        [grasp.IPv6Locator(IPv6Address("fda3:79a6:f6ee:0:200:0:6400:1"), 6, 8443),
         grasp.IPv6Locator(IPv6Address("fe80::1234"), grasp.IPPROTO_IPV6, None)])
    (frame,) = tshark(write_pcap(tmp_path, [flood.encode()]), GRASP_FIELDS)
    assert_grasp_frame(frame, flood)
    assert frame["grasp.session_id"] == ["51824161"]
    assert frame["grasp.objective"] == ["AN_join_registrar"] * 2
    assert frame["grasp.objective.loop_count"] == ["255"] * 2
    assert frame["grasp.objective.value"] == ['"EST-TLS"'] * 2
    assert frame["grasp.locator.protocol"] == ["6", "41"]
    assert frame["grasp.locator.port"] == ["8443"]  # the IPIP locator has none


def test_other_grasp_message_types(tmp_path: Path) -> None:
    ll = IPv6Address("fe80::2").packed
    messages = [
        cbor2.dumps([1, 77, ll, ["AN_join_registrar", 5, 6]]),  # M_DISCOVERY
        cbor2.dumps([2, 77, ll, 60000, [103, ll, 17, 5684]]),  # M_RESPONSE
        cbor2.dumps([4, 78, ["EX1", 4, 1]]),  # M_REQ_SYN
        cbor2.dumps([8, 78, ["EX1", 4, 1, {"a": [1, 2]}]]),  # M_SYNCH with a map value
        cbor2.dumps([7, 79, 3000]),  # M_WAIT
        cbor2.dumps([0]),  # M_NOOP
        cbor2.dumps([99, 80, "why"]),  # M_INVALID
    ]
    frames = tshark(write_pcap(tmp_path, messages), [*GRASP_FIELDS, "grasp.waiting_time"])
    assert [f["grasp.msg_type"] for f in frames] == [["1"], ["2"], ["4"], ["8"], ["7"], ["0"],
                                                     ["99"]]
    assert frames[0]["grasp.objective"] == ["AN_join_registrar"]
    assert frames[0]["grasp.objective.flags"] == ["0x05"]
    assert frames[1]["grasp.ttl"] == ["60000"]
    assert frames[1]["grasp.locator.ipv6"] == ["fe80::2"]
    assert frames[1]["grasp.locator.port"] == ["5684"]
    assert frames[3]["grasp.objective.value"] == ['{"a": [1, 2]}']
    assert frames[4]["grasp.waiting_time"] == ["3000"]
    assert frames[5]["grasp.session_id"] == []
    assert all(f["_ws.expert.message"] == [] for f in frames), frames


def test_mangled_floods_never_break_the_dissector(tmp_path: Path) -> None:
    """Truncations and bit flips of a real flood: each one either decodes in the library and
    then in the dissector alike, or is shown as malformed; tshark never fails (no Lua error)."""
    good = grasp.proxy_flood(lambda n: b"\x12\x34\x56\x78", IPv6Address("fe80::1"), 8443,
                             locators=[IPv6Address("fe80::1"), IPv6Address("fd00::1")]).encode()
    rng = random.Random(8990)
    corpus = [good[:n] for n in range(1, len(good))]
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        corpus.append(bytes(data))
    frames = tshark(write_pcap(tmp_path, corpus), GRASP_FIELDS)
    assert len(frames) == len(corpus)
    malformed = 0
    for frame, data in zip(frames, corpus, strict=True):
        try:
            flood = grasp.Flood.decode(data)
        except Exception:
            flood = None
        expert = frame["_ws.expert.message"]
        if expert and expert[0].startswith("Malformed GRASP message"):
            malformed += 1
            assert flood is None, data.hex()  # the library would have taken it
        elif flood is not None:
            assert_grasp_frame(frame, flood)
    # all truncations are malformed
    assert malformed >= len(good) - 1
