"""The 6TiSCH CoJP stateless join proxy (RFC 9031 §7.1; protocols.md §6).

A pledge sends its Join Request, a CoAP POST protected by OSCORE, to the proxy's link-local
address, UDP 5683, with the options Proxy-Scheme "coap" and Uri-Host "6tisch.arpa". The proxy
strips those two, makes the request non-confirmable with a message ID of its own, replaces the
token with a sealed state object (brski.cojp_token: the pledge's interface, port, interface
identifier, message ID, CON flag and own token under AES-SIV with a key only this process
holds) and sends it from ONE fixed socket to the JRC's CoAP port. The JRC echoes the token
(RFC 8974 extended token: RFC 9031 §7.1 makes the JRC support it); the proxy opens it and
sends the response to the pledge with the pledge's token, as a piggybacked ACK carrying the
pledge's message ID if the request was confirmable, else as NON. So the proxy keeps no table
of pledges; a JRC's confirmable response is acknowledged with an empty ACK (no state either).
The proxy never reads the OSCORE payload: it relays opaque protected CoAP.

Join rate: each join link forwards at most [cojp] rate pledge datagrams per second (a token
bucket with [cojp] burst), RFC 9031 §6.1/§8.4.2's "the JP limits join traffic"; rate 0 forwards
nothing. Marking: both sockets send with the DSCP AF43 (traffic class 0x98), as RFC 9031 asks
of a join proxy's forwarded packets. The 6TiSCH enhanced beacons that carry the join proxy's
existence on 802.15.4 are out of scope on Ethernet links: pledges are told of the proxy's
address out of band. The JRC is the one the control plane hands this mode: configured
(registrars.static cojp_port) or flooded by a registrar under GRASP "6TiSCH-JRC", and
answering a CoAP ping (discovery/constrained.py); joining on cojp links is open only then.

What is dropped, silently towards the network and counted by reason:

* rate-limit: over the link's join rate; window-closed: the operator's join window is closed;
  no-registrar: no registrar with a cojp_port;
* irrelevant: well-formed CoAP that is not a join request for 6tisch.arpa via "coap" (no or
  other Proxy-Scheme/Uri-Host, or a response, an empty message); malformed: not CoAP, or a
  pledge token over 8 bytes; too-big: no room for the sealed token in an IPv6 minimum MTU;
* cojp-forged: a JRC datagram whose token does not authenticate (or has the wrong size);
  cojp-stale: its key is retired or its lifetime (TOKEN_LIFETIME) is over; cojp-replayed:
  exactly these bytes were already relayed lately (jpy.ReplayFilter); unsolicited: not from the
  JRC's address and port, or for a join link no longer served.

Keys: a fresh random key at start, rotated every KEY_ROTATION_SECONDS with the previous one still
opening. A restart loses both: responses in flight are dropped (cojp-stale) and the pledge's
retransmission, sealed anew, carries on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv6Address
from typing import Any

from brski.coap_datagram import (
    CoapDatagram,
    MessageType,
    OptionNumber,
    is_request,
    is_response,
    read_token,
    retokened,
)
from brski.cojp_token import TokenSealer, TokenState
from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.jpy import PledgeEndpoint

from ..aio import cancel_and_wait
from ..limits import TokenBucket
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RefusalSayer, RelayContext, RelayMode
from .jpy import ReplayFilter, _grow_receive_buffer

KEY_ROTATION_SECONDS = 24 * 3600.0
TOKEN_LIFETIME = 60  # seconds a forwarded request's token opens (brski.cojp_token)
MAX_FORWARDED = 1280 - 40 - 8  # what surely reaches the JRC: the IPv6 minimum MTU
AF43 = 38 << 2  # RFC 2597 AF43 as an IPv6 traffic class (DSCP in the upper six bits)
PROXY_SCHEME = b"coap"
JOIN_HOST = b"6tisch.arpa"
DEFAULT_JRC_PORT = 5683

class _PledgeSide(asyncio.DatagramProtocol):
    def __init__(self, mode: CojpMode, iface: JoinInterface) -> None:
        self.mode = mode
        self.iface = iface
        self.transport: asyncio.DatagramTransport | None = None
        self.bucket = TokenBucket(float(mode.ctx.cojp().burst), time.monotonic())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.mode.from_pledge(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.mode.ctx.log.debug("cojp join socket on %s: %s", self.iface.name, exc,
                                extra={"INTERFACE": self.iface.name, "MODE": CojpMode.name})


class _JrcSide(asyncio.DatagramProtocol):
    def __init__(self, mode: CojpMode) -> None:
        self.mode = mode

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.mode.from_jrc(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.mode.ctx.metrics.drop(CojpMode.name, DropReason.REGISTRAR_UNREACHABLE)
        self.mode.ctx.log.debug("cojp JRC socket: %s", exc, extra={"MODE": CojpMode.name})


def _marked_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, AF43)
    except OSError:
        sock.close()
        raise
    return sock


class CojpMode(RelayMode):
    name = "cojp"
    # Pledges learn of a CoJP proxy from 6TiSCH beacons or configuration, not from GRASP/mDNS
    # announcements of a TCP port (announcing one would lure BRSKI pledges to nothing).
    serves_link_local = False
    # The control plane hands this mode the JRC that answers the CoAP ping (daemon.mode_target)
    registrar_port = "cojp_port"

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        # A random first key id: tokens of an earlier run name a key this run lacks.
        self.sealer = TokenSealer(os.urandom(32), os.urandom(1)[0], lifetime=TOKEN_LIFETIME)
        self.key_started = time.monotonic()
        self.replays = ReplayFilter()
        self.joins: dict[str, _PledgeSide] = {}
        self.by_index: dict[int, _PledgeSide] = {}
        self._wanted: dict[str, JoinInterface] = {}
        self.registrar: RegistrarEndpoint | None = None
        self.upstream: asyncio.DatagramTransport | None = None
        self._rotator: asyncio.Task[None] | None = None
        self._jrc_source: tuple[str, int] | None = None
        self._next_mid = int.from_bytes(os.urandom(2), "big")
        self._warned_reset = False
        self.datagrams = {"upstream": 0, "downstream": 0}
        self._say = RefusalSayer(ctx.log, self.name)
        ctx.metrics.add_mode(self.name)
        self._bytes_up = ctx.metrics.relayed_bytes.labels(self.name, "upstream")
        self._bytes_down = ctx.metrics.relayed_bytes.labels(self.name, "downstream")
        self._datagrams_up = ctx.metrics.relayed_datagrams.labels(self.name, "upstream")
        self._datagrams_down = ctx.metrics.relayed_datagrams.labels(self.name, "downstream")

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        self.registrar = registrar
        self._jrc_source = None if registrar is None or registrar.cojp_port is None \
            else (str(IPv6Address(registrar.address.split("%")[0])), registrar.cojp_port)
        desired = {iface.name: iface for iface in interfaces}
        self._wanted = desired
        self.forget_listener_failures(desired)
        for name, side in list(self.joins.items()):
            if desired.get(name) != side.iface:
                self._unlisten(name)
        if desired and self.upstream is None:
            await self._open_upstream()
        for name, iface in desired.items():
            if name not in self.joins:
                await self._listen(iface)
        if self._rotator is None:
            self._rotator = asyncio.create_task(self._rotate(), name="cojp-key-rotation")

    async def _open_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = _marked_socket()
        except OSError as exc:
            self.ctx.log.warning("cojp: cannot open the JRC-side socket: %s", exc,
                                 extra={"MODE": self.name})
            return
        try:
            _grow_receive_buffer(sock)
            sock.bind(("::", 0))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(lambda: _JrcSide(self),
                                                               sock=sock)
        except OSError as exc:
            sock.close()
            self.ctx.log.warning("cojp: cannot open the JRC-side socket: %s", exc,
                                 extra={"MODE": self.name})
            return
        self.upstream = transport
        self.ctx.log.info("cojp proxy sends to the JRC from [::]:%d", sock.getsockname()[1],
                          extra={"MODE": self.name})

    async def _listen(self, iface: JoinInterface) -> None:
        book = self.ctx.listener_book()
        where = f"udp [{iface.scoped_link_local}]:{iface.port}"
        if not book.due(iface.name, self.name, where):
            return
        loop = asyncio.get_running_loop()
        try:
            sock = _marked_socket()
        except OSError as exc:
            book.failed(iface.name, self.name, where, exc)
            return
        try:
            # The CoRE join-port responder (discovery/coap_join.py) holds [::]:5683 with
            # SO_REUSEPORT while a jpy or coaps link is served; this socket, on the link's own
            # address and interface, can then bind beside it and gets that link's unicast.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((iface.link_local, iface.port, 0, iface.index))
            sock.setblocking(False)
            _, protocol = await loop.create_datagram_endpoint(
                lambda: _PledgeSide(self, iface), sock=sock)
        except OSError as exc:
            sock.close()
            book.failed(iface.name, self.name, where, exc)
            return
        book.bound(iface.name, self.name)
        self.joins[iface.name] = protocol
        self.by_index[iface.index] = protocol
        self.ctx.log.info("cojp proxy listening on udp [%s]:%d", iface.scoped_link_local,
                          iface.port, extra={"INTERFACE": iface.name, "MODE": self.name})

    def _unlisten(self, name: str) -> None:
        side = self.joins.pop(name)
        if self.by_index.get(side.iface.index) is side:
            del self.by_index[side.iface.index]
        if side.transport is not None:
            side.transport.close()
        self.ctx.log.info("cojp proxy stopped listening on %s", name,
                          extra={"INTERFACE": name, "MODE": self.name})

    def unserved(self) -> dict[str, str]:
        book = self.ctx.listener_book()
        if self.upstream is None and self._wanted:
            return {name: "no JRC-side socket" for name in self._wanted}
        registrar = self.registrar
        if registrar is not None and registrar.cojp_port is None:
            return {name: f"registrar {registrar.key} has no cojp_port (JRC)"
                    for name in self._wanted}
        return {name: book.describe(name, self.name) or "not listening"
                for name in self._wanted if name not in self.joins}

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(KEY_ROTATION_SECONDS)
            self.rotate_key()

    def rotate_key(self) -> None:
        self.sealer.rotate(os.urandom(32))
        self.key_started = time.monotonic()
        self.ctx.log.info("cojp token key rotated (key id %d)", self.sealer.key_id,
                          extra={"MODE": self.name})

    async def close(self, drain_seconds: float) -> None:
        book = self.ctx.listener_book()
        for name in self._wanted:
            book.forget(name, self.name)
        self._wanted = {}
        for name in list(self.joins):
            self._unlisten(name)
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self._rotator is not None:
            await cancel_and_wait(self._rotator)
            self._rotator = None

    # -- data plane -------------------------------------------------------------------------
    def _refuse(self, reason: DropReason | PolicyDropReason, detail: str,
                interface: str | None = None, pledge: str | None = None,
                jrc: str | None = None, who: str | None = None) -> None:
        """Count, keep a pledge's refusal for `joinproxyctl refusals`, and log once per
        sender and reason (journal fields PLEDGE, or REGISTRAR for what came from the JRC's
        side; forged datagrams come at line rate and the counter says how many)."""
        self.ctx.metrics.drop(self.name, reason)
        if pledge is not None and interface is not None:
            self.ctx.refusals.add(pledge, reason.value, interface, self.name)
        self._say(jrc or who or pledge or "?", reason.value, interface,
                  f"cojp dropped ({reason.value}): {detail}",
                  "REGISTRAR" if jrc is not None else "PLEDGE")

    def _mid(self) -> int:
        self._next_mid = (self._next_mid + 1) & 0xFFFF
        return self._next_mid

    def from_pledge(self, side: _PledgeSide, data: bytes, addr: tuple[Any, ...]) -> None:
        iface = side.iface
        host = str(addr[0]).split("%")[0]
        pledge = f"{host}%{iface.name}"
        if not self.ctx.join_window():
            self._refuse(PolicyDropReason.WINDOW_CLOSED, f"pledge {pledge}", iface.name, pledge)
            return
        registrar = self.registrar
        if registrar is None or registrar.cojp_port is None or self.upstream is None:
            self._refuse(DropReason.NO_REGISTRAR, f"pledge {pledge}: no JRC (cojp_port)",
                         iface.name, pledge)
            return
        try:
            request = CoapDatagram.decode(data)
        except DecodeError as exc:
            self._refuse(DropReason.MALFORMED, f"pledge {pledge}: {exc}", iface.name, pledge)
            return
        # RFC 9031 pledges send Proxy-Scheme "coap"; a request without it that names the host
        # 6tisch.arpa (aiocoap's client through --proxy) asks this endpoint for that virtual
        # host (RFC 7252 §5.10.1), which it serves by relaying too.
        if not is_request(request.code) or request.mtype not in (MessageType.CON,
                                                                 MessageType.NON) \
                or request.option(OptionNumber.PROXY_SCHEME) not in ([], [PROXY_SCHEME]) \
                or request.option(OptionNumber.URI_HOST) != [JOIN_HOST] \
                or request.option(OptionNumber.PROXY_URI):
            self._refuse(DropReason.IRRELEVANT, f"pledge {pledge}: not a CoJP join request "
                         "(Proxy-Scheme coap, Uri-Host 6tisch.arpa)", iface.name, pledge)
            return
        # Only what would be forwarded spends the link's join rate.
        settings = self.ctx.cojp()
        # Rate 0 is RFC 9031's "no join traffic at all", not even a first burst.
        if settings.rate == 0 or not side.bucket.take(time.monotonic(), settings.rate,
                                                      settings.burst):
            self._refuse(DropReason.RATE_LIMIT, f"pledge {pledge}: over the join rate of "
                         f"{settings.rate:g}/s on {iface.name}", iface.name, pledge)
            return
        try:
            packed = socket.inet_pton(socket.AF_INET6, host)
            endpoint = PledgeEndpoint(IPv6Address(packed), addr[1], iface.index)
            token = self.sealer.seal(TokenState(endpoint, request.message_id, request.token,
                                                request.mtype is MessageType.CON),
                                     int(time.monotonic()))
        except (ValueError, UsageError, ValidationError) as exc:
            self._refuse(DropReason.MALFORMED, f"pledge {pledge}: {exc}", iface.name, pledge)
            return
        forwarded = CoapDatagram(MessageType.NON, request.code, self._mid(), token,
                                 request.without(OptionNumber.PROXY_SCHEME,
                                                 OptionNumber.URI_HOST),
                                 request.payload).encode()
        if len(forwarded) > MAX_FORWARDED:
            self._refuse(PolicyDropReason.TOO_BIG, f"pledge {pledge}: {len(forwarded)} bytes "
                         f"with the sealed token, more than {MAX_FORWARDED}", iface.name, pledge)
            return
        try:
            self.upstream.sendto(forwarded, (registrar.address, registrar.cojp_port, 0,
                                             registrar.scope_id))
        except OSError as exc:
            self._refuse(DropReason.SEND_ERROR, f"pledge {pledge}: to the JRC: {exc}",
                         iface.name, who=pledge)
            return
        self.datagrams["upstream"] += 1
        self._datagrams_up.inc()
        self._bytes_up.inc(len(data))

    def from_jrc(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source = str(addr[0]).split("%")[0]
        who = f"[{source}]:{addr[1]}"
        if self._jrc_source is None or (source, addr[1]) != self._jrc_source:
            self._refuse(DropReason.UNSOLICITED, f"datagram from {who}, not the JRC", jrc=who)
            return
        # Only the header and token are read: the options and payload go to the pledge as they
        # came (the pledge's CoAP and OSCORE judge them), which is also the cheap way.
        try:
            token, _ = read_token(data)
        except DecodeError as exc:
            self._refuse(DropReason.MALFORMED, f"from the JRC: {exc}", jrc=who)
            return
        mtype, code = MessageType((data[0] >> 4) & 3), data[1]
        if mtype is MessageType.RST and not self._warned_reset:
            # Likely a misconfiguration, not an attack: say so once (the counter goes on).
            self._warned_reset = True
            self.ctx.log.warning("cojp: the JRC [%s]:%d answers forwarded join requests with "
                                 "RST: does it accept RFC 8974 extended tokens (RFC 9031 "
                                 "§7.1)? libcoap 4.3.1 and stock aiocoap 0.4.17 do not",
                                 source, addr[1], extra={"MODE": self.name})
        if data[0] >> 6 != 1 or not is_response(code) or mtype is MessageType.RST:
            # An empty ACK or RST (e.g. a JRC without extended tokens RSTs ours), a request.
            self._refuse(DropReason.IRRELEVANT, f"from the JRC: code {code >> 5}."
                         f"{code & 31:02d}, type {mtype.name}", jrc=who)
            return
        try:
            state = self.sealer.open(token, int(time.monotonic()))
        except (DecodeError, SignatureError) as exc:
            self._refuse(PolicyDropReason.COJP_FORGED, f"response token: {exc}", jrc=who)
            return
        except ValidationError as exc:
            self._refuse(PolicyDropReason.COJP_STALE, f"response token: {exc}", jrc=who)
            return
        if self.replays.seen(data, time.monotonic()):
            self._refuse(PolicyDropReason.COJP_REPLAYED, "response already relayed", jrc=who)
            return
        if mtype is MessageType.CON and self.upstream is not None:
            # Acknowledge a separate CON response (RFC 7252 §4.2) with its own ID: no state.
            self.upstream.sendto(CoapDatagram(MessageType.ACK, 0, int.from_bytes(data[2:4],
                                                                                "big")
                                              ).encode(), addr)
        side = self.by_index.get(state.pledge.ifindex)
        if side is None or side.transport is None:
            self._refuse(DropReason.UNSOLICITED, f"response for interface "
                         f"{state.pledge.ifindex}, which is not served", jrc=who)
            return
        if state.confirmable:
            kind, mid = MessageType.ACK, state.message_id  # piggybacked on the pledge's CON
        else:
            kind, mid = MessageType.NON, self._mid()
        answer = retokened(data, kind, mid, state.token)
        host = socket.inet_ntop(socket.AF_INET6, state.pledge.address.packed)
        try:
            side.transport.sendto(answer, (host, state.pledge.port, 0, state.pledge.ifindex))
        except OSError as exc:
            self._refuse(DropReason.SEND_ERROR, f"to pledge [{host}]:{state.pledge.port}: {exc}",
                         side.iface.name, who=f"{host}%{side.iface.name}")
            return
        self.datagrams["downstream"] += 1
        self._datagrams_down.inc()
        self._bytes_down.inc(len(answer))

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        registrar = self.registrar
        port = None
        if self.upstream is not None:
            port = self.upstream.get_extra_info("sockname")[1]
        settings = self.ctx.cojp()
        return {
            "listeners": [{"interface": name, "address": side.iface.link_local,
                           "port": side.iface.port, "protocol": "udp"}
                          for name, side in sorted(self.joins.items())],
            "jrc": (f"[{registrar.address}]:{registrar.cojp_port}"
                    if registrar is not None and registrar.cojp_port else None),
            "source_port": port,
            "key_id": self.sealer.key_id,
            "key_age_seconds": round(time.monotonic() - self.key_started),
            "join_rate": {"rate": settings.rate, "burst": settings.burst},
            "datagrams": dict(self.datagrams),
            "replay_filter": len(self.replays),
        }
