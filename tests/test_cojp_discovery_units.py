"""Unit tests for the cojp mode's JRC discovery parts: the CoAP ping codec (brski), the GRASP
"6TiSCH-JRC" locator, and the constrained table's handling of a JRC endpoint."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv6Address

import pytest

from brski import coap_datagram
from brski import grasp as wire
from brski.coap_datagram import CoapDatagram, MessageType
from brski.errors import UsageError
from daemon.joinproxyd.discovery.constrained import (
    ConstrainedRegistrars,
    UdpKind,
    UdpRegistrar,
    static_udp_registrars,
    udp_registrars_in_flood,
)
from daemon.joinproxyd.model import RegistrarEndpoint


def test_ping_is_an_empty_con_and_only_its_reset_answers_it() -> None:
    assert coap_datagram.ping(0x1234) == bytes([0x40, 0x00, 0x12, 0x34])  # RFC 7252 §4.3
    rst = CoapDatagram(MessageType.RST, 0, 0x1234).encode()
    assert coap_datagram.answers_ping(rst, 0x1234)
    assert coap_datagram.answers_ping(CoapDatagram(MessageType.ACK, 0, 0x1234).encode(), 0x1234)
    assert not coap_datagram.answers_ping(rst, 0x1235)  # another ping's
    assert not coap_datagram.answers_ping(CoapDatagram(MessageType.ACK, 0x44, 0x1234, b"t")
                                          .encode(), 0x1234)  # a response, not an empty one
    assert not coap_datagram.answers_ping(CoapDatagram(MessageType.CON, 0, 0x1234).encode(),
                                          0x1234)  # a ping back is no answer
    assert not coap_datagram.answers_ping(b"\x70\x00\x12", 0x1234)  # truncated
    assert not coap_datagram.answers_ping(b"\x30\x00\x12\x34", 0x1234)  # version 0


def test_flood_carries_the_jrc_under_its_own_value_and_the_proxy_reads_it() -> None:
    reg = IPv6Address("fd4a:5044::100")
    flood = wire.registrar_flood(
        lambda n: b"\0" * n, IPv6Address("fe80::2"),
        [wire.IPv6Locator(reg, wire.IPPROTO_TCP, 8443)],
        jpy_locators=[wire.IPv6Locator(reg, wire.IPPROTO_UDP, 5685)],
        cojp_locators=[wire.IPv6Locator(reg, wire.IPPROTO_UDP, 5683)])
    decoded = wire.Flood.decode(flood.encode())
    values = [v for v, _ in decoded.valued_locators_for(wire.AN_JOIN_REGISTRAR)]
    assert values == ["EST-TLS", "BRSKI_RJP", "6TiSCH-JRC"]
    found = udp_registrars_in_flood(decoded, 3)
    assert found == [UdpRegistrar.make(UdpKind.JPY, str(reg), 5685),
                     UdpRegistrar.make(UdpKind.COJP, str(reg), 5683)]
    with pytest.raises(UsageError):
        wire.registrar_flood(lambda n: b"\0" * n, IPv6Address("fe80::2"),
                             [wire.IPv6Locator(reg, wire.IPPROTO_TCP, 8443)],
                             cojp_locators=[wire.IPv6Locator(reg, wire.IPPROTO_TCP, 5683)])


def test_static_cojp_port_is_a_jrc_endpoint() -> None:
    endpoint = RegistrarEndpoint(10, "fd4a:5044::100", 8443, source="static", cojp_port=5683)
    assert static_udp_registrars([endpoint]) == [
        UdpRegistrar.make(UdpKind.COJP, "fd4a:5044::100", 5683)]


def test_a_jrc_is_given_to_cojp_only_while_its_ping_answers() -> None:
    asyncio.run(_jrc_given_only_while_it_answers())


async def _jrc_given_only_while_it_answers() -> None:
    answers: dict[UdpRegistrar, str | None] = {}

    async def probe(registrar: UdpRegistrar, timeout: float) -> str | None:
        return answers[registrar]

    table = ConstrainedRegistrars(log=logging.getLogger("t"), health_interval=1,
                                  health_timeout=1, on_change=lambda: None, probe=probe)
    jrc = UdpRegistrar.make(UdpKind.COJP, "fd4a:5044::100", 5683)
    answers[jrc] = None
    table.offer(jrc, "grasp", 180)
    await table._pass()
    given = table.endpoint_for(UdpKind.COJP)
    assert given is not None and given.cojp_port == 5683 and given.source == "grasp"
    # A JRC is not a DTLS registrar: the coaps/jpy choice stays empty.
    assert table.choose() == (None, None)
    assert table.endpoint_for(UdpKind.JPY) is None
    answers[jrc] = "no CoAP ping answer within 1 s"
    await table._pass()
    assert table.endpoint_for(UdpKind.COJP) is None
