"""Registrar discovery by GRASP (RFC 8995 §4.3): listen for AN_join_registrar floods.

Registrars flood ``["AN_join_registrar", 4, 255, "EST-TLS"]`` with O_IPv6_LOCATOR options to
ff02::13 UDP 7017. Every TCP locator becomes a RegistrarEndpoint offered for the flood's ttl;
the next flood refreshes it. A registrar that terminates the stateless IPIP proxy adds
``[O_IPv6_LOCATOR, <its link-local>, 41 (or 98), nil]``; its TCP endpoints then carry an
IpipTarget: that link-local address, the flood's initiator as the address to encapsulate to
(BRSKI drafts App. C), the protocols, and the ports of its TCP/UDP locators as the ports to
relay. Only the backbone is listened to: a flood heard on a join link
would let a pledge name its own "registrar".

The socket is bound to ``[ff02::13%backbone]:7017``. Binding to a link-scoped multicast address
makes the kernel bind the socket to that interface too, so a flood arriving on any other
interface, or any unicast datagram to port 7017, never reaches it; no ancillary data needs
checking. SO_REUSEADDR and SO_REUSEPORT let it share port 7017 with another GRASP stack on the
router. (Our own announcer sends from an ephemeral port and never binds 7017, see announce.py.)

Everything a peer sends is untrusted: oversized, undecodable and irrelevant datagrams are
counted (``joinproxyd_drops_total{mode="discovery"}``) and dropped, with a rate-limited warning.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import Final

from brski import grasp as wire
from brski.errors import DecodeError

from ..metrics import Metrics
from ..model import DropReason, IpipTarget, RegistrarEndpoint
from .peerlog import PeerWarnings
from .registry import DISCOVERED_PREFERENCE

SOURCE: Final = "grasp"
IPIP_PROTOCOLS: Final = (41, 98)  # IPv6-in-IPv6 (RFC 2473), ENCAP (RFC 1241)
MAX_IPIP_PORTS: Final = 4  # what the data plane can match per join link


class Refused(Exception):
    """A datagram we do not use, and the drop reason it is counted under."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def usable_address(address: ipaddress.IPv6Address) -> bool:
    """Could a registrar be there? A peer must not point the proxy at itself (loopback),
    at nowhere (::), at a group, or smuggle an IPv4 destination in (mapped addresses)."""
    return not (address.is_loopback or address.is_unspecified or address.is_multicast
                or address.ipv4_mapped is not None)


def registrars_in_flood(data: bytes, ifindex: int) -> tuple[list[RegistrarEndpoint], float]:
    """The registrars a GRASP datagram announces and for how many seconds, or Refused.

    Pure: the adapter below and the unit tests feed it bytes. Link-local locators are only
    meaningful on the link the flood came from, so they get that link's ifindex as scope.
    """
    return tcp_registrars(decode_flood(data), ifindex)


def decode_flood(data: bytes) -> wire.Flood:
    """The M_FLOOD in a GRASP datagram, or Refused."""
    if len(data) > wire.GRASP_MAX_SIZE:
        raise Refused(DropReason.OVERSIZED,
                      f"{len(data)} bytes, more than GRASP's {wire.GRASP_MAX_SIZE}")
    try:
        return wire.Flood.decode(data)
    except DecodeError as exc:
        # Also other GRASP message types (M_DISCOVERY and friends): we only listen to floods.
        raise Refused(DropReason.MALFORMED, str(exc)) from None


def tcp_registrars(flood: wire.Flood, ifindex: int) -> tuple[list[RegistrarEndpoint], float]:
    """The TCP registrars of a decoded flood and its ttl in seconds, or Refused."""
    locators = flood.locators_for(wire.AN_JOIN_REGISTRAR)
    ipip = ipip_target(locators, flood.initiator)
    endpoints: list[RegistrarEndpoint] = []
    # A UDP locator at the same address is the registrar's CoAPS port (objective value
    # "BRSKI_JP"): the coaps relay mode's target. The endpoint stays keyed on TCP.
    udp_ports = {loc.address: loc.port for loc in reversed(locators)
                 if loc.protocol == wire.IPPROTO_UDP and loc.port}
    for locator in locators:
        if locator.protocol != wire.IPPROTO_TCP or not locator.port:
            continue  # RFC 8995 §4.3: TCP is the one transport a BRSKI proxy relays
        if not usable_address(locator.address):
            continue
        scope = ifindex if locator.address.is_link_local else 0
        endpoint = RegistrarEndpoint(DISCOVERED_PREFERENCE, locator.address.compressed,
                                     locator.port, source=SOURCE, scope_id=scope, ipip=ipip,
                                     coaps_port=udp_ports.get(locator.address))
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    if not endpoints:
        # Well-formed but not for us: another objective, or no usable TCP locator.
        raise Refused(DropReason.IRRELEVANT, "no AN_join_registrar flood with a usable TCP "
                                            "locator")
    return endpoints, flood.ttl_ms / 1000.0


def ipip_target(locators: list[wire.IPv6Locator],
                initiator: ipaddress.IPv6Address) -> IpipTarget | None:
    """The IPIP offer in a registrar's locators, or None.

    The IPIP locator's address must be link-local (it is what pledges on a join link reach
    through the proxy's ND answers), and the initiator routable (a link-local outer address
    would only exist on the backbone link, and a proxy must not be pointed at itself). The
    relayed ports are those of the flood's TCP and UDP locators (protocols.md §7: "MAY
    restrict forwarded traffic to protocols 6/17 and the ports in the other locators").
    """
    offers = [loc for loc in locators if loc.protocol in IPIP_PROTOCOLS
              and loc.address.is_link_local]
    if not offers or initiator.is_link_local or not usable_address(initiator):
        return None
    link_local = offers[0].address  # one announced address per registrar
    protocols = sorted({loc.protocol for loc in offers if loc.address == link_local})
    ports = list(dict.fromkeys(loc.port for loc in locators
                               if loc.protocol in (wire.IPPROTO_TCP, wire.IPPROTO_UDP)
                               and loc.port))
    if not ports:
        return None  # nothing the proxy could restrict the relay to
    return IpipTarget(link_local.compressed, initiator.compressed, tuple(protocols),
                      tuple(ports[:MAX_IPIP_PORTS]))


def open_listener_socket(ifindex: int) -> socket.socket:
    """UDP [ff02::13%ifindex]:7017, joined to the group on that interface only."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        group = str(wire.ALL_GRASP_NEIGHBORS)
        sock.bind((group, wire.GRASP_PORT, 0, ifindex))
        mreq = wire.ALL_GRASP_NEIGHBORS.packed + struct.pack("@I", ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, listener: GraspRegistrarListener) -> None:
        self.listener = listener

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.listener.received(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        self.listener.log.debug("GRASP listener socket error: %s", exc)


class GraspRegistrarListener:
    def __init__(self, *, interface: str, ifindex: int,
                 on_registrar: Callable[[RegistrarEndpoint, float], None],
                 metrics: Metrics, log: logging.Logger,
                 on_flood: Callable[[wire.Flood, int], int] | None = None) -> None:
        """``on_flood(flood, ifindex)``: sees every flood first and returns how many of its
        (constrained, UDP) endpoints it took, so a flood with only those is not refused."""
        self.interface = interface
        self.ifindex = ifindex
        self.on_registrar = on_registrar
        self.on_flood = on_flood
        self.metrics = metrics
        self.log = log
        self._warnings = PeerWarnings(log)
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Open the socket; an OSError (no such interface, say) is the caller's to handle."""
        if self._transport is not None:
            return
        sock = open_listener_socket(self.ifindex)
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.log.info("listening for GRASP registrar floods on %s", self.interface,
                      extra={"INTERFACE": self.interface})

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
            await asyncio.sleep(0)  # let the transport's close callback run now

    def received(self, data: bytes, sender: str) -> None:
        try:
            flood = decode_flood(data)
            taken = self._constrained(flood)
            try:
                endpoints, ttl = tcp_registrars(flood, self.ifindex)
            except Refused as refused:
                if not taken or refused.reason is not DropReason.IRRELEVANT:
                    raise
                endpoints, ttl = [], flood.ttl_ms / 1000.0
        except Refused as refused:
            self.metrics.drop("discovery", refused.reason)
            self._warnings.warn(refused.reason.value, "GRASP datagram from %s on %s dropped "
                                "(%s): %s", sender, self.interface, refused.reason.value,
                                refused)
            return
        self.metrics.discovery_messages.labels(SOURCE).inc()
        for endpoint in endpoints:
            self.log.debug("GRASP: registrar %s from %s, ttl %g s", endpoint.key, sender, ttl)
            try:
                self.on_registrar(endpoint, ttl)
            except Exception:  # our bug, not the peer's: say so, and keep listening
                self.log.exception("registrar handler failed for %s", endpoint.key)

    def _constrained(self, flood: wire.Flood) -> int:
        if self.on_flood is None:
            return 0
        try:
            return self.on_flood(flood, self.ifindex)
        except Exception:  # our bug, not the peer's: say so, and keep listening
            self.log.exception("constrained registrar handler failed")
            return 0
