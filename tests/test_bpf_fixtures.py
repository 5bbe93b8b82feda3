"""Packet fixtures for every BPF program, run through BPF_PROG_TEST_RUN (habit 9).

Each record is Katran's: a description, the input frame (built with scapy), the expected
verdict, the expected output frame (None: unchanged, byte for byte) and the counter it must
move: exactly one action, plus the drop reason for a drop. A failing record prints both frames
decoded by scapy. Encapsulations are also checked field by field (outer version, payload
length, next header, hop limit, addresses; inner packet unchanged).

The programs run in a namespace of their own (created and removed here) because the XDP
encapsulation asks the FIB for MAC addresses and the per-link configuration is keyed by real
ifindexes; nothing is attached anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    PadN,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from joinproxyd.kernel import KernelError
from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import JP_ENCAP_SLOTS, Action, IpipJoin, Program
from joinproxyd.model import DropReason

pytestmark = pytest.mark.netns

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4

PLEDGE_MAC, JOIN_MAC, REG_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:01:00"
PLEDGE, REG_LL = "fe80::1:1", "fe80::1234"
OUTER0, OUTER1 = "fd4a:5044::1:1", "fd4a:5044::2:1"
REGISTRAR, REGISTRAR_UNRESOLVED = "fd4a:5044::100", "fd4a:5044::200"
BACKBONE_MTU, JOIN1_MTU = 1500, 1280
COARSE_TICKS = 0.05  # seconds: a few ticks of bpf_ktime_get_coarse_ns() at any HZ
CLONE_NEWNET = 0x40000000


# ------------------------------------------------------------------------ namespace -------
def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run this thread in namespace `name` for a while (test runs look ifindexes up there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        yield
    finally:
        libc.setns(saved, CLONE_NEWNET)
        os.close(saved)
        os.close(target)


@dataclass
class Lab:
    ns: str
    ifindex: dict[str, int]
    mac: dict[str, str]


@pytest.fixture(scope="module")
def lab(as_root: None) -> Iterator[Lab]:
    """join0/pl0 and join1/pl1 (join links, join1 with a small MTU), bb0/rg0 (backbone with
    the two per-link addresses and a permanent neighbour entry for the registrar)."""
    ns = f"jpbf{secrets.token_hex(4)}"
    sh("ip", "netns", "add", ns)
    try:
        def ip(*args: str) -> str:
            return sh("ip", "-n", ns, *args)

        for key in ("all.accept_dad", "default.accept_dad"):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}=0")
        for a, b in (("join0", "pl0"), ("join1", "pl1"), ("bb0", "rg0")):
            ip("link", "add", a, "type", "veth", "peer", "name", b)
        ip("link", "set", "join1", "mtu", str(JOIN1_MTU))
        for dev in ("lo", "join0", "pl0", "join1", "pl1", "bb0", "rg0"):
            ip("link", "set", dev, "up")
        for addr in ("fd4a:5044::1/64", f"{OUTER0}/64", f"{OUTER1}/64"):
            ip("addr", "add", addr, "dev", "bb0", "nodad")
        ip("-6", "neigh", "add", REGISTRAR, "lladdr", REG_MAC, "dev", "bb0", "nud", "permanent")
        # bpf_fib_lookup answers only for a device that forwards
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1")
        links = {}
        for link in json.loads(ip("-j", "link", "show")):
            links[link["ifname"]] = (link["ifindex"], link.get("address", ""))
        yield Lab(ns, {k: v[0] for k, v in links.items()}, {k: v[1] for k, v in links.items()})
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def default_ipip(lab: Lab) -> dict[int, IpipJoin]:
    bb = lab.ifindex["bb0"]
    return {
        lab.ifindex["join0"]: IpipJoin(registrar_ll=REG_LL, outer_src=OUTER0, registrar=REGISTRAR,
                                       backbone_ifindex=bb, ports=(443, 5684), proto=41),
        lab.ifindex["join1"]: IpipJoin(registrar_ll=REG_LL, outer_src=OUTER1, registrar=REGISTRAR,
                                       backbone_ifindex=bb, ports=(443, 5684), proto=98),
    }


@pytest.fixture(scope="module")
def module_dp(lab: Lab) -> Iterator[BpfDatapath]:
    dp = BpfDatapath.open(pin_dir=None, objects=("ipip", "guard", "bare"), netns=lab.ns)
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def dp(module_dp: BpfDatapath, lab: Lab) -> BpfDatapath:
    """The module's data plane with the default IPIP configuration (tests may change it)."""
    module_dp.set_ipip(default_ipip(lab))
    module_dp.set_ipip_xdp(False)
    return module_dp


# ------------------------------------------------------------------------ packets ---------
def join_frame(l3: object) -> bytes:
    return bytes(Ether(src=PLEDGE_MAC, dst=JOIN_MAC) / l3)


def to_registrar(payload: object | None = None, dport: int = 5684, dst: str = REG_LL) -> object:
    l4 = payload if payload is not None else UDP(sport=40001, dport=dport) / Raw(b"voucher")
    return IPv6(src=PLEDGE, dst=dst) / l4


def sized_to_registrar(l3_len: int) -> object:
    """A UDP datagram to the registrar whose IPv6 packet is l3_len bytes long."""
    return to_registrar(UDP(sport=40001, dport=5684) / Raw(b"d" * (l3_len - 48)))


def set_plen(frame: bytes, plen: int, offset: int = 14) -> bytes:
    return frame[:offset + 4] + plen.to_bytes(2, "big") + frame[offset + 6:]


def encapsulated(frame: bytes, outer_src: str, proto: int, eth: bytes | None = None) -> bytes:
    inner = frame[14:]
    outer = IPv6(src=outer_src, dst=REGISTRAR, nh=proto, hlim=64, tc=0, fl=0, plen=len(inner))
    return (eth if eth is not None else frame[:14]) + bytes(outer) + inner


def from_registrar(inner: object, dst: str = OUTER0, src: str = REGISTRAR, nh: int = 41,
                   ext: object | None = None) -> bytes:
    outer = IPv6(src=src, dst=dst, nh=60 if ext is not None else nh, hlim=64)
    body = (ext / Raw(bytes(inner))) if ext is not None else Raw(bytes(inner))
    return bytes(Ether(src=REG_MAC, dst="02:00:00:00:0b:01") / outer / body)


def reply(payload: bytes = b"voucher-response") -> object:
    return IPv6(src=REG_LL, dst=PLEDGE, hlim=64) / UDP(sport=5684, dport=40001) / Raw(payload)


def decode(data: bytes) -> str:
    try:
        text = Ether(data).show(dump=True)
    except Exception as exc:  # scapy may choke on a deliberately broken frame
        text = f"(scapy could not decode: {exc})"
    return f"{text}\nhex: {data.hex()}"


# ------------------------------------------------------------------------ runner ----------
@dataclass(frozen=True)
class Case:
    description: str
    packet: bytes
    verdict: int
    expected: bytes | None  # None: must come out unchanged
    action: Action
    reason: DropReason | None = None
    iface: str = "join0"


def run_case(dp: BpfDatapath, lab: Lab, program: Program, case: Case) -> bytes:
    counters, drops = dp.counters(), dp.drops()
    with in_netns(lab.ns):
        verdict, out = dp.test_run(program, case.packet, ifindex=lab.ifindex[case.iface])
    want = case.packet if case.expected is None else case.expected
    if verdict != case.verdict or out != want:
        pytest.fail(f"{program}: {case.description}: verdict {verdict}, want {case.verdict}\n"
                    f"--- input ---\n{decode(case.packet)}\n--- expected ---\n{decode(want)}\n"
                    f"--- got ---\n{decode(out)}", pytrace=False)
    moved = {k: v - counters[k] for k, v in dp.counters().items() if v != counters[k]}
    assert moved == {(program.value, case.action.value): 1}, case.description
    dropped = {k: v - drops[k] for k, v in dp.drops().items() if v != drops[k]}
    want_drops = {(program.value, case.reason.value): 1} if case.reason else {}
    assert dropped == want_drops, case.description
    return out


def assert_encapsulation(out: bytes, frame: bytes, outer_src: str, proto: int) -> None:
    """The outer header field by field, then the inner packet byte for byte."""
    outer = out[14:54]
    assert outer[0] >> 4 == 6, "outer version"
    assert int.from_bytes(outer[0:4], "big") & 0x0FFFFFFF == 0, "traffic class and flow label"
    assert int.from_bytes(outer[4:6], "big") == len(frame) - 14, "outer payload length"
    assert outer[6] == proto, "outer next header"
    assert outer[7] == 64, "outer hop limit"
    assert outer[8:24] == ipaddress.IPv6Address(outer_src).packed, "outer source"
    assert outer[24:40] == ipaddress.IPv6Address(REGISTRAR).packed, "outer destination"
    assert out[54:] == frame[14:], "inner packet unchanged"


Builder = Callable[[Lab], Case]


# ------------------------------------------------------------------ jp_tc_join --------------
def _ok(description: str, l3: object, iface: str = "join0") -> Builder:
    return lambda lab: Case(description, join_frame(l3), TC_ACT_OK, None, Action.PASS,
                            iface=iface)


def _drop(description: str, frame: bytes, reason: DropReason, program_kind: str = "tc",
          iface: str = "join0") -> Builder:
    verdict = TC_ACT_SHOT if program_kind == "tc" else XDP_DROP
    return lambda lab: Case(description, frame, verdict, None, Action.DROP, reason, iface)


_UDP = join_frame(to_registrar())
_TCP = join_frame(to_registrar(TCP(sport=40002, dport=443, flags="S", seq=1)))
_FITS = join_frame(sized_to_registrar(BACKBONE_MTU - 40))
_TOO_BIG = join_frame(sized_to_registrar(BACKBONE_MTU - 39))

def packet_too_big(frame: bytes, mtu: int) -> bytes:
    """What jp_tc_join sends back for a frame too big for the backbone: from the registrar's
    link-local address to the pledge, out of the link it came in on, 1,280 bytes of IPv6
    quoting the start of the packet (the checksum is scapy's)."""
    return bytes(Ether(src=JOIN_MAC, dst=PLEDGE_MAC) /
                 IPv6(src=REG_LL, dst=PLEDGE, hlim=64) /
                 ICMPv6PacketTooBig(mtu=mtu) / Raw(frame[14:14 + 1232]))


def _too_big(frame: bytes, mtu: int = BACKBONE_MTU - 40) -> Builder:
    return lambda lab: Case("too big", frame, TC_ACT_REDIRECT, packet_too_big(frame, mtu),
                            Action.TOO_BIG, DropReason.OVERSIZED)


def backbone_eth(lab: Lab, dst: str = REG_MAC) -> bytes:
    """The Ethernet header of an encapsulated packet: the FIB's next hop, from bb0."""
    return bytes(Ether(dst=dst, src=lab.mac["bb0"], type=0x86DD))


def _tc_encap(frame: bytes, outer_src: str = OUTER0, proto: int = 41,
              iface: str = "join0") -> Builder:
    return lambda lab: Case("tc encap", frame, TC_ACT_REDIRECT,
                            encapsulated(frame, outer_src, proto, backbone_eth(lab)),
                            Action.ENCAP, iface=iface)


TC_JOIN: dict[str, Builder] = {
    "udp to the registrar is encapsulated (41)": _tc_encap(_UDP),
    "tcp syn to the registrar is encapsulated": _tc_encap(_TCP),
    "join1: protocol 98 from its own backbone address": _tc_encap(_UDP, OUTER1, 98, "join1"),
    "largest packet that fits the backbone MTU": _tc_encap(_FITS),
    "one byte over the backbone MTU: packet too big back to the pledge": _too_big(_TOO_BIG),
    "another destination passes": _ok("other dst", to_registrar(dst="fe80::1")),
    "another port passes": _ok("other port", to_registrar(dport=53)),
    "icmpv6 echo to the registrar passes": _ok(
        "echo", IPv6(src=PLEDGE, dst=REG_LL) / ICMPv6EchoRequest()),
    "neighbour solicitation for the registrar passes": _ok(
        "ns", IPv6(src=PLEDGE, dst="ff02::1:ff00:1234", hlim=255) / ICMPv6ND_NS(tgt=REG_LL)),
    "ipv4 to the join port passes": _ok(
        "ipv4", IP(src="192.0.2.1", dst="192.0.2.2") / UDP(dport=5684)),
    "arp passes": _ok("arp", ARP(psrc="192.0.2.1", pdst="192.0.2.2")),
    "vlan-tagged frame passes": lambda lab: Case(
        "vlan", bytes(Ether(src=PLEDGE_MAC, dst=JOIN_MAC) / Dot1Q(vlan=7) / to_registrar()),
        TC_ACT_OK, None, Action.PASS),
    "hop-by-hop header before udp passes": _ok(
        "hbh", IPv6(src=PLEDGE, dst=REG_LL) / IPv6ExtHdrHopByHop() / UDP(dport=5684)),
    "fragment header passes": _ok(
        "frag", IPv6(src=PLEDGE, dst=REG_LL) / IPv6ExtHdrFragment(m=1) / UDP(dport=5684)),
    "version 4 in an ipv6 frame passes": lambda lab: Case(
        "version", _UDP[:14] + bytes([0x40]) + _UDP[15:], TC_ACT_OK, None, Action.PASS),
    "a link without ipip configuration passes": _ok("no cfg", to_registrar(), iface="pl0"),
    "payload length longer than the frame is dropped": _drop(
        "plen long", set_plen(_UDP, len(_UDP) - 14 - 40 + 1), DropReason.MALFORMED),
    "payload length shorter than the frame is dropped": _drop(
        "plen short", set_plen(_UDP, len(_UDP) - 14 - 40 - 1), DropReason.MALFORMED),
    "jumbogram (payload length 0) is dropped": _drop(
        "jumbo", set_plen(_UDP, 0), DropReason.MALFORMED),
    "udp header cut short is dropped": _drop(
        "cut", join_frame(IPv6(src=PLEDGE, dst=REG_LL, nh=17, plen=2) / Raw(b"\x9c\x41")),
        DropReason.MALFORMED),
}


@pytest.mark.parametrize("name", list(TC_JOIN))
def test_tc_join(dp: BpfDatapath, lab: Lab, name: str) -> None:
    case = TC_JOIN[name](lab)
    out = run_case(dp, lab, Program.TC_JOIN, case)
    if case.action is Action.ENCAP:
        outer_src, proto = (OUTER1, 98) if case.iface == "join1" else (OUTER0, 41)
        assert_encapsulation(out, case.packet, outer_src, proto)


def test_tc_join_without_a_known_next_hop_leaves_it_to_redirect_neigh(dp: BpfDatapath,
                                                                      lab: Lab) -> None:
    """No neighbour entry for the registrar yet: the packet is encapsulated all the same and
    bpf_redirect_neigh routes it and resolves the MAC (the Ethernet header is the kernel's
    to write, so it comes out as it came in)."""
    joins = default_ipip(lab)
    joins[lab.ifindex["join0"]] = IpipJoin(
        registrar_ll=REG_LL, outer_src=OUTER0, registrar=REGISTRAR_UNRESOLVED,
        backbone_ifindex=lab.ifindex["bb0"], ports=(5684,))
    dp.set_ipip(joins)
    outer = IPv6(src=OUTER0, dst=REGISTRAR_UNRESOLVED, nh=41, hlim=64, plen=len(_UDP) - 14)
    run_case(dp, lab, Program.TC_JOIN,
             Case("redirect_neigh", _UDP, TC_ACT_REDIRECT, _UDP[:14] + bytes(outer) + _UDP[14:],
                  Action.ENCAP))


def test_tc_join_frames_shorter_than_ipv6_are_refused_by_the_kernel(dp: BpfDatapath,
                                                                    lab: Lab) -> None:
    """The kernel builds no skb for an IPv6 frame shorter than the IPv6 header in a test
    run (EINVAL); the program's own length check is exercised by the XDP fixtures."""
    for size in (15, 33, 53):
        with in_netns(lab.ns), pytest.raises(KernelError) as err:
            dp.test_run(Program.TC_JOIN, _UDP[:size], ifindex=lab.ifindex["join0"])
        assert err.value.errno == 22


def test_tc_join_config_change_takes_effect(dp: BpfDatapath, lab: Lab) -> None:
    joins = default_ipip(lab)
    j0 = lab.ifindex["join0"]
    joins[j0] = IpipJoin(registrar_ll=REG_LL, outer_src=OUTER0, registrar=REGISTRAR,
                         backbone_ifindex=lab.ifindex["bb0"], ports=(443,), proto=98)
    dp.set_ipip(joins)
    run_case(dp, lab, Program.TC_JOIN, Case("5684 no longer relayed", _UDP, TC_ACT_OK, None,
                                            Action.PASS))
    del joins[j0]
    dp.set_ipip(joins)
    run_case(dp, lab, Program.TC_JOIN, Case("join0 removed", _TCP, TC_ACT_OK, None, Action.PASS))


# -------------------------------------------------------------- jp_tc_backbone -----------
_REPLY = from_registrar(reply())
_REPLY_INNER = bytes(reply())
_TLV_LIMIT = IPv6ExtHdrDestOpt(nh=41, options=[HBHOptUnknown(otype=4, optdata=b"\x04"),
                                               PadN(optdata=b"\x00")])
_BIG_INNER = IPv6(src=REG_LL, dst=PLEDGE) / UDP(sport=5684, dport=40001) / Raw(b"b" * 1300)


def _decap(description: str, frame: bytes, inner: bytes, iface: str = "bb0") -> Builder:
    return lambda lab: Case(description, frame, TC_ACT_REDIRECT, frame[:14] + inner,
                            Action.DECAP, iface=iface)


def _bb_ok(description: str, frame: bytes) -> Builder:
    return lambda lab: Case(description, frame, TC_ACT_OK, None, Action.PASS, iface="bb0")


def _bb_drop(description: str, frame: bytes, reason: DropReason) -> Builder:
    return _drop(description, frame, reason, iface="bb0")


_INNER_V4 = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(dport=40001) / Raw(b"x" * 30))

TC_BACKBONE: dict[str, Builder] = {
    "reply from the registrar is decapsulated (41)": _decap("41", _REPLY, _REPLY_INNER),
    "protocol 98 is decapsulated too": _decap(
        "98", from_registrar(reply(), nh=98), _REPLY_INNER),
    "reply to join1's backbone address": _decap(
        "join1", from_registrar(reply(), dst=OUTER1), _REPLY_INNER),
    "tcp reply": _decap("tcp", from_registrar(
        IPv6(src=REG_LL, dst=PLEDGE) / TCP(sport=443, dport=40002, flags="SA")),
        bytes(IPv6(src=REG_LL, dst=PLEDGE) / TCP(sport=443, dport=40002, flags="SA"))),
    "icmpv6 error from the registrar": _decap("icmp", from_registrar(
        IPv6(src=REG_LL, dst=PLEDGE) / ICMPv6DestUnreach(code=4) / Raw(b"q" * 48)),
        bytes(IPv6(src=REG_LL, dst=PLEDGE) / ICMPv6DestUnreach(code=4) / Raw(b"q" * 48))),
    "tunnel encapsulation limit option (ip6tnl peer)": _decap(
        "encaplimit", from_registrar(reply(), ext=_TLV_LIMIT), _REPLY_INNER),
    "udp to the backbone address passes": _bb_ok(
        "not ipip", bytes(Ether() / IPv6(src=REGISTRAR, dst=OUTER0) / UDP(dport=5684))),
    "ipip to an address that is not a join link's passes": _bb_ok(
        "other dst", from_registrar(reply(), dst="fd4a:5044::1")),
    "icmpv6 echo to the backbone address passes": _bb_ok(
        "echo", bytes(Ether() / IPv6(src=REGISTRAR, dst=OUTER0) / ICMPv6EchoRequest())),
    "ipv4 passes": _bb_ok("ipv4", bytes(Ether() / IP(dst="192.0.2.2") / UDP(dport=5684))),
    "arp passes": _bb_ok("arp", bytes(Ether() / ARP())),
    "ipip from an unknown source is dropped": _bb_drop(
        "unknown", from_registrar(reply(), src="fd4a:5044::666"), DropReason.NO_REGISTRAR),
    "outer payload length lies": _bb_drop(
        "outer plen", set_plen(_REPLY, len(_REPLY) - 54 + 8), DropReason.MALFORMED),
    "inner packet cut short": _bb_drop(
        "inner cut", from_registrar(Raw(_REPLY_INNER[:20])), DropReason.MALFORMED),
    "inner packet is ipv4": _bb_drop(
        "inner v4", from_registrar(Raw(_INNER_V4)), DropReason.BAD_HEADER),
    "inner destination is not link-local": _bb_drop(
        "inner global", from_registrar(IPv6(src=REG_LL, dst="2001:db8::1") / UDP()),
        DropReason.BAD_HEADER),
    "inner length disagrees with the outer": _bb_drop(
        "inner plen", from_registrar(Raw(set_plen(_REPLY_INNER, 3, offset=0))),
        DropReason.BAD_HEADER),
    "inner packet too big for the join link": _bb_drop(
        "oversized", from_registrar(_BIG_INNER, dst=OUTER1), DropReason.OVERSIZED),
}


@pytest.mark.parametrize("name", list(TC_BACKBONE))
def test_tc_backbone(dp: BpfDatapath, lab: Lab, name: str) -> None:
    run_case(dp, lab, Program.TC_BACKBONE, TC_BACKBONE[name](lab))


def test_round_trip_restores_the_pledge_packet(dp: BpfDatapath, lab: Lab) -> None:
    """What the join side sends, the backbone side gives back unchanged once the registrar
    turns the outer header around (as its raw socket does)."""
    with in_netns(lab.ns):
        verdict, out = dp.test_run(Program.TC_JOIN, _UDP, ifindex=lab.ifindex["join0"])
        assert verdict == TC_ACT_REDIRECT
        turned = out[:14] + bytes(IPv6(src=REGISTRAR, dst=OUTER0, nh=41, hlim=64,
                                       plen=len(out) - 54)) + out[54:]
        verdict, back = dp.test_run(Program.TC_BACKBONE, turned, ifindex=lab.ifindex["bb0"])
    assert verdict == TC_ACT_REDIRECT
    # from the IPv6 header on: the MACs are the next hops' (bpf_redirect_neigh writes the
    # pledge's when the decapsulated packet leaves on the join link)
    assert back[14:] == _UDP[14:], \
        f"--- sent ---\n{decode(_UDP)}\n--- got back ---\n{decode(back)}"


# ----------------------------------------------------------------- jp_xdp_join ------------
def _xdp_ok(description: str, frame: bytes, iface: str = "join0") -> Builder:
    return lambda lab: Case(description, frame, XDP_PASS, None, Action.PASS, iface=iface)


def _xdp_encap(frame: bytes) -> Builder:
    return lambda lab: Case("xdp encap", frame, XDP_REDIRECT,
                            encapsulated(frame, OUTER0, 41, backbone_eth(lab)), Action.ENCAP)


XDP_JOIN: dict[str, Builder] = {
    "udp to the registrar: MACs from the FIB, outer header": _xdp_encap(_UDP),
    "tcp to the registrar": _xdp_encap(_TCP),
    "largest packet that fits the route MTU": _xdp_encap(_FITS),
    "one byte over the route MTU is left to tc (which answers it)": lambda lab: Case(
        "too big", _TOO_BIG, XDP_PASS, None, Action.FALLBACK),
    "another destination passes": _xdp_ok("other dst", join_frame(to_registrar(dst="fe80::1"))),
    "icmpv6 to the registrar passes": _xdp_ok(
        "echo", join_frame(IPv6(src=PLEDGE, dst=REG_LL) / ICMPv6EchoRequest())),
    "ipv4 passes": _xdp_ok("ipv4", join_frame(IP() / UDP(dport=5684))),
    "arp passes": _xdp_ok("arp", join_frame(ARP())),
    "a bare ethernet header passes": _xdp_ok("eth only", _UDP[:14]),
    "ipv6 header cut short passes": _xdp_ok("short ipv6", _UDP[:14 + 20]),
    "version 4 in an ipv6 frame passes": _xdp_ok("version", _UDP[:14] + b"\x40" + _UDP[15:]),
    "a link without ipip configuration passes": _xdp_ok("no cfg", _UDP, iface="pl0"),
    "payload length lies: dropped": _drop(
        "plen", set_plen(_UDP, 200), DropReason.MALFORMED, "xdp"),
    "udp header cut short: dropped": _drop(
        "cut", join_frame(IPv6(src=PLEDGE, dst=REG_LL, nh=17, plen=2) / Raw(b"\x9c\x41")),
        DropReason.MALFORMED, "xdp"),
}


@pytest.mark.parametrize("name", list(XDP_JOIN))
def test_xdp_join(dp: BpfDatapath, lab: Lab, name: str) -> None:
    case = XDP_JOIN[name](lab)
    out = run_case(dp, lab, Program.XDP_JOIN, case)
    if case.action is Action.ENCAP:
        assert_encapsulation(out, case.packet, OUTER0, 41)


def test_xdp_join_leaves_unresolved_next_hops_to_tc(dp: BpfDatapath, lab: Lab) -> None:
    joins = default_ipip(lab)
    joins[lab.ifindex["join0"]] = IpipJoin(
        registrar_ll=REG_LL, outer_src=OUTER0, registrar=REGISTRAR_UNRESOLVED,
        backbone_ifindex=lab.ifindex["bb0"], ports=(5684,))
    dp.set_ipip(joins)
    run_case(dp, lab, Program.XDP_JOIN,
             Case("no neighbour entry", _UDP, XDP_PASS, None, Action.FALLBACK))


def test_xdp_join_next_hop_cache_follows_config_and_neighbours(dp: BpfDatapath,
                                                               lab: Lab) -> None:
    """Both join programs use the FIB's answer cached per CPU: a new configuration is used
    at once (its generation changes), a neighbour's new MAC within the cache lifetime."""
    encap = _xdp_encap(_UDP)(lab)
    run_case(dp, lab, Program.XDP_JOIN, encap)
    joins = default_ipip(lab)
    joins[lab.ifindex["join0"]] = IpipJoin(
        registrar_ll=REG_LL, outer_src=OUTER0, registrar=REGISTRAR_UNRESOLVED,
        backbone_ifindex=lab.ifindex["bb0"], ports=(5684,))
    dp.set_ipip(joins)
    run_case(dp, lab, Program.XDP_JOIN,
             Case("new registrar, no neighbour", _UDP, XDP_PASS, None, Action.FALLBACK))
    dp.set_ipip(default_ipip(lab))
    run_case(dp, lab, Program.XDP_JOIN, encap)

    new_mac = "02:00:00:00:01:99"
    sh("ip", "-n", lab.ns, "-6", "neigh", "replace", REGISTRAR, "lladdr", new_mac, "dev", "bb0",
       "nud", "permanent")
    try:
        time.sleep(0.1 + COARSE_TICKS)
        eth = backbone_eth(lab, new_mac)
        run_case(dp, lab, Program.XDP_JOIN,
                 Case("new MAC", _UDP, XDP_REDIRECT, encapsulated(_UDP, OUTER0, 41, eth),
                      Action.ENCAP))
        run_case(dp, lab, Program.TC_JOIN,
                 Case("new MAC (tc)", _UDP, TC_ACT_REDIRECT,
                      encapsulated(_UDP, OUTER0, 41, eth), Action.ENCAP))
    finally:
        sh("ip", "-n", lab.ns, "-6", "neigh", "replace", REGISTRAR, "lladdr", REG_MAC, "dev",
           "bb0", "nud", "permanent")


def test_join_links_sharing_a_cache_slot_each_keep_their_own_header(dp: BpfDatapath,
                                                                    lab: Lab) -> None:
    """jp_encap_cache is indexed by ifindex modulo its size: two links 256 apart share a
    slot on each CPU and evict each other, and every packet must still get its own link's
    outer source and protocol (only the speed may suffer)."""
    first, second = 300, 300 + JP_ENCAP_SLOTS
    outer = {first: ("fd4a:5044::3:1", 41), second: ("fd4a:5044::4:1", 98)}
    for index in (first, second):
        sh("ip", "-n", lab.ns, "link", "add", f"jc{index}", "index", str(index), "type",
           "veth", "peer", "name", f"jc{index}p")
    try:
        joins = default_ipip(lab)
        for index, (src, proto) in outer.items():
            joins[index] = IpipJoin(registrar_ll=REG_LL, outer_src=src, registrar=REGISTRAR,
                                    backbone_ifindex=lab.ifindex["bb0"], ports=(5684,),
                                    proto=proto)
        dp.set_ipip(joins)
        eth = backbone_eth(lab)
        for index in (first, second, first, second, first):
            src, proto = outer[index]
            for program, verdict in ((Program.XDP_JOIN, XDP_REDIRECT),
                                     (Program.TC_JOIN, TC_ACT_REDIRECT)):
                with in_netns(lab.ns):
                    got, out = dp.test_run(program, _UDP, ifindex=index)
                assert (got, out) == (verdict, encapsulated(_UDP, src, proto, eth)), \
                    f"{program} on ifindex {index}:\n{decode(out)}"
    finally:
        for index in (first, second):
            subprocess.run(["ip", "-n", lab.ns, "link", "del", f"jc{index}"], check=False,
                           capture_output=True)


# ------------------------------------------------------------------------ jp_guard --------
@pytest.fixture
def fresh_dp(lab: Lab) -> Iterator[BpfDatapath]:
    """A data plane of its own: empty buckets, zero counters."""
    dp = BpfDatapath.open(pin_dir=None, objects=("ipip", "guard"), netns=lab.ns)
    try:
        yield dp
    finally:
        dp.close()


def guard(dp: BpfDatapath, lab: Lab, frame: bytes, iface: str = "join0") -> int:
    with in_netns(lab.ns):
        verdict, out = dp.test_run(Program.GUARD, frame, ifindex=lab.ifindex[iface])
    if verdict != XDP_DROP and out != frame:
        pytest.fail(f"the guard changed a frame\n--- in ---\n{decode(frame)}\n"
                    f"--- out ---\n{decode(out)}", pytrace=False)
    return verdict


def guard_counts(dp: BpfDatapath) -> dict[str, int]:
    counts = {a: n for (p, a), n in dp.counters().items() if p == Program.GUARD and n}
    counts.update({f"drop:{r}": n for (p, r), n in dp.drops().items()
                   if p == Program.GUARD and n})
    return counts


def udp_from(src: str, dport: int = 5684) -> bytes:
    if ":" in src:
        return join_frame(IPv6(src=src, dst="fe80::1") / UDP(sport=1234, dport=dport))
    return join_frame(IP(src=src, dst="192.0.2.254") / UDP(sport=1234, dport=dport))


def test_guard_burst_then_drop(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=3, ports=[443, 5684])
    verdicts = [guard(fresh_dp, lab, udp_from(PLEDGE)) for _ in range(5)]
    assert verdicts == [XDP_PASS] * 3 + [XDP_DROP] * 2
    assert guard_counts(fresh_dp) == {"allow": 3, "drop": 2, "drop:rate-limit": 2}
    tokens, _, drops = fresh_dp.guard_bucket(PLEDGE, lab.ifindex["join0"]) or (None, 0, 0)
    assert tokens is not None and tokens < 1
    assert drops == 2, "drops are also counted per source"


def test_guard_buckets_per_source_and_per_interface(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=2, ports=[5684])
    for _ in range(2):
        assert guard(fresh_dp, lab, udp_from(PLEDGE)) == XDP_PASS
    assert guard(fresh_dp, lab, udp_from(PLEDGE)) == XDP_DROP
    assert guard(fresh_dp, lab, udp_from("fe80::1:2")) == XDP_PASS, "another source"
    assert guard(fresh_dp, lab, udp_from(PLEDGE), iface="join1") == XDP_PASS, "another link"
    assert guard(fresh_dp, lab, udp_from(PLEDGE)) == XDP_DROP, "the first bucket is still empty"


def test_guard_counts_ipv4_tcp_and_extension_headers(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=1, ports=[443])
    tcp4 = join_frame(IP(src="192.0.2.7", dst="192.0.2.254") / TCP(dport=443, flags="S"))
    assert [guard(fresh_dp, lab, tcp4) for _ in range(2)] == [XDP_PASS, XDP_DROP]
    assert fresh_dp.guard_bucket("192.0.2.7", lab.ifindex["join0"], proto=6) is not None, \
        "v4-mapped key, the SYN bucket"
    hidden = join_frame(IPv6(src="fe80::1:9", dst="fe80::1") / IPv6ExtHdrDestOpt() /
                        IPv6ExtHdrHopByHop() / TCP(dport=443, flags="S"))
    assert [guard(fresh_dp, lab, hidden) for _ in range(2)] == [XDP_PASS, XDP_DROP]
    first_fragment = join_frame(IPv6(src="fe80::1:a", dst="fe80::1") /
                                IPv6ExtHdrFragment(m=1, offset=0) / UDP(dport=443) / Raw(b"f"))
    assert [guard(fresh_dp, lab, first_fragment) for _ in range(2)] == [XDP_PASS, XDP_DROP]


def tcp_from(src: str, flags: str, dport: int = 443, payload: bytes = b"") -> bytes:
    return join_frame(IPv6(src=src, dst="fe80::1") / TCP(sport=40000, dport=dport, flags=flags)
                      / Raw(payload))


def test_guard_never_limits_segments_of_a_connection(fresh_dp: BpfDatapath, lab: Lab) -> None:
    """Only SYNs open connections; every other segment belongs to one (or to none, and the
    stack resets it): a well-behaved pledge must never lose one to the guard."""
    fresh_dp.set_guard(rate_pps=1, burst=1, ports=[443], syn_rate_pps=1, syn_burst=1)
    assert guard(fresh_dp, lab, tcp_from(PLEDGE, "S")) == XDP_PASS
    assert guard(fresh_dp, lab, tcp_from(PLEDGE, "S")) == XDP_DROP, "the SYN bucket is empty"
    segments = [tcp_from(PLEDGE, "A"), tcp_from(PLEDGE, "PA", payload=b"\x16\x03\x01" * 300),
                tcp_from(PLEDGE, "FA"), tcp_from(PLEDGE, "R"), tcp_from(PLEDGE, "RA"),
                tcp_from(PLEDGE, "SA")]  # a SYN-ACK opens nothing here
    for _ in range(20):  # far beyond rate and burst
        for frame in segments:
            assert guard(fresh_dp, lab, frame) == XDP_PASS, decode(frame)
    # A TCP header cut short before its flags: not the guard's to judge, the stack drops it.
    assert guard(fresh_dp, lab, tcp_from(PLEDGE, "S")[:14 + 40 + 13]) == XDP_PASS
    # Segments to a join port count as allowed; the one cut short is not the guard's.
    assert guard_counts(fresh_dp) == {"allow": 1 + 20 * len(segments), "drop": 1,
                                      "drop:rate-limit": 1, "pass": 1}


def test_guard_holds_a_syn_flood_to_its_own_rate(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=2, ports=[443], syn_rate_pps=1, syn_burst=3)
    flood = [guard(fresh_dp, lab, tcp_from(PLEDGE, flags)) for flags in ["S"] * 8 + ["SE"] * 2]
    assert flood == [XDP_PASS] * 3 + [XDP_DROP] * 7  # SYN with ECE is still a new flow
    assert guard_counts(fresh_dp) == {"allow": 3, "drop": 7, "drop:rate-limit": 7}
    tokens, _, drops = fresh_dp.guard_bucket(PLEDGE, lab.ifindex["join0"], proto=6) \
        or (None, 0, 0)
    assert tokens is not None and tokens < 1 and drops == 7
    # UDP has a bucket of its own: the SYN flood did not empty it.
    assert [guard(fresh_dp, lab, udp_from(PLEDGE, dport=443)) for _ in range(3)] == \
        [XDP_PASS, XDP_PASS, XDP_DROP]
    assert (fresh_dp.guard_bucket(PLEDGE, lab.ifindex["join0"]) or ())[2:] == (1,)
    # syn_rate 0 leaves SYNs unlimited while UDP stays rationed.
    fresh_dp.set_guard(rate_pps=1, burst=2, ports=[443], syn_rate_pps=0)
    assert [guard(fresh_dp, lab, tcp_from(PLEDGE, "S")) for _ in range(5)] == [XDP_PASS] * 5
    assert guard(fresh_dp, lab, udp_from(PLEDGE, dport=443)) == XDP_DROP


def test_guard_passes_everything_else_untouched(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=1, ports=[5684])
    assert guard(fresh_dp, lab, udp_from(PLEDGE)) == XDP_PASS
    others = [
        udp_from(PLEDGE, dport=53),
        join_frame(IPv6(src=PLEDGE, dst="fe80::1") / ICMPv6EchoRequest()),
        join_frame(IPv6(src=PLEDGE, dst="fe80::1") / IPv6ExtHdrFragment(offset=8) / Raw(b"x" * 8)),
        join_frame(IP(src="192.0.2.7", frag=4) / Raw(b"x" * 8)),
        join_frame(ARP()),
        udp_from(PLEDGE)[:14 + 30],  # IPv6 header cut short
        udp_from(PLEDGE)[:14 + 40 + 2],  # ports cut short
        udp_from(PLEDGE)[:14],
    ]
    for frame in others:
        assert guard(fresh_dp, lab, frame) == XDP_PASS, decode(frame)
    assert guard_counts(fresh_dp) == {"allow": 1, "pass": len(others)}


def test_guard_rate_and_burst_changes_take_effect(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=2, ports=[5684])
    assert [guard(fresh_dp, lab, udp_from(PLEDGE)) for _ in range(3)] == \
        [XDP_PASS, XDP_PASS, XDP_DROP]
    # a fast rate refills the bucket as soon as the guard's coarse clock ticks (1-10 ms)
    fresh_dp.set_guard(rate_pps=10_000_000, burst=2, ports=[5684])
    time.sleep(COARSE_TICKS)
    assert guard(fresh_dp, lab, udp_from(PLEDGE)) == XDP_PASS
    # a smaller burst caps what was saved
    fresh_dp.set_guard(rate_pps=1, burst=1, ports=[5684])
    assert [guard(fresh_dp, lab, udp_from(PLEDGE)) for _ in range(2)] == [XDP_PASS, XDP_DROP]
    # another port list
    fresh_dp.set_guard(rate_pps=1, burst=1, ports=[443])
    assert guard(fresh_dp, lab, udp_from(PLEDGE)) == XDP_PASS
    # rate 0 turns the guard off
    fresh_dp.set_guard(rate_pps=0, burst=1, ports=[5684])
    assert [guard(fresh_dp, lab, udp_from(PLEDGE)) for _ in range(3)] == [XDP_PASS] * 3


def test_guard_hands_over_to_the_xdp_encapsulation(fresh_dp: BpfDatapath, lab: Lab) -> None:
    fresh_dp.set_guard(rate_pps=1, burst=2, ports=[5684])
    fresh_dp.set_ipip(default_ipip(lab))
    fresh_dp.set_ipip_xdp(True)
    with in_netns(lab.ns):
        verdict, out = fresh_dp.test_run(Program.GUARD, _UDP, ifindex=lab.ifindex["join0"])
    assert verdict == XDP_REDIRECT, decode(out)
    assert_encapsulation(out, _UDP, OUTER0, 41)
    fresh_dp.set_ipip_xdp(False)
    assert guard(fresh_dp, lab, _UDP) == XDP_PASS
    assert guard(fresh_dp, lab, _UDP) == XDP_DROP, "the guard still rations the encapsulation"
    counts = {k: v for k, v in fresh_dp.counters().items() if v}
    assert counts[(Program.GUARD.value, "allow")] == 2
    assert counts[(Program.XDP_JOIN.value, "encap")] == 1


def test_guard_refuses_bad_settings(fresh_dp: BpfDatapath) -> None:
    for kwargs in ({"rate_pps": -1, "burst": 1, "ports": [1]},
                   {"rate_pps": 1, "burst": 0, "ports": [1]},
                   {"rate_pps": 1, "burst": 1, "ports": [0]},
                   {"rate_pps": 1, "burst": 1, "ports": list(range(1, 10))}):
        with pytest.raises(ValueError):
            fresh_dp.set_guard(**kwargs)


# ------------------------------------------------------------------ jp_bare_redir ---------
@pytest.mark.parametrize("program", [Program.BARE_REDIRECT, Program.BARE_PUSH])
def test_bare_baselines_redirect_or_sink(lab: Lab, program: Program) -> None:
    """jp_bare_redir sends the frame on as it is; jp_bare_push 40 bytes longer, its Ethernet
    header copied in front and the frame kept after it. Without a target both are sinks."""
    with BpfDatapath.open(pin_dir=None, objects=("bare",), netns=lab.ns) as dp:
        with in_netns(lab.ns):
            assert dp.test_run(program, _UDP)[0] == XDP_DROP, "no target: sink"
            dp.set_bare_target(lab.ifindex["bb0"])
            verdict, out = dp.test_run(program, _UDP)
        assert verdict == XDP_REDIRECT
        if program is Program.BARE_PUSH:
            assert (out[:14], out[40:]) == (_UDP[:14], _UDP), "pushed 40 bytes, frame kept"
        else:
            assert out == _UDP
        counts = {k: v for k, v in dp.counters().items() if v}
        assert counts == {(program.value, "drop"): 1, (program.value, "redirect"): 1}
