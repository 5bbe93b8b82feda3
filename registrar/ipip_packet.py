"""Which IPIP join-proxy packets the registrar accepts, and why it drops the others (sans-IO).

Inbound, a proxy's encapsulated packet as the raw socket delivers it (the payload after the
outer IPv6 header and its extension headers, i.e. the pledge's own packet). It passes only if
it is a whole IPv6 packet from a pledge's link-local address to the registrar's announced
link-local address, and is not itself an encapsulation: such a packet, written into a TUN
device, would be delivered to our own raw socket again as if a proxy had sent it.

Outbound, what the kernel routes into a proxy's TUN device: only unicast replies from the
announced link-local address to a link-local address are tunnelled. Anything else the kernel
emits there (MLD reports, router solicitations) concerns no pledge and is dropped, counted.
"""

from __future__ import annotations

import struct
from enum import StrEnum
from ipaddress import IPv6Address

IPV6_HEADER = 40
# Next headers that would make the inner packet an encapsulation again: IPv4-in-IP (4),
# IPv6-in-IP (41), ENCAP (98).
ENCAPSULATIONS = frozenset({4, 41, 98})


class Drop(StrEnum):
    """Why a packet was not relayed (the counter names in the registrar's ``ipip`` stats)."""

    # inbound, about the proxy
    NOT_ALLOWED = "not-allowed"  # outer source not in [ipip] proxies
    TOO_MANY_PROXIES = "too-many-proxies"  # max_proxies TUN devices exist already
    BAD_OUTER_SOURCE = "bad-outer-source"  # link-local, multicast..., or from our own TUN
    # inbound, about the pledge's packet
    TRUNCATED = "truncated"  # shorter than its IPv6 header or than its payload length says
    BAD_LENGTH = "bad-length"  # longer than its payload length says (or a jumbogram)
    NOT_IPV6 = "not-ipv6"  # IP version is not 6
    BAD_INNER_SOURCE = "bad-inner-source"  # not a link-local unicast address
    BAD_INNER_DESTINATION = "bad-inner-destination"  # not the announced link-local address
    NESTED = "nested-encapsulation"  # the inner packet is IP-in-IP again
    TUN_ERROR = "tun-error"  # creating or writing the proxy's TUN device failed
    # outbound
    NOT_TUNNELLED = "not-tunnelled"  # kernel traffic on a TUN that is no reply to a pledge
    SEND_ERROR = "send-error"  # the encapsulated send failed (e.g. no route, buffer full)


def check_inbound(packet: bytes, link_local: IPv6Address) -> Drop | None:
    """None if ``packet`` may be written to the proxy's TUN device, else the reason."""
    if len(packet) < IPV6_HEADER:
        return Drop.TRUNCATED
    if packet[0] >> 4 != 6:
        return Drop.NOT_IPV6
    (payload_length,) = struct.unpack_from("!H", packet, 4)
    if IPV6_HEADER + payload_length > len(packet):
        return Drop.TRUNCATED
    if IPV6_HEADER + payload_length < len(packet):
        # Includes payload length 0 with data after the header: a jumbogram (RFC 2675) has
        # no business on a join link, and trailing bytes would be silently lost in the TUN.
        return Drop.BAD_LENGTH
    if not _link_local_unicast(packet[8:24]):
        return Drop.BAD_INNER_SOURCE
    if packet[24:40] != link_local.packed:
        return Drop.BAD_INNER_DESTINATION
    if packet[6] in ENCAPSULATIONS:
        return Drop.NESTED
    return None


def check_outbound(packet: bytes, link_local: IPv6Address) -> Drop | None:
    """None if a packet read from a proxy's TUN device is a reply to one of its pledges."""
    if len(packet) < IPV6_HEADER or packet[0] >> 4 != 6:
        return Drop.NOT_TUNNELLED
    if packet[8:24] != link_local.packed or not _link_local_unicast(packet[24:40]):
        return Drop.NOT_TUNNELLED
    return None


def outer_source_ok(address: IPv6Address) -> bool:
    """A proxy is addressed by a routable unicast address (its backbone/ACP address): a
    link-local one would be ambiguous between links, the others cannot be a proxy."""
    return not (address.is_link_local or address.is_multicast or address.is_loopback
                or address.is_unspecified or address.is_site_local
                or address.ipv4_mapped is not None)


def _link_local_unicast(raw: bytes) -> bool:
    # fe80::/10: first byte 0xfe, top two bits of the second 0b10.
    return raw[0] == 0xFE and raw[1] & 0xC0 == 0x80
