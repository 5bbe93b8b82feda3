"""aiocoap over certificate DTLS: a MessageInterface whose datagrams go through :mod:`.endpoint`.

aiocoap keeps all CoAP semantics (message codec, deduplication, CON retransmission, block-wise,
separate responses); this module only hands it decrypted datagrams with an address object per
DTLS session, and encrypts what it sends. aiocoap's own DTLS transports are tinydtls and PSK-only.

A request handler reaches the pledge's certificate through ``request.remote.peer_certificate``
(and the verified chain through ``request.remote.peer_chain``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiocoap import Context, error, interfaces, util
from aiocoap.numbers import COAPS_PORT
from aiocoap.transports.generic_udp import GenericMessageInterface
from cryptography import x509

from brski.dtls import DtlsConfig, DtlsServer

from .endpoint import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    HANDSHAKE_TIMEOUT,
    DtlsEndpoint,
    Peer,
    PeerAddress,
)
from .keylog import with_env_keylog

# CoAP header, token and the options a block-wise exchange carries, kept clear of the payload.
COAP_OVERHEAD = 64


def block_size_exp(cleartext_mtu: int) -> int:
    """The largest Block2/Block1 SZX whose message still fits one DTLS record."""
    for szx in range(6, -1, -1):
        if 2 ** (szx + 4) + COAP_OVERHEAD <= cleartext_mtu:
            return szx
    return 0


class DtlsAddress(interfaces.EndpointAddress):
    """One DTLS session seen from aiocoap: hashing by identity gives a new remote per session
    (RFC 7252 §9.1.2: messages from different epochs never match)."""

    scheme = "coaps"
    is_multicast = False
    is_multicast_locally = False
    # A plain attribute (the base class has a property): aiocoap lowers it per request.
    maximum_block_size_exp: int = 6  # type: ignore[assignment]

    def __init__(self, peer: Peer) -> None:
        self._peer = peer
        self.maximum_block_size_exp = block_size_exp(peer.session.cleartext_mtu)

    def __repr__(self) -> str:
        return f"<DtlsAddress {self.hostinfo}>"

    @property
    def maximum_payload_size(self) -> int:
        return 2 ** (self.maximum_block_size_exp + 4)

    def send(self, data: bytes) -> None:
        if self._peer.session.closed:
            raise error.LibraryShutdown("DTLS session is closed")
        self._peer.send(data)

    @property
    def hostinfo(self) -> str:
        return util.hostportjoin(self._peer.addr[0], self._peer.addr[1])

    @property
    def hostinfo_local(self) -> str:
        local = self._peer.endpoint.local_address
        return util.hostportjoin(local[0], local[1])

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def blockwise_key(self) -> Any:
        return self

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self._peer.session.peer_certificate

    @property
    def peer_chain(self) -> list[x509.Certificate]:
        return self._peer.session.peer_chain

    @property
    def authenticated_claims(self) -> list[x509.Certificate]:
        cert = self.peer_certificate
        return [cert] if cert is not None else []


class DtlsMessageInterface(GenericMessageInterface):
    """aiocoap's MessageInterface on a :class:`DtlsEndpoint` (server or client)."""

    def __init__(self, mman: interfaces.MessageManager, log: logging.Logger,
                 loop: asyncio.AbstractEventLoop, client_config: DtlsConfig | None) -> None:
        super().__init__(mman, log, loop)
        self._client_config = client_config
        self._addresses: dict[int, DtlsAddress] = {}
        self.endpoint: DtlsEndpoint
        self._pool = self  # GenericMessageInterface calls _pool.connect and _pool.shutdown

    def _address(self, peer: Peer) -> DtlsAddress:
        address = self._addresses.get(id(peer))
        if address is None or address._peer is not peer:
            address = self._addresses[id(peer)] = DtlsAddress(peer)
        return address

    def _plaintext(self, peer: Peer, data: bytes) -> None:
        self._received_datagram(self._address(peer), data)

    def _closed(self, peer: Peer, exc: Exception) -> None:
        address = self._addresses.pop(id(peer), None)
        if address is not None and self._mman is not None:
            self._received_exception(address, error.NetworkError(str(exc)))

    @classmethod
    async def create(
        cls, bind: tuple[str, int], mman: interfaces.MessageManager, log: logging.Logger,
        *, server_config: DtlsConfig | None = None, client_config: DtlsConfig | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        wrap: Callable[[DtlsEndpoint], asyncio.DatagramProtocol] | None = None,
    ) -> DtlsMessageInterface:
        """``wrap``: a protocol between the socket and the DTLS endpoint (the registrar's JPY
        endpoint unwraps each datagram and names its peer by proxy address, port and header,
        so one socket carries many sessions without one socket each)."""
        loop = asyncio.get_running_loop()
        self = cls(mman, log, loop, client_config)
        server = DtlsServer(server_config) if server_config is not None else None
        host = bind[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        endpoint = DtlsEndpoint(server=server, on_plaintext=self._plaintext,
                                on_closed=self._closed, max_sessions=max_sessions,
                                idle_timeout=idle_timeout, handshake_timeout=handshake_timeout)
        await loop.create_datagram_endpoint(
            lambda: endpoint if wrap is None else wrap(endpoint),
            local_addr=(host, bind[1]), family=family,
        )
        self.endpoint = endpoint
        return self

    # GenericMessageInterface's pool

    async def connect(self, hostport: tuple[str, int]) -> DtlsAddress:
        if self._client_config is None:
            raise error.NetworkError("this DTLS endpoint serves only; it cannot open sessions")
        host, port = hostport
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM,
                                             family=socket.AF_INET6 if ":" in
                                             self.endpoint.local_address[0] else socket.AF_INET)
        addr = infos[0][4]
        try:
            peer = await self.endpoint.connect(addr, self._client_config)
        except (OSError, TimeoutError, Exception) as exc:
            raise error.NetworkError(f"DTLS handshake with {host}:{port} failed: {exc}") from exc
        return self._address(peer)

    async def shutdown(self) -> None:
        self._mman = None
        self.endpoint.close()

    async def recognize_remote(self, remote: Any) -> bool:
        return isinstance(remote, DtlsAddress) and remote._peer.endpoint is self.endpoint

    async def determine_remote(self, request: Any) -> DtlsAddress | None:
        if request.requested_scheme != "coaps":
            return None
        if request.unresolved_remote is not None:
            host, port = util.hostportsplit(request.unresolved_remote)
        elif request.opt.uri_host:
            host, port = request.opt.uri_host, request.opt.uri_port
        else:
            raise ValueError("no coaps host to send to")
        if self._mman is None:
            raise error.LibraryShutdown
        return await self.connect((host, port or COAPS_PORT))


async def _context(
    site: Any, bind: tuple[str, int], loggername: str, **kwargs: Any,
) -> tuple[Context, DtlsMessageInterface]:
    ctx = Context(loop=asyncio.get_running_loop(), serversite=site, loggername=loggername)
    made: list[DtlsMessageInterface] = []

    async def construct(mman: interfaces.MessageManager) -> DtlsMessageInterface:
        interface = await DtlsMessageInterface.create(bind, mman, ctx.log, **kwargs)
        made.append(interface)
        return interface

    # The same wiring aiocoap's create_server_context does for its UDP transports.
    await ctx._append_tokenmanaged_messagemanaged_transport(construct)
    return ctx, made[0]


async def create_server_context(
    site: Any, bind: tuple[str, int], config: DtlsConfig, *,
    max_sessions: int = DEFAULT_MAX_SESSIONS, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT, loggername: str = "coaps-server",
    wrap: Callable[[DtlsEndpoint], asyncio.DatagramProtocol] | None = None,
) -> tuple[Context, DtlsEndpoint]:
    """An aiocoap server Context serving ``site`` over certificate DTLS on ``bind``."""
    ctx, interface = await _context(site, bind, loggername, server_config=with_env_keylog(config),
                                    max_sessions=max_sessions, idle_timeout=idle_timeout,
                                    handshake_timeout=handshake_timeout, wrap=wrap)
    return ctx, interface.endpoint


async def create_client_context(
    config: DtlsConfig, *, bind: tuple[str, int] = ("::", 0), loggername: str = "coaps-client",
) -> tuple[Context, DtlsEndpoint]:
    """An aiocoap client Context whose ``coaps://`` requests use certificate DTLS."""
    ctx, interface = await _context(None, bind, loggername,
                                    client_config=with_env_keylog(config))
    return ctx, interface.endpoint


def peer_of(remote: Any) -> PeerAddress | None:
    """The UDP address behind an aiocoap remote of this transport (for logs and policy)."""
    return remote._peer.addr if isinstance(remote, DtlsAddress) else None
