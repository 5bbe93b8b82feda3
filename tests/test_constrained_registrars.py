"""Constrained registrars (discovery/constrained.py): the DTLS probe, their UDP endpoints from
GRASP floods, CoRE answers and the configuration, the choice of mode (join-proxy draft §4.1),
and how joinproxyctl status shows them. Pure parts and loopback sockets; the namespace test
with the real registrar and daemon is tests/test_constrained_registrar_lab.py."""

import asyncio
import datetime
import logging
import socket
from ipaddress import IPv6Address

import pytest

from brski import dtls
from brski import grasp as wire
from brski.errors import DecodeError
from brski.pki import create_test_pki
from joinproxyd import ctl
from joinproxyd.config import ConfigError, parse
from joinproxyd.discovery.constrained import (
    ConstrainedRegistrars,
    UdpKind,
    UdpRegistrar,
    dtls_probe,
    static_udp_registrars,
    udp_registrars_in_flood,
    udp_registrars_in_links,
)
from joinproxyd.discovery.grasp import GraspRegistrarListener
from joinproxyd.metrics import Metrics
from joinproxyd.model import RegistrarEndpoint

LOG = logging.getLogger("test.constrained")
ULA = IPv6Address("fd00::52")


# --- the DTLS probe, sans-IO ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dtls_server():
    """A real brski.dtls server (certificate DTLS, as the registrar's CoAPS runs it)."""
    pki = create_test_pki(datetime.datetime.now(datetime.UTC), serials=["P1"])
    return dtls.DtlsServer(dtls.DtlsConfig(pki.registrar.cert, pki.registrar.key,
                                           [pki.manufacturer_ca.cert]))


def test_probe_hello_is_answered_with_a_hello_verify_request(dtls_server):
    hello = dtls.probe_client_hello()
    assert dtls.is_client_hello(hello)
    accepted = dtls_server.accept(b"peer", hello, 0.0)
    assert accepted.session is None and accepted.drop == "no-cookie"  # no state kept
    [answer] = accepted.replies
    assert dtls.probe_answer(answer) == "HelloVerifyRequest"


@pytest.mark.parametrize("datagram", [
    b"", b"\x16", b"\x16\xfe\xfd" + b"\0" * 10,  # truncated
    dtls.probe_client_hello(),  # our own hello echoed back is no answer
    bytes([21, 0xFE, 0xFD]) + b"\0" * 8 + b"\x00\x02\x02\x28",  # an alert
    b"\x16\x03\x03" + b"\0" * 8 + b"\x00\x0c" + b"\x03" + b"\0" * 11,  # TLS, not DTLS
    b"\x16\xfe\xfd\x00\x01" + b"\0" * 6 + b"\x00\x0c" + b"\x03" + b"\0" * 11,  # epoch 1
    b"\x16\xfe\xfd" + b"\0" * 8 + b"\x00\x40" + b"\x03" + b"\0" * 11,  # length past the end
])
def test_probe_answer_refuses_what_is_not_a_hello_answer(datagram):
    assert dtls.probe_answer(datagram) is None


def _free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def test_dtls_probe_on_loopback(dtls_server):
    class Server(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            for reply in dtls_server.accept(repr(addr).encode(), data, 0.0).replies:
                self.transport.sendto(reply, addr)

    class Silent(asyncio.DatagramProtocol):
        pass

    async def main():
        loop = asyncio.get_running_loop()
        live, _ = await loop.create_datagram_endpoint(Server, local_addr=("::1", 0))
        quiet, _ = await loop.create_datagram_endpoint(Silent, local_addr=("::1", 0))
        try:
            return [await dtls_probe(UdpRegistrar.make(UdpKind.COAPS, "::1", port), 1.0)
                    for port in (live.get_extra_info("sockname")[1],
                                 quiet.get_extra_info("sockname")[1], _free_port())]
        finally:
            live.close()
            quiet.close()

    answered, silent, closed = asyncio.run(main())
    assert answered is None
    assert silent == "no DTLS answer within 1 s"
    assert closed == "Connection refused"


def test_dtls_probe_of_a_jpy_port_wraps_the_hello_and_wants_its_header_back(dtls_server):
    from brski.jpy import JpyMessage

    class JpyServer(asyncio.DatagramProtocol):
        """A JPY endpoint as the draft has it: DTLS inside [header, content], header back."""

        def __init__(self, tamper: bool) -> None:
            self.tamper = tamper

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            message = JpyMessage.decode(data)
            header = bytes([message.header[0] ^ 1]) + message.header[1:] if self.tamper \
                else message.header
            for reply in dtls_server.accept(message.header, message.content, 0.0).replies:
                self.transport.sendto(JpyMessage(header, reply).encode(), addr)

    async def main():
        loop = asyncio.get_running_loop()
        out = []
        for tamper in (False, True):
            server, _ = await loop.create_datagram_endpoint(lambda t=tamper: JpyServer(t),
                                                            local_addr=("::1", 0))
            port = server.get_extra_info("sockname")[1]
            out.append(await dtls_probe(UdpRegistrar.make(UdpKind.JPY, "::1", port), 0.5))
            server.close()
        return out

    good, tampered = asyncio.run(main())
    assert good is None
    assert tampered == "no DTLS answer within 0.5 s"


# --- where endpoints come from -------------------------------------------------------------


def _flood(*entries: tuple[object, wire.IPv6Locator]) -> wire.Flood:
    return wire.Flood(7, IPv6Address("fe80::2"), 60_000, tuple(
        wire.FloodEntry(wire.Objective(wire.AN_JOIN_REGISTRAR, wire.F_SYNCH, 255, value), loc)
        for value, loc in entries))


def test_flood_udp_locators_by_objective_value():
    flood = _flood(("EST-TLS", wire.IPv6Locator(ULA, wire.IPPROTO_TCP, 8443)),
                   ("BRSKI_JP", wire.IPv6Locator(ULA, wire.IPPROTO_UDP, 5684)),
                   ("BRSKI_RJP", wire.IPv6Locator(ULA, wire.IPPROTO_UDP, 7634)),
                   ("BRSKI_JP", wire.IPv6Locator(IPv6Address("fe80::9"), wire.IPPROTO_UDP, 5684)),
                   ("BRSKI_JP", wire.IPv6Locator(IPv6Address("::1"), wire.IPPROTO_UDP, 5684)),
                   ("OTHER", wire.IPv6Locator(ULA, wire.IPPROTO_UDP, 1)),
                   ("BRSKI_JP", wire.IPv6Locator(ULA, wire.IPPROTO_TCP, 5684)))
    assert udp_registrars_in_flood(flood, 4) == [
        UdpRegistrar(UdpKind.COAPS, "fd00::52", 5684),
        UdpRegistrar(UdpKind.JPY, "fd00::52", 7634),
        UdpRegistrar(UdpKind.COAPS, "fe80::9", 5684, 4)]


def test_the_registrars_own_flood_round_trips():
    flood = wire.registrar_flood(lambda n: b"\0" * n, IPv6Address("fe80::2"), [
        wire.IPv6Locator(ULA, wire.IPPROTO_TCP, 8443),
        wire.IPv6Locator(ULA, wire.IPPROTO_UDP, 5684)])
    back = wire.Flood.decode(flood.encode())
    assert udp_registrars_in_flood(back, 4) == [UdpRegistrar(UdpKind.COAPS, "fd00::52", 5684)]


def test_grasp_listener_takes_a_flood_with_only_udp_locators():
    metrics, seen, tcp = Metrics(), [], []
    try:
        listener = GraspRegistrarListener(
            interface="bb0", ifindex=4, on_registrar=lambda e, ttl: tcp.append(e),
            metrics=metrics, log=LOG,
            on_flood=lambda flood, index: seen.extend(found := udp_registrars_in_flood(
                flood, index)) or len(found))
        udp_only = _flood(("BRSKI_RJP", wire.IPv6Locator(ULA, wire.IPPROTO_UDP, 7634)))
        listener.received(udp_only.encode(), "fe80::2")
        assert seen == [UdpRegistrar(UdpKind.JPY, "fd00::52", 7634)] and tcp == []
        nothing = _flood(("OTHER", wire.IPv6Locator(ULA, wire.IPPROTO_UDP, 7634)))
        listener.received(nothing.encode(), "fe80::2")
        assert metrics.drops.values()[("discovery", "irrelevant")] == 1
    finally:
        metrics.close()


def test_core_answers_give_endpoints_and_skip_names():
    doc = (b"<coaps://[fd00::52]/.well-known/brski>;rt=brski,<jpy://[fd00::52]:7634>;"
           b"rt=brski.rjp,<coaps://[fe80::5]:5685>;rt=brski,</other>;rt=x")
    assert udp_registrars_in_links(doc, 3) == [
        UdpRegistrar(UdpKind.COAPS, "fd00::52", 5684),
        UdpRegistrar(UdpKind.JPY, "fd00::52", 7634),
        UdpRegistrar(UdpKind.COAPS, "fe80::5", 5685, 3)]
    named = b"<coaps://registrar.example>;rt=brski,<jpy://[fd00::52]:7634>;rt=brski.rjp"
    assert udp_registrars_in_links(named, 3) == [UdpRegistrar(UdpKind.JPY, "fd00::52", 7634)]
    with pytest.raises(DecodeError):
        udp_registrars_in_links(b"<jpy://[fd00::52]>;rt=brski.rjp", 3)  # jpy needs a port


def _config(static: dict, **registrars) -> dict:
    return {"backbone": {"interface": "bb0"},
            "registrars": {"discovery": ["static"], "static": [static], **registrars}}


def test_static_registrar_udp_ports_are_read():
    config = parse(_config({"address": "fd00::52", "port": 8443, "coaps_port": 5684,
                            "jpy_port": 7634}, constrained_mode="coaps", core_interval=5))
    [static] = config.static_registrars
    assert (static.coaps_port, static.jpy_port) == (5684, 7634)
    assert (config.constrained_mode, config.core_interval) == ("coaps", 5)
    endpoint = RegistrarEndpoint(10, "fd00::52", 8443, coaps_port=5684, jpy_port=7634)
    assert static_udp_registrars([endpoint]) == [UdpRegistrar(UdpKind.COAPS, "fd00::52", 5684),
                                                 UdpRegistrar(UdpKind.JPY, "fd00::52", 7634)]
    plain = parse(_config({"address": "fd00::52"}))
    assert plain.static_registrars[0].coaps_port is None and plain.constrained_mode == "auto"


@pytest.mark.parametrize(("static", "extra", "key"), [
    ({"address": "fd00::52", "coaps_port": 0}, {}, "registrars.static[0].coaps_port"),
    ({"address": "fd00::52", "jpy_port": "7634"}, {}, "registrars.static[0].jpy_port"),
    ({"address": "fd00::52"}, {"constrained_mode": "stateless"}, "registrars.constrained_mode"),
])
def test_bad_constrained_settings_name_the_key(static, extra, key):
    with pytest.raises(ConfigError) as caught:
        parse(_config(static, **extra))
    assert key in str(caught.value)


# --- health and the choice -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _table(health: dict, mode: str = "auto", clock=None) -> tuple[ConstrainedRegistrars, list]:
    changes: list = []

    async def probe(registrar, timeout):
        return health.get(registrar, "down")

    table = ConstrainedRegistrars(log=LOG, health_interval=1, health_timeout=1, mode=mode,
                                  on_change=lambda: changes.append(1), probe=probe,
                                  clock=clock or Clock())
    return table, changes


COAPS = UdpRegistrar(UdpKind.COAPS, "fd00::52", 5684)
JPY = UdpRegistrar(UdpKind.JPY, "fd00::52", 7634)
OTHER = UdpRegistrar(UdpKind.COAPS, "fd00::53", 5684)


def test_stateless_is_chosen_when_offered_and_the_operator_can_override():
    async def main():
        table, changes = _table({COAPS: None, JPY: None})
        table.offer(COAPS, "coap", 90)
        table.offer(JPY, "grasp", 90)
        assert table.choose() == (None, None)  # nothing probed yet: nothing healthy
        await table._pass()
        kind, endpoint = table.choose()
        assert kind is UdpKind.JPY and endpoint.port == 7634
        assert (endpoint.coaps_port, endpoint.jpy_port, endpoint.protocol) == (5684, 7634, 17)
        assert table.chosen == endpoint and changes
        table.mode = "coaps"
        kind, endpoint = table.choose()
        assert kind is UdpKind.COAPS and endpoint.port == 5684
        table.mode = "jpy"
        table.withdraw(JPY, "grasp")
        assert table.choose() == (None, None)  # forced jpy, and no jpy registrar
    asyncio.run(main())


def test_unhealthy_and_expired_endpoints_are_not_chosen():
    async def main():
        clock = Clock()
        health = {COAPS: None, OTHER: None}
        table, _ = _table(health, clock=clock)
        table.set_static([OTHER])
        table.offer(COAPS, "coap", 30)
        await table._pass()
        assert table.choose()[1].address == "fd00::53"  # static before discovered
        health[OTHER] = "Connection refused"
        await table._pass()
        assert table.choose()[1].address == "fd00::52"
        status = table.status()
        assert [(e["address"], e["healthy"], e["last_error"]) for e in status["endpoints"]] == [
            ("fd00::53", False, "Connection refused"), ("fd00::52", True, None)]
        clock.now += 31
        await table._pass()
        assert table.choose() == (None, None)
        assert [e["address"] for e in table.status()["endpoints"]] == ["fd00::53"]
    asyncio.run(main())


def test_a_jrc_on_another_host_is_starred_as_in_use():
    """The cojp relay is given the best healthy JRC (endpoint_for), which need not be the
    registrar coaps/jpy chose: status marks what each kind's relay uses, not only that one."""
    jrc = UdpRegistrar(UdpKind.COJP, "fd00::54", 5683)

    async def main():
        table, _ = _table({COAPS: None, OTHER: None, jrc: None})
        table.set_static([COAPS])
        table.offer(OTHER, "coap", 90)
        table.offer(jrc, "grasp", 90)
        await table._pass()
        status = table.status()
        assert {(e["kind"], e["address"]): e["used"] for e in status["endpoints"]} == {
            ("coaps", "fd00::52"): True, ("coaps", "fd00::53"): False,
            ("cojp", "fd00::54"): True}
        text = "\n".join(ctl.render_constrained(status))
        starred = [line for line in text.splitlines() if line.rstrip().endswith("*")]
        assert [line.split()[0] for line in starred] == ["coaps://[fd00::52]:5684",
                                                         "cojp://[fd00::54]:5683"], text
    asyncio.run(main())


def test_status_rendering_shows_endpoints_and_health():
    info = {"mode_setting": "auto", "mode": "coaps",
            "chosen": {"address": "fd00::52", "coaps_port": 5684, "jpy_port": None},
            "endpoints": [
                {"kind": "coaps", "address": "fd00::52", "port": 5684, "sources": ["coap", "grasp"],
                 "healthy": True, "last_error": None},
                {"kind": "jpy", "address": "fd00::53", "port": 7634, "sources": ["static"],
                 "healthy": False, "last_error": "no DTLS answer within 1 s"}]}
    text = "\n".join(ctl.render_constrained(info))
    assert "constrained registrars (mode coaps, setting auto):" in text
    assert "coaps://[fd00::52]:5684  coap,grasp  yes" in text and text.count("*") == 1
    assert "jpy://[fd00::53]:7634    static      no       no DTLS answer within 1 s" in text
    assert ctl.render_constrained(None) == []


def test_core_answers_that_are_garbage_are_counted_and_logged_once(caplog):
    from aiocoap import CONTENT, NOT_FOUND, Message

    from joinproxyd.discovery.constrained import CoreRegistrarFinder

    got: list = []
    finder = CoreRegistrarFinder(interface="bb0", ifindex=4, period=10, log=LOG,
                                 on_registrar=lambda reg, ttl: got.append((reg, ttl)))

    def answer(payload: bytes, token: bytes = b"tokn", code=CONTENT) -> bytes:
        message = Message(code=code, payload=payload)
        message.mtype, message.token, message.mid = 1, token, 1  # NON
        return message.encode()

    with caplog.at_level(logging.WARNING, logger=LOG.name):
        finder._answer(answer(b"<jpy://[fd00::52]:7634>;rt=brski.rjp"), "fe80::2", b"tokn")
        finder._answer(answer(b"<jpy://[fd00::53]:7634>;rt=brski.rjp", b"othr"), "fe80::2",
                       b"tokn")  # another request's answer
        finder._answer(answer(b"", code=NOT_FOUND), "fe80::2", b"tokn")
        for garbage in (b"\xff" * 9, b"\x40", answer(b"<jpy://[fd00::52]>;rt=brski.rjp"),
                        answer(b"<" + b" " * 40)):
            finder._answer(garbage, "fe80::2", b"tokn")
    assert got == [(UdpRegistrar(UdpKind.JPY, "fd00::52", 7634), 30)]
    assert finder.bad_answers == 4
    assert caplog.text.count("CoRE discovery answer from fe80::2 dropped") == 1
