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
  exactly these bytes were already relayed lately (stateless.ReplayFilter); unsolicited: not
  from the JRC's address and port, or for a join link no longer served.

Keys: a fresh random key at start, rotated every KEY_ROTATION_SECONDS with the previous one still
opening. A restart loses both: responses in flight are dropped (cojp-stale) and the pledge's
retransmission, sealed anew, carries on.
"""

from __future__ import annotations

import os
import socket
import time
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

from ..limits import TokenBucket
from ..model import DropReason, JoinInterface, PolicyDropReason
from .base import RelayContext
from .stateless import PledgeSide, StatelessDatagramMode, pledge_endpoint

KEY_ROTATION_SECONDS = 24 * 3600.0
TOKEN_LIFETIME = 60  # seconds a forwarded request's token opens (brski.cojp_token)
MAX_FORWARDED = 1280 - 40 - 8  # what surely reaches the JRC: the IPv6 minimum MTU
AF43 = 38 << 2  # RFC 2597 AF43 as an IPv6 traffic class (DSCP in the upper six bits)
PROXY_SCHEME = b"coap"
JOIN_HOST = b"6tisch.arpa"
DEFAULT_JRC_PORT = 5683


class _PledgeSide(PledgeSide):
    """A join link's socket with the link's join rate."""

    def __init__(self, mode: StatelessDatagramMode, iface: JoinInterface,
                 sock: socket.socket) -> None:
        super().__init__(mode, iface, sock)
        self.bucket = TokenBucket(float(mode.ctx.cojp().burst), time.monotonic())


class CojpMode(StatelessDatagramMode):
    name = "cojp"
    # Pledges learn of a CoJP proxy from 6TiSCH beacons or configuration, not from GRASP/mDNS
    # announcements of a TCP port (announcing one would lure BRSKI pledges to nothing).
    serves_link_local = False
    # The control plane hands this mode the JRC that answers the CoAP ping (daemon.mode_target)
    registrar_port = "cojp_port"
    upstream_side = "JRC-side"
    upstream_peer = "the JRC"
    no_port = "has no cojp_port (JRC)"
    side_class = _PledgeSide

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        # A random first key id: tokens of an earlier run name a key this run lacks.
        self.sealer = TokenSealer(os.urandom(32), os.urandom(1)[0], lifetime=TOKEN_LIFETIME)
        self._next_mid = int.from_bytes(os.urandom(2), "big")
        self._warned_reset = False

    # -- sockets ----------------------------------------------------------------------------
    def new_socket(self) -> socket.socket:
        # Both sockets mark what they send AF43, as RFC 9031 asks of a join proxy.
        sock = super().new_socket()
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, AF43)
        except OSError:
            sock.close()
            raise
        return sock

    def prepare_join_socket(self, sock: socket.socket) -> None:
        # The CoRE join-port responder (discovery/coap_join.py) holds [::]:5683 with
        # SO_REUSEPORT while a jpy or coaps link is served; this socket, on the link's own
        # address and interface, can then bind beside it and gets that link's unicast.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    # -- keys -------------------------------------------------------------------------------
    @property
    def key_rotation(self) -> float:
        return KEY_ROTATION_SECONDS

    def rotate_key(self) -> None:
        self.sealer.rotate(os.urandom(32))
        self.key_started = time.monotonic()
        self.ctx.log.info("cojp token key rotated (key id %d)", self.sealer.key_id,
                          extra={"MODE": self.name})

    # -- data plane -------------------------------------------------------------------------
    def _mid(self) -> int:
        self._next_mid = (self._next_mid + 1) & 0xFFFF
        return self._next_mid

    def from_pledge(self, side: _PledgeSide, data: bytes,  # type: ignore[override]
                    addr: tuple[Any, ...]) -> None:
        admitted = self._admit(side, addr, "no JRC (cojp_port)")
        if admitted is None:
            return
        pledge, port = admitted
        iface = side.iface
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
            token = self.sealer.seal(TokenState(pledge_endpoint(iface, addr),
                                                request.message_id, request.token,
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
        self._send_upstream(side, pledge, port, forwarded, len(data), "to the JRC")

    def from_registrar(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """A datagram from the JRC's side."""
        who = self._upstream_sender(addr, "datagram from {who}, not the JRC")
        if who is None:
            return
        # Only the header and token are read: the options and payload go to the pledge as they
        # came (the pledge's CoAP and OSCORE judge them), which is also the cheap way.
        try:
            token, _ = read_token(data)
        except DecodeError as exc:
            self._refuse_upstream(DropReason.MALFORMED, f"from the JRC: {exc}", who)
            return
        mtype, code = MessageType((data[0] >> 4) & 3), data[1]
        if mtype is MessageType.RST and not self._warned_reset:
            # Likely a misconfiguration, not an attack: say so once (the counter goes on).
            self._warned_reset = True
            self.ctx.log.warning("cojp: the JRC [%s]:%d answers forwarded join requests with "
                                 "RST: does it accept RFC 8974 extended tokens (RFC 9031 "
                                 "§7.1)? libcoap 4.3.1 and stock aiocoap 0.4.17 do not",
                                 str(addr[0]).split("%")[0], addr[1], extra={"MODE": self.name})
        if data[0] >> 6 != 1 or not is_response(code) or mtype is MessageType.RST:
            # An empty ACK or RST (e.g. a JRC without extended tokens RSTs ours), a request.
            self._refuse_upstream(DropReason.IRRELEVANT, f"from the JRC: code {code >> 5}."
                                  f"{code & 31:02d}, type {mtype.name}", who)
            return
        try:
            state = self.sealer.open(token, int(time.monotonic()))
        except (DecodeError, SignatureError) as exc:
            self._refuse_upstream(PolicyDropReason.COJP_FORGED, f"response token: {exc}", who)
            return
        except ValidationError as exc:
            self._refuse_upstream(PolicyDropReason.COJP_STALE, f"response token: {exc}", who)
            return
        if self.replays.seen(data, time.monotonic()):
            self._refuse_upstream(PolicyDropReason.COJP_REPLAYED, "response already relayed",
                                  who)
            return
        if mtype is MessageType.CON and self.upstream is not None:
            # Acknowledge a separate CON response (RFC 7252 §4.2) with its own ID: no state.
            self.upstream.sendto(CoapDatagram(MessageType.ACK, 0, int.from_bytes(data[2:4],
                                                                                "big")
                                              ).encode(), addr)
        side = self._serving(state.pledge.ifindex, who,
                             "response for interface {ifindex}, which is not served")
        if side is None:
            return
        if state.confirmable:
            kind, mid = MessageType.ACK, state.message_id  # piggybacked on the pledge's CON
        else:
            kind, mid = MessageType.NON, self._mid()
        self._send_down(side, state.pledge, retokened(data, kind, mid, state.token),
                        "to pledge {to}: {exc}")

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        settings = self.ctx.cojp()
        return {**super().status(), "jrc": self.peer(),
                "join_rate": {"rate": settings.rate, "burst": settings.burst}}
