"""One UDP socket carrying many certificate-DTLS sessions, keyed by the peer's address.

The DTLS state machines are :mod:`brski.dtls` (sans-IO); this is the asyncio edge that feeds
them datagrams, sends what they produce, runs their retransmission timers, expires idle
sessions, enforces a session limit and counts every datagram it drops, by reason:

``no-cookie``        a ClientHello without a valid cookie (answered with a HelloVerifyRequest,
                     no state kept)
``handshake-failed`` a session whose handshake failed (bad certificate, alert, timeout)
``table-full``       a cookie-verified ClientHello while ``max_sessions`` sessions exist
``garbage``          a datagram from an unknown peer that is not a usable ClientHello

Drops are logged through a :class:`~.log_limit.LogLimiter` (the first of each reason per minute,
then a summary line), so a flood does not write a line per datagram. A server may set
``on_refused`` to log and count a failed handshake itself, naming the client's certificate.

Both the registrar (server) and pledge-sim (client) use it: a server endpoint has a
:class:`~brski.dtls.DtlsServer`; a client endpoint opens sessions with :meth:`connect`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from brski.dtls import DtlsConfig, DtlsError, DtlsServer, DtlsSession, is_client_hello

from .log_limit import LogLimiter

DROP_REASONS = ("no-cookie", "handshake-failed", "table-full", "garbage")
DEFAULT_MAX_SESSIONS = 1000
DEFAULT_IDLE_TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 30.0

log = logging.getLogger(__name__)

PeerAddress = tuple[Any, ...]  # what asyncio gives for the socket family: (host, port, ...)
# (peer address, the failed session, why): a server's report of a refused handshake.
OnRefused = Callable[[PeerAddress, DtlsSession, str], None]


def peer_id(addr: PeerAddress) -> bytes:
    """The bytes a cookie binds to: host (with scope), port, and anything after the scope
    (the JPY header, for a peer behind a stateless join proxy)."""
    host, port = addr[0], addr[1]
    scope = addr[3] if len(addr) > 3 else 0
    extra = b"".join(b"|" + bytes(part) for part in addr[4:])
    return f"{host}%{scope}|{port}".encode() + extra


@dataclass(eq=False)
class Peer:
    """A DTLS session with one remote address, and what the endpoint tracks about it."""

    endpoint: DtlsEndpoint
    addr: PeerAddress
    session: DtlsSession
    last_seen: float
    timer: asyncio.TimerHandle | None = None
    established: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop()
                                              .create_future())

    def send(self, data: bytes) -> None:
        """Send one application record (a CoAP message) to this peer."""
        self.session.send(data)
        self.endpoint.records_sent += 1
        self.endpoint._flush(self)


class DtlsEndpoint(asyncio.DatagramProtocol):
    """The socket side. ``on_plaintext(peer, data)`` gets each application record;
    ``on_closed(peer, exc)`` learns when an established session ends."""

    def __init__(
        self,
        *,
        server: DtlsServer | None = None,
        on_plaintext: Callable[[Peer, bytes], None],
        on_closed: Callable[[Peer, Exception], None] | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or idle_timeout <= 0 or handshake_timeout <= 0:
            raise ValueError("max_sessions must be ≥ 1, idle and handshake timeouts > 0")
        self.handshake_timeout = handshake_timeout
        self._server = server
        self._on_plaintext = on_plaintext
        self._on_closed = on_closed
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self.peers: dict[PeerAddress, Peer] = {}
        self.drops: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.handshakes = 0
        self.records_received = 0  # application records (CoAP messages) decrypted
        self.records_sent = 0
        self.on_refused: OnRefused | None = None
        self.log_limit = LogLimiter(log)
        self._transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- asyncio plumbing -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a datagram transport
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def error_received(self, exc: Exception) -> None:
        log.debug("DTLS socket error: %s", exc)  # ICMP errors; retransmission copes

    @property
    def local_address(self) -> PeerAddress:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")

    def close(self) -> None:
        for peer in list(self.peers.values()):
            peer.session.close()
            self._flush(peer)
            self._forget(peer, ConnectionAbortedError("DTLS endpoint closed"))
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- datagrams ------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: PeerAddress) -> None:
        now = self._clock()
        peer = self.peers.get(addr)
        if peer is None:
            self._from_unknown(data, addr, now)
            return
        if peer.session.handshake_complete and is_client_hello(data) and self._server:
            # RFC 6347 §4.2.8: a fresh epoch-0 ClientHello from a known address is a rebooted
            # client; once it proves the address with a cookie, it replaces the old session.
            self._from_unknown(data, addr, now, replacing=peer)
            return
        peer.last_seen = now
        try:
            records = peer.session.receive(data)
        except DtlsError as exc:
            self._flush(peer)
            self._failed(peer, exc)
            return
        except Exception as exc:  # DecodeError from an empty datagram; a daemon never dies
            self._drop("garbage", addr, str(exc))
            return
        self._flush(peer)
        for record in records:
            self.records_received += 1
            self._on_plaintext(peer, record)
        if peer.session.closed:
            self._forget(peer, ConnectionResetError("DTLS close_notify from the peer"))

    def _from_unknown(self, data: bytes, addr: PeerAddress, now: float,
                      replacing: Peer | None = None) -> None:
        if self._server is None:
            self._drop("garbage", addr, "no session with this peer")
            return
        accepted = self._server.accept(peer_id(addr), data, now)
        if accepted.session is not None and replacing is not None:
            log.info("DTLS session with %s replaced by a new handshake", addr[:2])
            self._forget(replacing, ConnectionResetError("DTLS peer started a new session"))
        if accepted.session is not None and len(self.peers) >= self.max_sessions:
            self._drop("table-full", addr, f"{len(self.peers)} sessions")
            return  # the verified ClientHello is forgotten; the client will retry
        for datagram in accepted.replies:
            self._sendto(datagram, addr)
        if accepted.drop is not None:
            self._drop(accepted.drop, addr, accepted.detail, accepted.failed)
            return
        assert accepted.session is not None
        peer = Peer(self, addr, accepted.session, now)
        self.peers[addr] = peer
        self._arm_timer(peer)

    def _sendto(self, datagram: bytes, addr: PeerAddress) -> None:
        if self._transport is not None:
            self._transport.sendto(datagram, addr)

    def _flush(self, peer: Peer) -> None:
        for datagram in peer.session.datagrams_to_send():
            self._sendto(datagram, peer.addr)
        if peer.session.handshake_complete and not peer.established.done():
            self.handshakes += 1
            peer.established.set_result(None)
        self._arm_timer(peer)

    def _drop(self, reason: str, addr: PeerAddress, detail: str,
              session: DtlsSession | None = None) -> None:
        self.drops[reason] += 1
        if reason == "handshake-failed" and session is not None and self.on_refused is not None:
            try:
                self.on_refused(addr, session, detail)
            except Exception:  # a reporting bug must not take the socket down
                log.exception("reporting a refused DTLS handshake failed")
            return
        level = logging.DEBUG if reason == "no-cookie" else logging.WARNING
        if self.log_limit.allow(f"DTLS drop {reason}", level):
            log.log(level, "DTLS drop %s from %s: %s", reason, addr[:2], detail)

    def _failed(self, peer: Peer, exc: Exception) -> None:
        if not peer.session.handshake_complete:
            self._drop("handshake-failed", peer.addr, str(exc), peer.session)
        else:
            log.info("DTLS session with %s ended: %s", peer.addr[:2], exc)
        self._forget(peer, exc)

    def _forget(self, peer: Peer, exc: Exception) -> None:
        if self.peers.get(peer.addr) is peer:
            del self.peers[peer.addr]
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        if not peer.established.done():
            peer.established.set_exception(exc)
            peer.established.exception()  # retrieved: nobody may be waiting
        elif self._on_closed is not None:
            self._on_closed(peer, exc)

    # -- time -----------------------------------------------------------------------------------

    def _arm_timer(self, peer: Peer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        loop = asyncio.get_running_loop()
        due = peer.session.next_timer(loop.time())
        if due is not None:
            peer.timer = loop.call_at(due + 0.001, self._on_timer, peer)

    def _on_timer(self, peer: Peer) -> None:
        peer.timer = None
        try:
            peer.session.handle_timer()
        except DtlsError as exc:
            self._flush(peer)
            self._failed(peer, exc)
            return
        self._flush(peer)

    async def _sweep(self) -> None:
        """Expire idle sessions, and handshakes that never finish."""
        while True:
            await asyncio.sleep(min(self.idle_timeout, self.handshake_timeout) / 4)
            now = self._clock()
            self.log_limit.flush()
            for peer in list(self.peers.values()):
                limit = (self.idle_timeout if peer.session.handshake_complete
                         else self.handshake_timeout)
                if now - peer.last_seen >= limit:
                    peer.session.close()
                    self._flush(peer)
                    if peer.session.handshake_complete:
                        log.info("DTLS session with %s idle for %.0f s: closed",
                                 peer.addr[:2], now - peer.last_seen)
                    else:  # the refusal is its one line
                        self._drop("handshake-failed", peer.addr,
                                   f"handshake unfinished after {now - peer.last_seen:.0f} s",
                                   peer.session)
                    self._forget(peer, TimeoutError("DTLS session idle"))

    # -- client side ----------------------------------------------------------------------------

    async def connect(self, addr: PeerAddress, config: DtlsConfig,
                      timeout: float = HANDSHAKE_TIMEOUT) -> Peer:
        """A session to ``addr`` (reused when one exists), after its handshake completes."""
        peer = self.peers.get(addr)
        if peer is None:
            peer = Peer(self, addr, DtlsSession.client(config), self._clock())
            self.peers[addr] = peer
            self._flush(peer)
        await asyncio.wait_for(asyncio.shield(peer.established), timeout)
        return peer
