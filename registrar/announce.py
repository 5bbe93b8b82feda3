"""How proxies and pledges find the registrar: GRASP flood and mDNS (RFC 8995 §4.3, App. B).

* GRASP: every ``grasp_period`` seconds (and once at start) an M_FLOOD
  ``["AN_join_registrar", 4, 255, "EST-TLS"]`` with ``[O_IPv6_LOCATOR, address, 6, port]`` goes
  to ff02::13 UDP 7017 on each configured interface, from the interface's link-local address
  (GRASP's DULL instance is link-local). Encoded by ``brski.grasp``.
* mDNS: ``<instance>._brski-registrar._tcp.local.`` with the port and the announced addresses,
  answered by python-zeroconf on the configured interfaces only.

With ``[announce] coaps_port`` set (the registrar's CoAPS/DTLS port for cBRSKI), the flood also
carries ``[O_IPv6_LOCATOR, address, 17, coaps_port]`` under ``["AN_join_registrar", 4, 255,
"BRSKI_JP"]`` (``brski.grasp.registrar_flood``; with ``[jpy] listen``, its port likewise under
``"BRSKI_RJP"``), mDNS also has
``<instance>._brski-registrar._udp.local.`` with that port, and ``registrar.coap_discovery``
answers ``GET coap://[ff05::fd]/.well-known/core?rt=brski`` (and on ff02::fd).

With the JRC on (``[cojp] enabled``), the flood also carries ``[O_IPv6_LOCATOR, address, 17,
<JRC port>]`` under ``["AN_join_registrar", 4, 255, "6TiSCH-JRC"]``: a value of this project's
own (``brski.grasp.REGISTRAR_VALUE_COJP``), since neither RFC 9031 nor the BRSKI drafts name a
GRASP objective for a JRC. No DNS-SD service name is registered for a JRC or for CoJP either,
so none is announced over mDNS (a proxy learns the JRC from GRASP or its configuration).

The locator address, per interface: ``[announce] address`` if set; else a listen address on
that interface (by zone or by address); else the interface's first global/ULA address; else its
link-local one.

With ``[ipip]`` on, the flood also carries ``[O_IPv6_LOCATOR, <ipip link-local>, 41, nil]``
(and/or 98), as in RFC 8995 §4.3, and its initiator is the address IPIP proxies encapsulate
to (BRSKI drafts App. C): ``[ipip] address``, else the TCP locator address. Without IPIP the
initiator stays the interface's link-local address (DULL GRASP).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from brski import grasp

from .coap_discovery import CoapDiscovery
from .config import RegistrarConfig

log = logging.getLogger(__name__)

SERVICE_TYPE = "_brski-registrar._tcp.local."
UDP_SERVICE_TYPE = "_brski-registrar._udp.local."  # cBRSKI (brski-discovery; not IANA's yet)
GRASP_OBJECTIVE_VALUE = "EST-TLS"
MIN_RECOMMENDED_PERIOD = 60.0  # RFC 8995 §4.3: SHOULD NOT be below 60 s


@dataclass(frozen=True)
class InterfaceAddresses:
    name: str
    index: int
    link_local: list[ipaddress.IPv6Address]
    global_v6: list[ipaddress.IPv6Address]
    ipv4: list[ipaddress.IPv4Address]


def interface_addresses(name: str) -> InterfaceAddresses:
    index = socket.if_nametoindex(name)
    link_local: list[ipaddress.IPv6Address] = []
    global_v6: list[ipaddress.IPv6Address] = []
    ipv4: list[ipaddress.IPv4Address] = []
    for adapter in ifaddr.get_adapters():
        if adapter.name != name:
            continue
        for ip in adapter.ips:
            if isinstance(ip.ip, tuple):
                addr6 = ipaddress.IPv6Address(ip.ip[0].split("%", 1)[0])
                (link_local if addr6.is_link_local else global_v6).append(addr6)
            else:
                ipv4.append(ipaddress.IPv4Address(ip.ip))
    return InterfaceAddresses(name, index, link_local, global_v6, ipv4)


def locator_address(config: RegistrarConfig, iface: InterfaceAddresses) -> ipaddress.IPv6Address:
    if config.announce_address is not None:
        return config.announce_address
    for listen in config.listen:
        if not listen.is_ipv6:
            continue
        addr = ipaddress.IPv6Address(listen.host.split("%", 1)[0])
        if listen.interface == iface.name or addr in iface.global_v6:
            return addr
    if iface.global_v6:
        return iface.global_v6[0]
    if iface.link_local:
        return iface.link_local[0]
    raise OSError(f"interface {iface.name} has no IPv6 address to announce")


def _listens_on(config: RegistrarConfig, address: ipaddress.IPv6Address) -> bool:
    for listen in config.listen:
        if not listen.is_ipv6 or listen.port != config.announce_port:
            continue
        host = ipaddress.IPv6Address(listen.host.split("%", 1)[0])
        if host in (address, ipaddress.IPv6Address("::")):
            return True
    return False


class GraspFlooder:
    """Periodic AN_join_registrar floods on one interface."""

    def __init__(self, iface: InterfaceAddresses, locator: ipaddress.IPv6Address, port: int,
                 period: float, *, extra_locators: tuple[grasp.IPv6Locator, ...] = (),
                 initiator: ipaddress.IPv6Address | None = None,
                 udp_port: int | None = None, jpy_port: int | None = None,
                 cojp_port: int | None = None) -> None:
        if not iface.link_local:
            raise OSError(f"interface {iface.name} has no link-local address for GRASP")
        self.iface = iface
        self.initiator = initiator or iface.link_local[0]
        self.locator = grasp.IPv6Locator(locator, grasp.IPPROTO_TCP, port)
        udp = (() if udp_port is None
               else (grasp.IPv6Locator(locator, grasp.IPPROTO_UDP, udp_port),))
        self.locators = (self.locator, *udp, *extra_locators)
        self.jpy_locators = (() if jpy_port is None
                             else (grasp.IPv6Locator(locator, grasp.IPPROTO_UDP, jpy_port),))
        self.cojp_locators = (() if cojp_port is None
                              else (grasp.IPv6Locator(locator, grasp.IPPROTO_UDP, cojp_port),))
        self.period = period
        self.sent = 0
        self._sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, iface.index)
        self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        # From the link-local address: what DULL GRASP expects (and, without IPIP, the
        # flood's initiator).
        self._sock.bind((str(iface.link_local[0]), 0, 0, iface.index))
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def message(self) -> bytes:
        flood = grasp.registrar_flood(os.urandom, self.initiator, list(self.locators),
                                      value=GRASP_OBJECTIVE_VALUE,  # UDP: BRSKI_JP
                                      jpy_locators=self.jpy_locators,  # BRSKI_RJP
                                      cojp_locators=self.cojp_locators)  # 6TiSCH-JRC
        return flood.encode()

    def send_once(self) -> None:
        try:
            self._sock.sendto(self.message(), (str(grasp.ALL_GRASP_NEIGHBORS), grasp.GRASP_PORT,
                                               0, self.iface.index))
        except OSError as exc:
            if not self._failing:  # log the change, not every period
                log.warning("GRASP flood on %s failed: %s", self.iface.name, exc)
            self._failing = True
            return
        if self._failing:
            log.info("GRASP flood on %s works again", self.iface.name)
        self._failing = False
        self.sent += 1

    async def _run(self) -> None:
        while True:
            self.send_once()
            await asyncio.sleep(self.period)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close()


class Announcer:
    """Everything the registrar announces, started once its listeners are bound."""

    def __init__(self, config: RegistrarConfig, *,
                 ipip_link_local: ipaddress.IPv6Address | None = None,
                 refused: Callable[[str, str], None] | None = None) -> None:
        self.config = config
        self.refused = refused  # the refusal metric, for datagrams CoAP discovery drops
        self.ipip_link_local = ipip_link_local  # set when [ipip] is on (resolved address)
        self.flooders: list[GraspFlooder] = []
        self._zeroconf: AsyncZeroconf | None = None
        self._infos: list[ServiceInfo] = []
        self.coap: CoapDiscovery | None = None
        # The JRC's bound UDP port (set by the caller once it listens): flooded for cojp proxies.
        self.cojp_port: int | None = None

    async def start(self) -> None:
        cfg = self.config
        if not cfg.announce_interfaces:
            return
        ifaces = [interface_addresses(name) for name in cfg.announce_interfaces]
        locators = {i.name: locator_address(cfg, i) for i in ifaces}
        for name, address in locators.items():
            if not _listens_on(cfg, address):
                log.warning("announcing [%s]:%d on %s, but no listen address covers it",
                            address, cfg.announce_port, name)
        jpy_port = cfg.jpy_listen[1] if cfg.jpy_listen else None
        if cfg.grasp:
            if cfg.grasp_period < MIN_RECOMMENDED_PERIOD:
                log.warning("grasp_period %.3g s is below the %d s RFC 8995 §4.3 recommends",
                            cfg.grasp_period, MIN_RECOMMENDED_PERIOD)
            for iface in ifaces:
                locator = locators[iface.name]
                extra, initiator = self._ipip_announcement(locator)
                flooder = GraspFlooder(iface, locator, cfg.announce_port, cfg.grasp_period,
                                       extra_locators=extra, initiator=initiator,
                                       udp_port=cfg.announce_coaps_port, jpy_port=jpy_port,
                                       cojp_port=self.cojp_port)
                flooder.start()
                self.flooders.append(flooder)
                coaps = ("" if cfg.announce_coaps_port is None
                         else f", UDP (CoAPS) port {cfg.announce_coaps_port}")
                coaps += "" if jpy_port is None else f", UDP (JPY) port {jpy_port}"
                coaps += ("" if self.cojp_port is None
                          else f", UDP (CoJP JRC) port {self.cojp_port}")
                log.info("GRASP: flooding AN_join_registrar on %s every %g s: [%s]:%d%s%s",
                         iface.name, cfg.grasp_period, locator, cfg.announce_port, coaps,
                         "".join(f", IPIP [{x.address}] protocol {x.protocol} to {initiator}"
                                 for x in extra))
        if cfg.announce_coaps_port is not None or jpy_port is not None:  # before mDNS
            self.coap = CoapDiscovery({i.name: (i.index, locators[i.name]) for i in ifaces},
                                      cfg.announce_coaps_port, refused=self.refused,
                                      jpy_port=jpy_port)
            await self.coap.start()
        if cfg.mdns:
            await self._start_mdns(ifaces, locators)

    def _ipip_announcement(self, locator: ipaddress.IPv6Address,
                           ) -> tuple[tuple[grasp.IPv6Locator, ...], ipaddress.IPv6Address | None]:
        """The IPIP locators (none without IPIP) and the initiator to flood with them."""
        ipip = self.config.ipip
        if self.ipip_link_local is None or not ipip.enabled:
            return (), None
        extra = tuple(grasp.IPv6Locator(self.ipip_link_local, protocol, None)
                      for protocol in ipip.protocols)
        initiator = ipip.address or locator
        if initiator.is_link_local:
            log.warning("IPIP: announcing link-local %s as the address to encapsulate to; "
                        "set [ipip] address to the registrar's backbone address", initiator)
        return extra, initiator

    async def _start_mdns(self, ifaces: list[InterfaceAddresses],
                          locators: dict[str, ipaddress.IPv6Address]) -> None:
        cfg = self.config
        listen_v4 = {a.host for a in cfg.listen if not a.is_ipv6}
        v4 = [str(a) for i in ifaces for a in i.ipv4
              if "0.0.0.0" in listen_v4 or str(a) in listen_v4]
        addresses = sorted({str(a) for a in locators.values()}) + v4
        # zeroconf joins IPv6 groups by interface index and IPv4 ones by address.
        choice: list[str | int] = [i.index for i in ifaces] + v4
        self._zeroconf = AsyncZeroconf(interfaces=choice,  # type: ignore[arg-type]
                                       ip_version=IPVersion.All if v4 else IPVersion.V6Only)
        host = cfg.mdns_instance.replace(".", "-")
        services = [(SERVICE_TYPE, cfg.announce_port)]
        if cfg.announce_coaps_port is not None:
            services.append((UDP_SERVICE_TYPE, cfg.announce_coaps_port))
        for service_type, port in services:
            info = ServiceInfo(
                service_type,
                f"{cfg.mdns_instance}.{service_type}",
                port=port,
                parsed_addresses=addresses,
                server=f"{host}.local.",
                properties=b"\x00",  # RFC 6763 §6.1: no TXT data is one empty string, not none
            )
            await self._zeroconf.async_register_service(info)
            self._infos.append(info)
            log.info("mDNS: %s.%s on %s, port %d, addresses %s", cfg.mdns_instance,
                     service_type, ", ".join(cfg.announce_interfaces), port,
                     ", ".join(addresses))

    async def stop(self) -> None:
        for flooder in self.flooders:
            await flooder.stop()
        self.flooders.clear()
        if self.coap is not None:
            await self.coap.stop()
            self.coap = None
        if self._zeroconf is not None:
            with contextlib.suppress(Exception):  # best effort: say goodbye, then close
                for info in self._infos:
                    await self._zeroconf.async_unregister_service(info)
            self._infos.clear()
            await self._zeroconf.async_close()
            self._zeroconf = None
