"""The jpy relay's reply path without sockets: key rotation (the previous key still opens, the
one before is stale), the replay filter (an exact copy is dropped; bounded memory), and the
size limit. The namespace tests (test_field_jpy_relay.py) cover the same through the daemon."""

from __future__ import annotations

import asyncio
import logging
import socket
from ipaddress import IPv6Address
from typing import Any

from brski.jpy import JpyMessage, PledgeEndpoint
from joinproxyd.config import Limits
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface, RegistrarEndpoint
from joinproxyd.relays.base import RelayContext
from joinproxyd.relays.jpy import MAX_PLEDGE_DATAGRAM, JpyMode
from joinproxyd.relays.stateless import PledgeSide, ReplayFilter

REGISTRAR = RegistrarEndpoint(10, "fd4a:5044::100", 8443, jpy_port=5684)
FROM_REGISTRAR = ("fd4a:5044::100", 5684, 0, 0)
IFACE = JoinInterface("join0", 7, "fe80::1", (), ("jpy",), 8443)
PLEDGE = PledgeEndpoint(IPv6Address("fe80::1:1"), 40000, 7)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


def make_mode() -> tuple[JpyMode, Recorder, Recorder, Metrics]:
    metrics = Metrics()
    mode = JpyMode(RelayContext(metrics, Limits, lambda: None, logging.getLogger("test.jpy")))
    mode.registrar = REGISTRAR
    mode._registrar_source = (REGISTRAR.address, 5684)
    pledge_link, upstream = Recorder(), Recorder()
    side = PledgeSide(mode, IFACE, pledge_link)  # type: ignore[arg-type]  # records sendto
    side.transport = pledge_link  # type: ignore[assignment]
    mode.joins[IFACE.name] = side
    mode.by_index[IFACE.index] = side
    mode.upstream = upstream  # type: ignore[assignment]
    return mode, pledge_link, upstream, metrics


def drops(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "joinproxyd_drops_total", {"mode": "jpy", "reason": reason}) or 0.0


def reply(header: bytes, content: bytes = b"dtls") -> bytes:
    return JpyMessage(header, content).encode()


def test_previous_key_opens_the_one_before_is_stale() -> None:
    mode, pledge_link, _, metrics = make_mode()
    old = mode.sealer.seal(PLEDGE)
    mode.rotate_key()
    mode.from_registrar(reply(old, b"one"), FROM_REGISTRAR)
    assert pledge_link.sent == [(b"one", ("fe80::1:1", 40000, 0, 7))]
    mode.rotate_key()
    mode.from_registrar(reply(old, b"two"), FROM_REGISTRAR)
    assert len(pledge_link.sent) == 1
    assert drops(metrics, "jpy-stale") == 1


def test_upstream_wraps_with_one_header_per_flow_and_nothing_in_clear() -> None:
    mode, _, upstream, _ = make_mode()
    for data in (b"a", b"b"):
        mode.from_pledge(mode.joins[IFACE.name], data, ("fe80::1:1%join0", 40000, 0, 7))
    mode.from_pledge(mode.joins[IFACE.name], b"c", ("fe80::1:2%join0", 40000, 0, 7))
    messages = [JpyMessage.decode(data) for data, _ in upstream.sent]
    assert [m.content for m in messages] == [b"a", b"b", b"c"]
    assert messages[0].header == messages[1].header != messages[2].header
    assert all(len(m.header) <= 32 for m in messages)
    assert {addr for _, addr in upstream.sent} == {("fd4a:5044::100", 5684, 0, 0)}
    assert mode.sealer.open(messages[2].header) == PledgeEndpoint(
        IPv6Address("fe80::1:2"), 40000, 7)


def test_exact_copy_of_a_reply_is_a_replay() -> None:
    mode, pledge_link, _, metrics = make_mode()
    datagram = reply(mode.sealer.seal(PLEDGE))
    mode.from_registrar(datagram, FROM_REGISTRAR)
    mode.from_registrar(datagram, FROM_REGISTRAR)
    mode.from_registrar(reply(mode.sealer.seal(PLEDGE), b"next record"), FROM_REGISTRAR)
    assert [d for d, _ in pledge_link.sent] == [b"dtls", b"next record"]
    assert drops(metrics, "jpy-replayed") == 1


def test_reply_not_from_the_registrars_jpy_port_is_unsolicited() -> None:
    mode, pledge_link, _, metrics = make_mode()
    datagram = reply(mode.sealer.seal(PLEDGE))
    mode.from_registrar(datagram, ("fd4a:5044::100", 9999, 0, 0))
    mode.from_registrar(datagram, ("fd4a:5044::66", 5684, 0, 0))
    assert pledge_link.sent == []
    assert drops(metrics, "unsolicited") == 2


def test_too_big_is_refused_one_byte_less_relayed() -> None:
    mode, _, upstream, metrics = make_mode()
    peer = ("fe80::1:1%join0", 40000, 0, 7)
    mode.from_pledge(mode.joins[IFACE.name], bytes(MAX_PLEDGE_DATAGRAM + 1), peer)
    assert upstream.sent == [] and drops(metrics, "too-big") == 1
    mode.from_pledge(mode.joins[IFACE.name], bytes(MAX_PLEDGE_DATAGRAM), peer)
    assert len(upstream.sent) == 1 and len(upstream.sent[0][0]) <= 1280 - 48


def test_replay_filter_is_bounded_and_forgets() -> None:
    seen = ReplayFilter(seconds=10, size=4)
    assert not any(seen.seen(bytes([i]), 0.0) for i in range(10))
    assert len(seen) <= 4
    assert seen.seen(bytes([9]), 1.0)
    assert not seen.seen(bytes([9]), 20.0)  # out of the window: accepted again



def test_an_empty_reply_reaches_the_pledge_as_an_empty_datagram() -> None:
    """asyncio's datagram sendto sends nothing for b"": the relay must not count a reply it
    never sent. The join side's send() on a real socket pair on loopback, then the relay."""
    async def send_empty() -> bytes:
        mode, _, _, _ = make_mode()
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        receiver.bind(("::1", 0))
        receiver.settimeout(2)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::1", 0))
        sock.setblocking(False)
        transport, side = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: PledgeSide(mode, IFACE, sock), sock=sock)
        try:
            side.send(b"", ("::1", receiver.getsockname()[1], 0, 0))
            return await asyncio.to_thread(receiver.recv, 100)
        finally:
            transport.close()
            receiver.close()
    assert asyncio.run(send_empty()) == b""

    mode, pledge_link, _, metrics = make_mode()
    mode.from_registrar(reply(mode.sealer.seal(PLEDGE), b""), FROM_REGISTRAR)
    assert pledge_link.sent == [(b"", ("fe80::1:1", 40000, 0, 7))]
    assert metrics.registry.get_sample_value(
        "joinproxyd_relayed_datagrams_total", {"mode": "jpy", "direction": "downstream"}) == 1
