"""The registrar's end of the stateless IPIP join proxy (BRSKI drafts App. C, protocols.md §7).

A stateless proxy forwards its pledges' link-local packets to the registrar inside IPv6 and
keeps no state: all per-connection state lives here. This kernel has no ip6tnl device, so the
tunnel is terminated in user space, on the registrar's asyncio loop:

    proxy P ──IPv6/41 (or 98)──▶ raw socket ─ check ─▶ TUN "ipip-<n>" of P ─▶ kernel TCP/TLS
    proxy P ◀──IPv6/41 (or 98)── raw socket ◀─ check ─ TUN "ipip-<n>" of P ◀─ kernel replies

Each proxy gets its own TUN device, created on its first valid packet, because each proxy's
join link is its own fe80::/10 scope: pledge fe80::1:1 behind proxy A and fe80::1:1 behind
proxy B are different peers, told apart by the interface (scope id) the kernel gives their
connections. The device holds the registrar's announced link-local address, so the ordinary
TLS listener on ``[::]:port`` accepts the pledge's connection with the pledge's own
link-local address (``fe80::1:1%ipip-0``) as the peer, and the kernel routes the replies back
into the same device, from where they are encapsulated to the proxy.

How a proxy must encapsulate (the contract with joinproxyd's IPIP mode):

* outer IPv6 header: source = the proxy's backbone address (in ``[ipip] proxies``), destination
  = the registrar's IPIP address: the ``initiator`` of its ``AN_join_registrar`` GRASP flood
  (``[ipip] address`` when set), next header 41 (or 98 when the flood has a 98 locator).
  Outer extension headers are fine (the kernel strips them before the raw socket).
* inner packet: the pledge's packet unchanged: source its link-local address, destination the
  address of the flood's ``[O_IPv6_LOCATOR, <link-local>, 41, nil]`` locator, which the proxy
  answers Neighbor Discovery for on its join link; no checksum changes are needed.
* replies: outer source = the address the proxy sent to, destination = the proxy, same
  protocol as the proxy's latest packet; inner = the registrar's TCP/UDP/ICMPv6 packet from
  the announced link-local address to the pledge. The proxy decapsulates and emits it on the
  join link; a proxy with several join links needs one backbone address per join link (the
  registrar tells proxies apart by outer address only: each such address gets its own TUN
  device, i.e. its own scope, and must be allowed, e.g. by a prefix in ``[ipip] proxies``).
* MTU: the TUN MTU is ``[ipip] mtu`` (backbone MTU − 40): the registrar's TCP segments and the
  MSS it announces (MTU − 60, 1400 by default) keep both directions within the backbone MTU
  once encapsulated. UDP and ICMPv6 get no such help.

Everything is counted by reason (``registrar.ipip_packet.Drop``) and logged as one JSON
``ipip: stats {...}`` line per ``stats_period`` when something changed, and at stop.
"""


from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from ipaddress import IPv6Address, IPv6Network
from typing import Any

from .announce import interface_addresses
from .config import RegistrarConfig
from .ipip_config import IpipConfig
from .ipip_icmp import KernelIcmpFilter
from .ipip_relay import IpipRelay
from .ipip_tun import MAX_PACKET, TunDevice
from .tomlconfig import ConfigError

__all__ = ["IpipService", "resolve_link_local"]

log = logging.getLogger(__name__)

BATCH = 64  # packets handled per readiness callback, so one busy fd cannot starve the loop
_PKTINFO = struct.Struct("@16sI")  # struct in6_pktinfo { struct in6_addr; unsigned ifindex; }
_PKTINFO_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
RCVBUF = 1 << 20  # room for a burst of handshakes from many proxies


def resolve_link_local(config: RegistrarConfig) -> IPv6Address:
    """``[ipip] link_local``, else the first link-local address of the first announce
    interface (what the GRASP flood then names); ConfigError if neither exists."""
    if config.ipip.link_local is not None:
        return config.ipip.link_local
    if not config.announce_interfaces:
        raise ConfigError("ipip.link_local: missing: it has no default when "
                          "announce.interfaces is empty")
    name = config.announce_interfaces[0]
    try:
        found = interface_addresses(name).link_local
    except OSError as exc:
        raise ConfigError(f"ipip.link_local: missing, and {name}: {exc}") from exc
    if not found:
        raise ConfigError(f"ipip.link_local: missing, and {name} has no link-local address "
                          "to default to")
    return found[0]


def _net(network: IPv6Network) -> str:
    return str(network.network_address) if network.prefixlen == 128 else str(network)


def _pktinfo(ancdata: list[tuple[int, int, bytes]]) -> tuple[IPv6Address | None, int]:
    """The outer destination address and arrival interface, from IPV6_PKTINFO."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO \
                and len(data) >= _PKTINFO.size:
            raw, ifindex = _PKTINFO.unpack_from(data)
            return IPv6Address(raw), ifindex
    return None, 0


class _WatchedTun:
    """A proxy's TUN device whose fd the loop watches for replies while it is open."""

    def __init__(self, device: TunDevice, loop: asyncio.AbstractEventLoop,
                 on_readable: Callable[[], None]) -> None:
        self.device = device
        self.name = device.name
        self.index = device.index
        self._loop = loop
        loop.add_reader(device.fd, on_readable)

    def write(self, packet: bytes) -> None:
        self.device.write(packet)

    def close(self) -> None:
        if self.device.fd >= 0:
            self._loop.remove_reader(self.device.fd)
        self.device.close()


class IpipService:
    """Raw sockets for the accepted protocols and a TUN device per proxy, on the running loop.

    ``start`` after the TLS listeners are bound; ``stop`` after they are closed (so the
    connections on the TUN devices can still send their last segments)."""

    def __init__(self, config: IpipConfig, link_local: IPv6Address) -> None:
        self.config = config
        self.link_local = link_local
        self.relay = IpipRelay(config, link_local, open_tun=self._open_tun, send=self._send)
        self._sockets: dict[int, socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_stats = ""
        self.kernel_icmp = KernelIcmpFilter(config.protocols, config.address)

    @classmethod
    def from_config(cls, config: RegistrarConfig) -> IpipService:
        return cls(config.ipip, resolve_link_local(config))

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        try:
            for protocol in self.config.protocols:
                self._sockets[protocol] = self._raw_socket(protocol)
        except OSError:
            self._close_sockets()
            raise
        # before the first packet: the kernel's own answer to it would refuse the pledge
        self.kernel_icmp.install()
        for protocol, sock in self._sockets.items():
            loop.add_reader(sock.fileno(), self._raw_readable, sock, protocol)
        self._task = loop.create_task(self._housekeeping())
        cfg = self.config
        log.info("ipip: accepting protocol %s on %s from %s; pledges reach %s on a TUN device "
                 "per proxy (%s<n>, MTU %d)", "/".join(map(str, cfg.protocols)),
                 cfg.address or "any address",
                 ", ".join(_net(n) for n in cfg.proxies)
                 or f"any proxy (at most {cfg.max_proxies})",
                 self.link_local, cfg.ifname_prefix, cfg.mtu)

    def _raw_socket(self, protocol: int) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, protocol)
        except OSError as exc:
            raise OSError(exc.errno, f"ipip: cannot open a raw socket for protocol {protocol}: "
                                     f"{exc.strerror}") from exc
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            if self.config.address is not None:
                # Receive only what proxies send to this address, and reply from it.
                sock.bind((str(self.config.address), 0))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"ipip: protocol {protocol} socket on "
                                     f"{self.config.address}: {exc.strerror}") from exc
        return sock

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_sockets()
        self.relay.close_all()
        self.log_stats(force=True)
        self.kernel_icmp.remove()

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    def status(self) -> dict[str, Any]:
        return {**self.relay.status(),
                "kernel_icmp_filter": self.kernel_icmp.state,
                "kernel_icmp_dropped": self.kernel_icmp.dropped()}

    def log_stats(self, *, force: bool = False) -> None:
        line = json.dumps(self.status(), sort_keys=True)
        if force or line != self._last_stats:
            log.info("ipip: stats %s", line)
            self._last_stats = line

    async def _housekeeping(self) -> None:
        period = self.config.stats_period
        tick = min(1.0, period) if period > 0 else 1.0
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            self.relay.expire()
            if period > 0 and time.monotonic() - last >= period:
                last = time.monotonic()
                self.log_stats()

    # -- packets ---------------------------------------------------------------------------
    def _raw_readable(self, sock: socket.socket, protocol: int) -> None:
        for _ in range(BATCH):
            try:
                data, ancdata, _flags, addr = sock.recvmsg(MAX_PACKET, _PKTINFO_SPACE)
            except BlockingIOError:
                return
            except OSError as exc:  # nothing a proxy sends should cause this; do not spin
                log.debug("ipip: protocol %d socket: %s", protocol, exc)
                return
            local, ifindex = _pktinfo(ancdata)
            # A link-local source comes as "fe80::1%eth0"; the relay refuses it by address.
            proxy = IPv6Address(addr[0].split("%", 1)[0])
            self.relay.from_proxy(data, proxy, protocol=protocol, local=local, ifindex=ifindex)

    def _open_tun(self, name: str, proxy: IPv6Address) -> _WatchedTun:
        assert self._loop is not None
        device = TunDevice.create(name, self.link_local, mtu=self.config.mtu)
        return _WatchedTun(device, self._loop, lambda: self._tun_readable(device, proxy))

    def _tun_readable(self, device: TunDevice, proxy: IPv6Address) -> None:
        for _ in range(BATCH):
            try:
                packet = device.read()
            except OSError as exc:
                # The device was deleted or broke under us: forget it; the proxy's next
                # packet makes a new one.
                self.relay.close_tunnel(proxy, f"reading {device.name} failed: {exc}")
                return
            if packet is None:
                return
            self.relay.from_tun(proxy, packet)

    def _send(self, protocol: int, packet: bytes, proxy: IPv6Address,
              local: IPv6Address | None) -> None:
        # The raw socket of the proxy's protocol writes the outer header itself. Without a
        # bound address, reply from the address the proxy used (IPV6_PKTINFO), so a proxy
        # sees answers come from where it sends.
        ancillary = []
        if local is not None and self.config.address is None:
            ancillary = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                          _PKTINFO.pack(local.packed, 0))]
        self._sockets[protocol].sendmsg([packet], ancillary, 0, (str(proxy), 0))
