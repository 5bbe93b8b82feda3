"""ICMPv6 error messages a UDP join proxy sends to a pledge (RFC 4443), sans-IO.

A stateful (coaps) join proxy answers a refused flow with Destination Unreachable code 1
(administratively prohibited), and passes on an ICMPv6 error the registrar's side caused as
the same type and code, about the pledge's own datagram. The message body is the invoking
packet as the pledge sent it (IPv6 header, UDP header, payload), cut so the whole error fits
the IPv6 minimum MTU (RFC 4443 §2.4 (c)). The ICMPv6 checksum is left zero: a raw ICMPv6
socket has the kernel fill it in (RFC 3542 §3.1), which needs the source address it picks.
"""

from __future__ import annotations

import struct
from ipaddress import IPv6Address
from typing import Final

from .errors import UsageError

DESTINATION_UNREACHABLE: Final = 1
PACKET_TOO_BIG: Final = 2
TIME_EXCEEDED: Final = 3
PARAMETER_PROBLEM: Final = 4
ERROR_TYPES: Final = frozenset({DESTINATION_UNREACHABLE, PACKET_TOO_BIG, TIME_EXCEEDED,
                                PARAMETER_PROBLEM})

CODE_NO_ROUTE: Final = 0
CODE_ADMIN_PROHIBITED: Final = 1
CODE_ADDRESS_UNREACHABLE: Final = 3
CODE_PORT_UNREACHABLE: Final = 4

IPV6_MIN_MTU: Final = 1280
IPV6_HEADER: Final = 40
ICMPV6_HEADER: Final = 8  # type, code, checksum, and the 4-byte field (unused / MTU / pointer)
UDP_HEADER: Final = 8
NEXT_HEADER_UDP: Final = 17
# What of the invoking packet fits in the error: 1280 less the error's own headers.
MAX_INVOKING: Final = IPV6_MIN_MTU - IPV6_HEADER - ICMPV6_HEADER


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(source: IPv6Address, destination: IPv6Address, source_port: int,
               destination_port: int, payload: bytes, hop_limit: int = 64) -> bytes:
    """An IPv6 packet carrying one UDP datagram, checksums right (the invoking packet)."""
    for port in (source_port, destination_port):
        if not 0 <= port <= 0xFFFF:
            raise UsageError(f"UDP port {port} is not 0..65535")
    length = UDP_HEADER + len(payload)
    if length > 0xFFFF:
        raise UsageError("UDP datagram longer than 65535 bytes")
    header = struct.pack("!HHHH", source_port, destination_port, length, 0)
    pseudo = source.packed + destination.packed + struct.pack("!I3xB", length, NEXT_HEADER_UDP)
    checksum = _checksum(pseudo + header + payload) or 0xFFFF  # RFC 8200 §8.1: never 0
    udp = struct.pack("!HHHH", source_port, destination_port, length, checksum) + payload
    ip = struct.pack("!IHBB", 6 << 28, length, NEXT_HEADER_UDP, hop_limit)
    return ip + source.packed + destination.packed + udp


def error_message(icmp_type: int, code: int, invoking: bytes, parameter: int = 0) -> bytes:
    """An ICMPv6 error (checksum zero, for the kernel to fill) about ``invoking``, cut to
    fit the minimum MTU. ``parameter`` is the MTU (Packet Too Big) or pointer (Parameter
    Problem), else unused and zero."""
    if icmp_type not in ERROR_TYPES:
        raise UsageError(f"ICMPv6 type {icmp_type} is not an error message")
    if not 0 <= code <= 0xFF or not 0 <= parameter <= 0xFFFFFFFF:
        raise UsageError("ICMPv6 code or parameter out of range")
    return struct.pack("!BBHI", icmp_type, code, 0, parameter) + invoking[:MAX_INVOKING]


def admin_prohibited(invoking: bytes) -> bytes:
    """Destination Unreachable, administratively prohibited: the proxy refuses the flow."""
    return error_message(DESTINATION_UNREACHABLE, CODE_ADMIN_PROHIBITED, invoking)
