"""The registrar's JPY endpoint: pledges behind a stateless join proxy (join-proxy draft §4.4).

A stateless proxy sends each pledge datagram as the JPY message ``[header, content]`` from one
socket. Here each (proxy address, proxy port, header) is one DTLS peer of the same CoAPS
service as ``[coaps] listen`` (the same resources, registrar.coaps): the DTLS endpoint
(coaps_io) keys its sessions by an address tuple, and this layer appends the header to the
proxy's address, so one socket carries every session. What the session sends goes back as
``[the same header, the DTLS bytes]`` to the proxy address and port it came from.

A datagram that is not a CBOR array whose first two elements are byte strings (§4.5.7: at
least two elements, only the first two used) is dropped, counted as
``brski_registrar_refusals_total{endpoint="jpy", reason="malformed"}`` and, the first time,
logged. ``[jpy] listen`` turns it on (off unless set).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from brski.errors import DecodeError, UsageError
from brski.jpy import JpyMessage
from coaps_io.endpoint import DtlsEndpoint

log = logging.getLogger("registrar.jpy")


class _SessionTransport:
    """What the DTLS endpoint sends through: it wraps each datagram for the proxy."""

    def __init__(self, outer: JpyEndpoint) -> None:
        self.outer = outer

    def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None:
        transport = self.outer.transport
        if transport is None:
            return
        header = addr[4]
        try:
            wrapped = JpyMessage(header, data).encode()
        except UsageError as exc:  # a reply too big for one datagram: DTLS will retransmit
            log.warning("JPY reply to [%s]:%d not sent: %s", addr[0], addr[1], exc)
            return
        transport.sendto(wrapped, addr[:4])

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.outer.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def close(self) -> None:
        if self.outer.transport is not None:
            self.outer.transport.close()

    def is_closing(self) -> bool:
        return self.outer.transport is None or self.outer.transport.is_closing()


class JpyDtlsCollector:
    """The JPY endpoint's DTLS sessions and drops, read at scrape time (the [coaps] endpoint's
    are brski_registrar_coaps_*)."""

    def __init__(self, endpoint: DtlsEndpoint) -> None:
        self.endpoint = endpoint

    def collect(self) -> Any:
        drops = CounterMetricFamily("brski_registrar_jpy_dtls_drops",
                                    "Datagrams in JPY messages dropped by DTLS", labels=["reason"])
        for reason, count in sorted(self.endpoint.drops.items()):
            drops.add_metric([reason], count)
        yield drops
        yield GaugeMetricFamily("brski_registrar_jpy_sessions",
                                "DTLS sessions open through stateless join proxies",
                                value=len(self.endpoint.peers))


class JpyEndpoint(asyncio.DatagramProtocol):
    """The socket side: unwraps JPY messages into the DTLS endpoint, keyed by header."""

    def __init__(self, dtls: DtlsEndpoint,
                 refused: Callable[[str, str], None] | None = None) -> None:
        self.dtls = dtls
        self.refused = refused
        self.transport: asyncio.DatagramTransport | None = None
        self.malformed = 0
        self.messages = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport
        self.dtls.connection_made(_SessionTransport(self))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.dtls.connection_lost(exc)

    def error_received(self, exc: Exception) -> None:
        self.dtls.error_received(exc)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            message = JpyMessage.decode(data)
        except DecodeError as exc:
            self.malformed += 1
            if self.refused is not None:
                self.refused("jpy", "malformed")
            level = logging.WARNING if self.malformed == 1 else logging.DEBUG
            log.log(level, "JPY datagram from [%s]:%d dropped: %s", addr[0], addr[1], exc)
            return
        self.messages += 1
        host, port = addr[0], addr[1]
        flow = addr[2] if len(addr) > 2 else 0
        scope = addr[3] if len(addr) > 3 else 0
        self.dtls.datagram_received(message.content, (host, port, flow, scope, message.header))
