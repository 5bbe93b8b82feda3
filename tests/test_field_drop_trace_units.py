"""The drop tracer's pure parts: the header parser (any bytes, never an exception), the ring
buffer record, the event line, and the kernel's drop reason names read from its BTF."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joinproxyd.kernel.drop_trace import EVENT, HDR, decode_event, parse_packet
from joinproxyd.trace import canonical, render_event


def ip6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), nh, 64)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload)


def test_udp_in_ipv6() -> None:
    pkt = parse_packet(ip6("fe80::1:1", "fe80::1", 17, struct.pack("!HHHH", 5683, 8443, 8, 0)))
    assert pkt.describe() == {"src": "fe80::1:1", "dst": "fe80::1", "proto": "udp",
                              "sport": 5683, "dport": 8443}


def test_ipv6_in_ipv6_names_the_inner_pledge() -> None:
    inner = ip6("fe80::1:1", "fe80::2", 6, struct.pack("!HH", 40000, 443))
    pkt = parse_packet(ip6("fd4a:5044::1", "fd4a:5044::100", 41, inner))
    assert pkt.describe()["inner"] == {"src": "fe80::1:1", "dst": "fe80::2", "proto": "tcp",
                                       "sport": 40000, "dport": 443}
    assert "fe80::1:1" in pkt.addresses()


def test_extension_headers_and_icmpv6() -> None:
    hop_by_hop = bytes([58, 0]) + b"\0" * 6
    pkt = parse_packet(ip6("fe80::1", "ff02::1", 0, hop_by_hop + bytes([1, 4, 0, 0])))
    assert pkt.describe() == {"src": "fe80::1", "dst": "ff02::1", "proto": "icmpv6",
                              "type": 1, "code": 4}


@pytest.mark.parametrize("cut", [0, 1, 20, 39, 40, 41, 43])
def test_truncated_headers_say_what_they_can(cut: int) -> None:
    data = ip6("fe80::1:1", "fe80::1", 17, struct.pack("!HHHH", 1, 2, 8, 0))[:cut]
    pkt = parse_packet(data)
    assert (pkt.src is not None) == (cut >= 40)
    assert pkt.sport is None or cut >= 44


@settings(max_examples=300, derandomize=not os.environ.get("BRSKI_FUZZ_RANDOM"))
@given(st.binary(max_size=HDR + 16))
def test_any_bytes_parse_without_an_exception(data: bytes) -> None:
    parse_packet(data).describe()
    decode_event(data)


def test_a_ring_buffer_record() -> None:
    hdr = ip6("fe80::1:1", "fe80::1", 17, struct.pack("!HHHH", 1, 9999, 8, 0))
    raw = EVENT.pack(1, 0xFFFF0000, 3, 7, len(hdr), 0xDD86, HDR, hdr.ljust(HDR, b"\xee"))
    drop = decode_event(raw)
    assert drop is not None
    assert (drop.reason, drop.ifindex, drop.length, drop.protocol) == (3, 7, 48, 0x86DD)
    assert drop.packet.dport == 9999
    assert decode_event(raw[:-1]) is None  # short: not a record


def test_event_lines() -> None:
    assert render_event({"time": 0, "source": "kernel", "reason": "NO_SOCKET",
                         "where": "__udp6_lib_rcv", "interface": "join0",
                         "packet": {"src": "fe80::1:1", "dst": "fe80::1", "proto": "udp",
                                    "sport": 1, "dport": 9999}}).split(" ", 1)[1] == (
        "kernel: NO_SOCKET in __udp6_lib_rcv on join0 udp fe80::1:1 port 1 -> fe80::1 port "
        "9999")
    assert render_event({"time": 0, "source": "jp_guard", "reason": "rate-limit", "count": 45,
                         "interface": "join0", "packet": {"src": "fe80::1:1", "proto": "udp"}}
                        ).split(" ", 1)[1] == "jp_guard: rate-limit x45 on join0 udp fe80::1:1"


def test_pledge_spellings_compare_equal() -> None:
    assert canonical("[FE80::0:1:1%join0]:5683") == canonical("fe80::1:1") == "fe80::1:1"
    assert canonical("::ffff:192.0.2.1") == "192.0.2.1"


def test_reason_names_come_from_the_running_kernel(as_root: None) -> None:
    from joinproxyd.kernel.drop_trace import drop_reason_names

    names = drop_reason_names()
    assert names[2] == "NOT_SPECIFIED" and "NO_SOCKET" in names.values()
    assert "IP_INNOROUTES" in names.values()  # (6.1 and later)
