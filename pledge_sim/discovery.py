"""Finding a proxy (or a registrar on the pledge's own link) to talk BRSKI to.

RFC 8995 §4.1: the pledge MUST listen for GRASP M_FLOOD "AN_Proxy" (ff02::13, UDP 7017), and
MAY in parallel browse DNS-SD ``_brski-proxy._tcp.local.`` (App. B). §4 lets a registrar
announce itself for its directly attached links, so the pledge also takes link-local locators
from ``AN_join_registrar`` floods and ``_brski-registrar._tcp`` services; the result says which
method found each address. Messages are decoded by ``brski.grasp`` only; undecodable ones are
counted and dropped, never raised.

A given address (``--registrar [fe80::b:2%eth0]:8443``) skips discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from brski import grasp
from brski.errors import ProtocolError

log = logging.getLogger(__name__)

PROXY_SERVICE = "_brski-proxy._tcp.local."
REGISTRAR_SERVICE = "_brski-registrar._tcp.local."
METHODS = ("grasp", "mdns")
# After the first find, keep listening this long: more proxies may answer (§4.1 says try them
# all), and a pledge that stops at the first one never spreads over several.
GRACE = 0.5


class DiscoveryError(Exception):
    """A bad address was given, or nothing was found in time."""


@dataclass(frozen=True)
class Candidate:
    host: str  # IPv6 address, with %zone when link-local; or a name
    port: int
    method: str  # static, grasp, grasp-registrar, mdns, mdns-registrar, coap (CoRE)

    @property
    def label(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Candidate:
    """``[fe80::b:2%eth0]:8443``, ``[fd00::1]:443``, ``host:8443`` (port required)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise DiscoveryError(f"{text!r}: expected [ipv6%zone]:port")
        port_text = rest[1:]
        address, _, zone = host.partition("%")
        try:
            ip = ipaddress.IPv6Address(address)
        except ValueError as exc:
            raise DiscoveryError(f"{text!r}: {exc}") from exc
        if ip.is_link_local and not zone:
            raise DiscoveryError(f"{text!r}: a link-local address needs its interface, "
                                 "as in [fe80::1%eth0]:8443")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise DiscoveryError(f"{text!r}: expected host:port or [ipv6%zone]:port")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) < 65536:
        raise DiscoveryError(f"{text!r}: port must be 1..65535")
    return Candidate(host, int(port_text), "static")


def candidates_from_flood(data: bytes, ifname: str | None) -> list[Candidate]:
    """The TCP locators of one GRASP datagram. Raises brski's ProtocolError if undecodable."""
    flood = grasp.Flood.decode(data)
    found = []
    for objective, method in ((grasp.AN_PROXY, "grasp"),
                              (grasp.AN_JOIN_REGISTRAR, "grasp-registrar")):
        for loc in flood.locators_for(objective):
            if loc.protocol != grasp.IPPROTO_TCP or loc.port is None:
                continue
            if loc.address.is_link_local:
                if ifname is None:
                    continue  # a link-local address is useless without its link
                host = f"{loc.address}%{ifname}"
            elif method == "grasp-registrar":
                continue  # a pledge has only link-local addresses: only those are reachable
            else:
                host = str(loc.address)
            found.append(Candidate(host, loc.port, method))
    return found


@dataclass
class Found:
    """What discovery collected, in the order found, with counters of what it dropped."""

    candidates: list[Candidate] = field(default_factory=list)
    dropped: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, items: Iterable[Candidate]) -> None:
        for item in items:
            if not any((c.host, c.port) == (item.host, item.port) for c in self.candidates):
                self.candidates.append(item)
                log.info("discovered %s by %s", item.label, item.method)
                self.event.set()


class _GraspProtocol(asyncio.DatagramProtocol):
    def __init__(self, found: Found) -> None:
        self.found = found

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        scope = addr[3] if len(addr) >= 4 else 0
        try:
            ifname = socket.if_indextoname(scope) if scope else None
        except OSError:
            ifname = None
        try:
            self.found.add(candidates_from_flood(data, ifname))
        except ProtocolError as exc:
            self.found.dropped += 1
            log.debug("dropped a GRASP datagram from %s: %s", addr[0], exc)


def _interfaces() -> list[tuple[int, str]]:
    return [(i, name) for i, name in socket.if_nameindex() if name != "lo"]


def grasp_socket(interfaces: list[tuple[int, str]]) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    # Several listeners (pledge-sim processes, a proxy) may share a host: all get the flood.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("::", grasp.GRASP_PORT))
    group = grasp.ALL_GRASP_NEIGHBORS.packed
    for index, _name in interfaces:
        with contextlib.suppress(OSError):  # a link without IPv6 or multicast
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                            group + struct.pack("@I", index))
    sock.setblocking(False)
    return sock


async def _listen_grasp(found: Found, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    sock = grasp_socket(_interfaces())
    transport, _ = await loop.create_datagram_endpoint(lambda: _GraspProtocol(found), sock=sock)
    try:
        await stop.wait()
    finally:
        transport.close()


async def _browse_mdns(found: Found, stop: asyncio.Event) -> None:
    # Imported here: zeroconf is heavy, and most runs use GRASP or a given address.
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    # Only real links: on "lo" a namespace has no multicast route, and zeroconf would log a
    # send error for every query.
    zc = AsyncZeroconf(ip_version=IPVersion.V6Only,
                       interfaces=[index for index, _name in _interfaces()])
    pending: set[asyncio.Task[None]] = set()

    async def resolve(service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zc.zeroconf, 3000) or info.port is None:
            return
        method = "mdns" if service_type == PROXY_SERVICE else "mdns-registrar"
        items = []
        for address in info.parsed_scoped_addresses(IPVersion.V6Only):
            ip_text, _, zone = address.partition("%")
            ip = ipaddress.IPv6Address(ip_text)
            if ip.is_link_local:
                if zone.isdigit():
                    with contextlib.suppress(OSError):
                        zone = socket.if_indextoname(int(zone))
                if not zone:
                    # zeroconf knows the link only for records it saw arrive; a pledge with
                    # one link can still use the address, one with several cannot.
                    links = _interfaces()
                    if len(links) != 1:
                        continue
                    zone = links[0][1]
                items.append(Candidate(f"{ip}%{zone}", info.port, method))
            elif method == "mdns":
                items.append(Candidate(str(ip), info.port, method))
        found.add(items)

    def on_change(zeroconf: object, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Added:
            task = asyncio.ensure_future(resolve(service_type, name))
            pending.add(task)
            task.add_done_callback(pending.discard)

    browser = AsyncServiceBrowser(zc.zeroconf, [PROXY_SERVICE, REGISTRAR_SERVICE],
                                  handlers=[on_change])
    try:
        await stop.wait()
    finally:
        for task in pending:
            task.cancel()
        await browser.async_cancel()
        await zc.async_close()


async def discover(methods: Iterable[str], timeout: float) -> Found:
    """Listen with every method in parallel until something is found (plus a short grace
    period) or ``timeout`` passes. Never raises for network input."""
    wanted = list(methods)
    for method in wanted:
        if method not in METHODS:
            raise DiscoveryError(f"unknown discovery method {method!r} (use {', '.join(METHODS)})")
    found = Found()
    stop = asyncio.Event()
    runners = {"grasp": _listen_grasp, "mdns": _browse_mdns}
    tasks = [asyncio.create_task(runners[m](found, stop)) for m in wanted]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await found.event.wait()
                await asyncio.sleep(GRACE)
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors and not found.candidates:
        raise DiscoveryError(f"discovery failed: {errors[0]}")
    return found
