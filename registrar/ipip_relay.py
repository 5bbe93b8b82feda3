"""The IPIP relay's core: the proxy table and both directions, I/O injected (no loop, no
sockets), so every rule can be tested without root. ``registrar.ipip`` runs it on the loop and
documents the protocol contract with proxies.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Any, Protocol

from .ipip_config import IpipConfig
from .ipip_packet import Drop, check_inbound, check_outbound, outer_source_ok

log = logging.getLogger("registrar.ipip")

IFNAME_MAX = 15


class TunPort(Protocol):
    """What the relay needs of a proxy's TUN device (a fake in unit tests)."""

    name: str
    index: int

    def write(self, packet: bytes) -> None: ...

    def close(self) -> None: ...


# open_tun(name, proxy) -> an up device holding the announced link-local address
OpenTun = Callable[[str, IPv6Address], TunPort]
# send(protocol, inner packet, proxy, outer source or None)
Send = Callable[[int, bytes, IPv6Address, IPv6Address | None], None]


@dataclass
class Tunnel:
    proxy: IPv6Address
    port: TunPort
    protocol: int  # of the proxy's latest packet: replies use the same one
    local: IPv6Address | None  # the outer destination it used: replies come from there
    last_seen: float  # of the proxy's latest valid packet (replies do not keep it alive)
    packets_in: int = 0
    packets_out: int = 0


def _name_in_use(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class IpipRelay:
    """The proxy table and both directions of the relay, with injected I/O (sans-loop)."""

    def __init__(self, config: IpipConfig, link_local: IPv6Address, *, open_tun: OpenTun,
                 send: Send, clock: Callable[[], float] = time.monotonic,
                 name_in_use: Callable[[str], bool] = _name_in_use) -> None:
        self.config = config
        self.link_local = link_local
        self.tunnels: dict[IPv6Address, Tunnel] = {}
        self._indexes: set[int] = set()  # of our TUN devices, checked on every packet
        self.drops: Counter[Drop] = Counter()
        self.packets_in = self.packets_out = self.bytes_in = self.bytes_out = 0
        self.tunnels_opened = self.tunnels_closed = 0
        self._open_tun = open_tun
        self._send = send
        self._clock = clock
        self._name_in_use = name_in_use

    # -- proxy → pledge's registrar --------------------------------------------------------
    def from_proxy(self, packet: bytes, proxy: IPv6Address, *, protocol: int,
                   local: IPv6Address | None = None, ifindex: int = 0) -> Drop | None:
        """An encapsulated packet (outer header already removed) from ``proxy``."""
        if not outer_source_ok(proxy) or self._is_ours(ifindex):
            # From one of our own TUN devices: a nested encapsulation that slipped past
            # check_inbound (behind inner extension headers). Never treat it as a proxy.
            return self._drop(Drop.BAD_OUTER_SOURCE, proxy)
        if not self.config.allows(proxy):
            return self._drop(Drop.NOT_ALLOWED, proxy)
        reason = check_inbound(packet, self.link_local)
        if reason is not None:
            return self._drop(reason, proxy)
        tunnel = self.tunnels.get(proxy)
        if tunnel is None:
            opened = self._open(proxy, protocol, local)
            if isinstance(opened, Drop):
                return opened
            tunnel = opened
        tunnel.protocol, tunnel.local, tunnel.last_seen = protocol, local, self._clock()
        try:
            tunnel.port.write(packet)
        except OSError as exc:
            return self._drop(Drop.TUN_ERROR, proxy, f"writing {tunnel.port.name}: {exc}")
        tunnel.packets_in += 1
        self.packets_in += 1
        self.bytes_in += len(packet)
        return None

    def _is_ours(self, ifindex: int) -> bool:
        return ifindex in self._indexes

    def _open(self, proxy: IPv6Address, protocol: int,
              local: IPv6Address | None) -> Tunnel | Drop:
        if len(self.tunnels) >= self.config.max_proxies:
            return self._drop(Drop.TOO_MANY_PROXIES, proxy)
        try:
            port = self._open_tun(self._free_name(), proxy)
        except OSError as exc:
            return self._drop(Drop.TUN_ERROR, proxy, f"cannot create its TUN device: {exc}")
        tunnel = Tunnel(proxy, port, protocol, local, self._clock())
        self.tunnels[proxy] = tunnel
        self._indexes.add(port.index)
        self.tunnels_opened += 1
        log.info("ipip: proxy %s (protocol %d) → %s (ifindex %d) with %s", proxy, protocol,
                 port.name, port.index, self.link_local)
        return tunnel

    def _free_name(self) -> str:
        prefix = self.config.ifname_prefix
        taken = {t.port.name for t in self.tunnels.values()}
        for n in range(min(10 ** (IFNAME_MAX - len(prefix)), 100_000)):
            name = f"{prefix}{n}"
            if name not in taken and not self._name_in_use(name):
                return name
        raise OSError(errno.ENFILE, f"no free interface name {prefix}<n>")

    # -- registrar → proxy -----------------------------------------------------------------
    def from_tun(self, proxy: IPv6Address, packet: bytes) -> Drop | None:
        """A packet the kernel routed into ``proxy``'s TUN device."""
        tunnel = self.tunnels.get(proxy)
        if tunnel is None:  # closed while the packet was queued
            return None
        reason = check_outbound(packet, self.link_local)
        if reason is not None:
            return self._drop(reason, proxy)
        try:
            self._send(tunnel.protocol, packet, proxy, tunnel.local)
        except OSError as exc:
            return self._drop(Drop.SEND_ERROR, proxy, str(exc))
        tunnel.packets_out += 1
        self.packets_out += 1
        self.bytes_out += len(packet)
        return None

    # -- life cycle ------------------------------------------------------------------------
    def expire(self) -> list[IPv6Address]:
        """Remove the TUN devices of proxies silent for ``idle_timeout`` (0: never)."""
        idle = self.config.idle_timeout
        if idle <= 0:
            return []
        now = self._clock()
        gone = [p for p, t in self.tunnels.items() if now - t.last_seen >= idle]
        for proxy in gone:
            self.close_tunnel(proxy, f"idle for {idle:g} s")
        return gone

    def close_tunnel(self, proxy: IPv6Address, why: str) -> None:
        tunnel = self.tunnels.pop(proxy, None)
        if tunnel is None:
            return
        self._indexes.discard(tunnel.port.index)
        tunnel.port.close()
        self.tunnels_closed += 1
        log.info("ipip: proxy %s: %s removed (%s)", proxy, tunnel.port.name, why)

    def close_all(self) -> None:
        for proxy in list(self.tunnels):
            self.close_tunnel(proxy, "stopping")

    def status(self) -> dict[str, Any]:
        return {
            "in": self.packets_in, "out": self.packets_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "drops": {str(reason): n for reason, n in sorted(self.drops.items())},
            "tunnels_opened": self.tunnels_opened, "tunnels_closed": self.tunnels_closed,
            "proxies": {str(p): {"interface": t.port.name, "protocol": t.protocol,
                                 "in": t.packets_in, "out": t.packets_out}
                        for p, t in self.tunnels.items()},
        }

    # -- counting --------------------------------------------------------------------------
    def _drop(self, reason: Drop, proxy: IPv6Address, detail: str = "") -> Drop:
        self.drops[reason] += 1
        # The first drop of each kind is worth a line; the rest only count (a flood of junk
        # must not become a flood of log lines).
        level = logging.INFO if self.drops[reason] == 1 else logging.DEBUG
        log.log(level, "ipip: dropped a packet from %s: %s%s%s", proxy, reason,
                ": " if detail else "", detail)
        return reason
