"""registrar.jpy_endpoint without sockets: each JPY message reaches the DTLS endpoint as a
datagram from (proxy address, port, flow, scope, header), what a session sends goes back
wrapped with that header, malformed messages are counted and never reach DTLS, and the DTLS
cookie binds the header too (coaps_io.endpoint.peer_id)."""

from __future__ import annotations

from typing import Any

import cbor2

from brski.jpy import JpyMessage
from coaps_io.endpoint import peer_id
from registrar.jpy_endpoint import JpyEndpoint

PROXY = ("fd4a:5044::1", 40000, 0, 0)


class FakeDtls:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))


class Socket:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("::", 5685, 0, 0) if name == "sockname" else default

    def is_closing(self) -> bool:
        return False


def test_messages_in_replies_out_header_kept() -> None:
    dtls, sock, refusals = FakeDtls(), Socket(), []
    endpoint = JpyEndpoint(dtls, lambda e, r: refusals.append((e, r)))  # type: ignore[arg-type]
    endpoint.connection_made(sock)  # type: ignore[arg-type]
    endpoint.datagram_received(JpyMessage(b"H1", b"hello").encode(), PROXY)
    endpoint.datagram_received(cbor2.dumps([b"H2", b"x", "ignored"]), PROXY)
    assert dtls.got == [(b"hello", (*PROXY, b"H1")), (b"x", (*PROXY, b"H2"))]
    dtls.transport.sendto(b"answer", (*PROXY, b"H1"))
    assert sock.sent == [(JpyMessage(b"H1", b"answer").encode(), PROXY)]
    assert JpyMessage.decode(sock.sent[0][0]).header == b"H1"
    for bad in (cbor2.dumps({1: 2}), cbor2.dumps([b"h"]), cbor2.dumps(["h", b"c"]),
                cbor2.dumps([b"h", "c"]), b"", b"\xff", JpyMessage(b"h", b"c").encode() + b"\0"):
        endpoint.datagram_received(bad, PROXY)
    assert len(dtls.got) == 2
    assert refusals == [("jpy", "malformed")] * 7 and endpoint.malformed == 7
    assert dtls.transport.get_extra_info("sockname") == ("::", 5685, 0, 0)


def test_cookie_binds_the_header() -> None:
    assert peer_id((*PROXY, b"H1")) != peer_id((*PROXY, b"H2"))
    assert peer_id(PROXY) == b"fd4a:5044::1%0|40000"  # unchanged for plain peers
