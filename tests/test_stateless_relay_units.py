"""What jpy and cojp share (relays/stateless.py), through real sockets on loopback: reconcile
opens one join socket per link and the one upstream socket, a datagram goes up and its answer
comes back down and is counted, unserved() and status() say the same things they said before
the two modes shared this code, and close() lets go of every socket."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from brski.coap_datagram import CoapDatagram, MessageType
from brski.jpy import JpyMessage
from joinproxyd.config import CojpSettings, JpySettings, Limits
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface, RegistrarEndpoint
from joinproxyd.relays.base import RelayContext
from joinproxyd.relays.cojp import CojpMode
from joinproxyd.relays.jpy import JpyMode
from joinproxyd.relays.stateless import StatelessDatagramMode

PLEDGE = "fe80::1:2"
LOOPBACK = JoinInterface("lo", socket.if_nametoindex("lo"), "::1", (), ("jpy", "cojp"), 0)


def context(metrics: Metrics) -> RelayContext:
    return RelayContext(metrics, Limits, lambda: None, logging.getLogger("test.stateless"),
                        cojp=lambda: CojpSettings(rate=1e6, burst=1000),
                        jpy=lambda: JpySettings(datapath="user"))


def relayed(metrics: Metrics, mode: str, direction: str) -> float:
    return metrics.registry.get_sample_value(
        "joinproxyd_relayed_datagrams_total", {"mode": mode, "direction": direction}) or 0.0


def join_request() -> bytes:
    return CoapDatagram(MessageType.NON, 2, 7, b"\x05",
                        ((3, b"6tisch.arpa"), (9, b"\x09\x00p"), (39, b"coap")), b"x").encode()


def answer(mode: str, data: bytes) -> bytes:
    """What the stand-in registrar (JRC) sends back for ``data``."""
    if mode == "jpy":
        return data  # the echoed JPY message is a valid reply
    request = CoapDatagram.decode(data)
    return CoapDatagram(MessageType.NON, 0x44, request.message_id, request.token, (),
                        b"ok").encode()


async def round_trip(cls: type[StatelessDatagramMode]) -> dict[str, Any]:
    metrics = Metrics()
    mode = cls(context(metrics))
    registrar_sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    registrar_sock.bind(("::1", 0))
    registrar_sock.settimeout(2)
    registrar = RegistrarEndpoint(10, "::1", 8443, **{mode.registrar_port:
                                                      registrar_sock.getsockname()[1]})
    try:
        await mode.reconcile([LOOPBACK], registrar)
        assert mode.unserved() == {}
        side = mode.joins["lo"]
        assert side.transport is not None and side.transport.get_extra_info("sockname")[1]
        # A pledge's datagram as the join socket hands it over (the relays seal only
        # link-local pledge addresses, which loopback does not have): up through the real
        # upstream socket, the answer back through it and out of the join socket.
        sent = join_request() if mode.name == "cojp" else b"dtls"
        side.datagram_received(sent, (PLEDGE, 40000, 0, LOOPBACK.index))
        up, source = await asyncio.to_thread(registrar_sock.recvfrom, 2048)
        assert source[1] == mode.source_port()
        if mode.name == "jpy":
            assert JpyMessage.decode(up).content == b"dtls"
        down: list[tuple[bytes, Any]] = []
        real_send = side.send

        def send(data: bytes, addr: tuple[str, int, int, int]) -> None:
            down.append((data, addr))
            real_send(data, addr)

        side.send = send  # type: ignore[method-assign]  # records what goes to the pledge
        registrar_sock.sendto(answer(mode.name, up), source)
        for _ in range(100):
            if down:
                break
            await asyncio.sleep(0.02)
        assert relayed(metrics, mode.name, "upstream") == 1
        assert relayed(metrics, mode.name, "downstream") == 1
        status = mode.status()
        # without a port for this mode the link is not served, and status says so
        portless = RegistrarEndpoint(10, "::1", 8443)
        await mode.reconcile([LOOPBACK], portless)
        unserved = {name: why.replace(str(portless.key), "K")
                    for name, why in mode.unserved().items()}
        return {"down": down, "status": status, "unserved": unserved}
    finally:
        await mode.close(0)
        assert mode.joins == {} and mode.by_index == {} and mode.upstream is None
        registrar_sock.close()


def test_jpy_through_the_shared_sockets() -> None:
    got = asyncio.run(round_trip(JpyMode))
    assert got["down"] == [(b"dtls", (PLEDGE, 40000, 0, LOOPBACK.index))]
    assert got["unserved"] == {"lo": "registrar K has no JPY port"}
    status = got["status"]
    assert status["registrar"].startswith("[::1]:") and status["source_port"]
    assert status["datagrams"] == {"upstream": 1, "downstream": 1}
    assert status["listeners"] == [{"interface": "lo", "address": "::1", "port": 0,
                                    "protocol": "udp"}]
    assert {"key_id", "key_age_seconds", "key_rotation_seconds", "replay_filter", "datapath",
            "header"} <= set(status) and "jrc" not in status
    assert status["replay_filter"] == 1 and status["datapath"] == "user"


def test_cojp_through_the_shared_sockets() -> None:
    got = asyncio.run(round_trip(CojpMode))
    (data, to), = got["down"]
    assert to == (PLEDGE, 40000, 0, LOOPBACK.index)
    reply = CoapDatagram.decode(data)
    assert reply.token == b"\x05" and reply.payload == b"ok"
    assert got["unserved"] == {"lo": "registrar K has no cojp_port (JRC)"}
    status = got["status"]
    assert status["jrc"].startswith("[::1]:") and "registrar" not in status
    assert status["datagrams"] == {"upstream": 1, "downstream": 1}
    assert status["join_rate"] == {"rate": 1e6, "burst": 1000}
    assert {"key_id", "key_age_seconds", "replay_filter", "source_port"} <= set(status)


@pytest.mark.parametrize("cls", [JpyMode, CojpMode])
def test_no_upstream_socket_is_said(cls: type[StatelessDatagramMode]) -> None:
    mode = cls(context(Metrics()))
    mode._wanted = {"lo": LOOPBACK}
    side = "registrar-side" if cls is JpyMode else "JRC-side"
    assert mode.unserved() == {"lo": f"no {side} socket"}
