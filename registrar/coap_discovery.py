"""CoRE discovery of the registrar's CoAPS endpoint, for constrained join proxies (plain CoAP).

A join proxy asks ``GET coap://[ff05::fd]/.well-known/core?rt=brski`` (join-proxy draft §5.4;
on one link also ff02::fd) and relays pledges' DTLS to the address and port in the answer::

    <coaps://[2001:db8::52]/.well-known/brski>;rt=brski     (port omitted: 5684)

A pledge one hop away asks ``?brski-jp=*``; cBRSKI wants a registrar on the pledge's link to
answer as a join proxy would, so the document also holds ``<>;brski-jp=<coaps port>`` (the
port on the address the answer comes from). ``<jpy://[addr]:port>;rt=brski.rjp`` (stateless
JPY, registrar.jpy_endpoint) is offered only while ``[jpy] listen`` is configured.

Served by aiocoap on UDP 5683 (all addresses), joined to ff02::fd and ff05::fd on each announce
interface. The link's address is the announce locator of the interface the request came in on
(``registrar.announce.locator_address``); requests from other interfaces get no link. Queries
filter as RFC 6690 §4.1 says (``brski.linkformat.filter_links``); a multicast request that
matches nothing, or fails, gets no answer (RFC 7252 §8.2, RFC 7967); one that matches is
answered after a random delay within a Leisure of 0.5 s (§8.2). Link-format only
(Accept other than 40: 4.06). Datagrams that are not CoAP are dropped by aiocoap; they are
counted here (``brski_registrar_refusals_total{endpoint="coap-discovery",
reason="unparsable"}``) and the first one is logged (aiocoap would log every one).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
from collections.abc import Callable, Mapping

import aiocoap
from aiocoap import resource
from aiocoap.numbers.contentformat import ContentFormat

from brski import linkformat

log = logging.getLogger(__name__)

COAP_PORT = 5683
ALL_COAP_NODES = ("ff02::fd", "ff05::fd")  # link-local and site-local (RFC 7252 §12.8)
_PKTINFO = struct.Struct("16sI")  # struct in6_pktinfo (RFC 3542)
# RFC 7967 No-Response bits: suppress 2.xx (2), 4.xx (8) and 5.xx (16).
_SUPPRESS_ALL = 2 | 8 | 16
REFUSAL_ENDPOINT = "coap-discovery"
# RFC 7252 §8.2: answer a multicast request at a random point within a Leisure period, so
# many responders do not answer at once. Its §8.2.1 estimate (S * G / R) is far below the
# 5 s default for the one or two registrars of a domain; 0.5 s keeps discovery quick.
DEFAULT_LEISURE = 0.5


class UnparsableCounter(logging.Filter):
    """Counts aiocoap's "Ignoring unparsable message" records and lets only the first through:
    a flood of garbage must not become a flood of log lines."""

    def __init__(self, refused: Callable[[str, str], None] | None = None) -> None:
        super().__init__()
        self.count = 0
        self._refused = refused

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Ignoring unparsable message"):
            return True
        self.count += 1
        if self._refused is not None:
            self._refused(REFUSAL_ENDPOINT, "unparsable")
        if self.count == 1:
            record.msg = "CoAP discovery: " + str(record.msg) + " (further ones are counted only)"
        return self.count == 1


def joined_groups(igmp6: str, ifindex: int) -> set[ipaddress.IPv6Address]:
    """The IPv6 multicast groups interface ``ifindex`` has joined, from /proc/net/igmp6
    (``index name group-hex users flags timer`` per line)."""
    groups = set()
    for line in igmp6.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == str(ifindex) and len(fields[2]) == 32:
            groups.add(ipaddress.IPv6Address(bytes.fromhex(fields[2])))
    return groups


def udp_ports_bound(proc_udp6: str) -> set[int]:
    """The local ports of the IPv6 UDP sockets in /proc/net/udp6 (``sl local:port ...``)."""
    ports = set()
    for line in proc_udp6.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2 and ":" in fields[1]:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def request_ifindex(request: aiocoap.Message) -> int:
    """The interface a request came in on (0 if aiocoap kept no packet info)."""
    pktinfo = getattr(request.remote, "pktinfo", None)
    if not pktinfo or len(pktinfo) < _PKTINFO.size:
        return 0
    return int(_PKTINFO.unpack_from(pktinfo)[1])


def _is_multicast(request: aiocoap.Message) -> bool:
    return bool(getattr(request.remote, "is_multicast_locally", False))


class WellKnownCore(resource.Resource):
    """``/.well-known/core`` with the registrar's discovery links, per arrival interface."""

    def __init__(self, locators: Mapping[int, ipaddress.IPv6Address], coaps_port: int | None,
                 leisure: float = DEFAULT_LEISURE, jpy_port: int | None = None) -> None:
        super().__init__()
        self.locators = dict(locators)
        self.coaps_port = coaps_port
        self.jpy_port = jpy_port
        self.leisure = leisure
        self.answered = 0

    def links(self, ifindex: int) -> list[linkformat.DiscoveryLink]:
        address = self.locators.get(ifindex)
        if address is None:
            return []
        links: list[linkformat.DiscoveryLink] = []
        if self.coaps_port is not None:
            links += [linkformat.RegistrarLink(linkformat.RegistrarKind.STATEFUL, address,
                                               self.coaps_port, "/.well-known/brski"),
                      linkformat.JoinPortLink(self.coaps_port)]
        if self.jpy_port is not None:
            links.append(linkformat.RegistrarLink(linkformat.RegistrarKind.STATELESS, address,
                                                  self.jpy_port))
        return links

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        multicast = _is_multicast(request)
        if request.opt.accept not in (None, ContentFormat.LINKFORMAT):
            response = aiocoap.Message(code=aiocoap.NOT_ACCEPTABLE)
        else:
            found = linkformat.filter_links(self.links(request_ifindex(request)),
                                            request.opt.uri_query)
            response = aiocoap.Message(code=aiocoap.CONTENT,
                                       payload=linkformat.format_links(found).encode(),
                                       content_format=ContentFormat.LINKFORMAT)
            if found:
                if multicast and self.leisure > 0:
                    await asyncio.sleep(random.uniform(0, self.leisure))
                self.answered += 1
                log.debug("CoAP discovery: answered %s with %s", request.remote,
                          linkformat.format_links(found))
            elif multicast:
                response.opt.no_response = _SUPPRESS_ALL
        if multicast and not response.code.is_successful():
            response.opt.no_response = _SUPPRESS_ALL
        return response


class CoapDiscovery:
    """The plain-CoAP server that answers discovery on the announce interfaces."""

    def __init__(self, interfaces: Mapping[str, tuple[int, ipaddress.IPv6Address]],
                 coaps_port: int | None, *, port: int = COAP_PORT,
                 refused: Callable[[str, str], None] | None = None,
                 jpy_port: int | None = None) -> None:
        """``interfaces``: name -> (ifindex, locator address); ``refused(endpoint, reason)``
        counts dropped datagrams (the service's refusal metric)."""
        self.interfaces = dict(interfaces)
        self.port = port
        self.wkc = WellKnownCore({i: a for i, a in self.interfaces.values()}, coaps_port,
                                 jpy_port=jpy_port)
        self.unparsable = UnparsableCounter(refused)
        self._context: aiocoap.Context | None = None
        self._logger = logging.getLogger(f"{__name__}.coap")

    async def start(self) -> None:
        site = resource.Site()
        site.add_resource([".well-known", "core"], self.wkc)
        self._logger.addFilter(self.unparsable)
        groups = [(group, name) for name in self.interfaces for group in ALL_COAP_NODES]
        self._context = await aiocoap.Context.create_server_context(
            site, bind=("::", self.port), loggername=self._logger.name, multicast=groups,
            transports=["udp6"])
        # aiocoap only warns when a join fails: say which groups we are in, as the kernel has it.
        igmp6 = _read("/proc/net/igmp6")
        for name, (index, _) in self.interfaces.items():
            joined = joined_groups(igmp6, index)
            missing = [g for g in ALL_COAP_NODES if ipaddress.IPv6Address(g) not in joined]
            if missing:
                log.warning("CoAP discovery: not in group %s on %s: multicast queries there "
                            "go unanswered", " ".join(missing), name)
        log.info("CoAP discovery: answering /.well-known/core?rt=brski on UDP %d, groups %s on "
                 "%s, with coaps port %s, jpy port %s", self.port, " ".join(ALL_COAP_NODES),
                 ", ".join(self.interfaces), self.wkc.coaps_port, self.wkc.jpy_port)
        if self.wkc.coaps_port is not None \
                and self.wkc.coaps_port not in udp_ports_bound(_read("/proc/net/udp6")):
            # As for the HTTPS port: the announcement is made, but the operator hears of it.
            log.warning("CoAP discovery: announcing coaps port %d, but no UDP socket is bound "
                        "to it", self.wkc.coaps_port)

    async def stop(self) -> None:
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
        self._logger.removeFilter(self.unparsable)
