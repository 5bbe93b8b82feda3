"""The ``[ipip]`` table of the registrar's configuration: terminating the stateless IPIP join
proxy (BRSKI drafts App. C; RFC 8995 §4.3 locator ``[O_IPv6_LOCATOR, fe80::1234, 41, nil]``).

    [ipip]
    enabled = false               # also turned on by `brski-registrar --ipip`
    protocols = [41]              # outer protocols accepted: 41 (IPv6-in-IPv6, RFC 2473, what
                                  # the drafts specify) and/or 98 (ENCAP, RFC 1241); each is
                                  # announced as its own GRASP locator, replies use the
                                  # protocol the proxy used
    link_local = "fe80::b:2"      # the registrar's link-local address on every proxy's join
                                  # link: inner packets must be addressed to it, each proxy's
                                  # TUN device gets it (/64, nodad), the GRASP IPIP locator
                                  # names it. Default: the first link-local address of the
                                  # first [announce] interface
    address = "fd4a:5044::100"    # outer address proxies encapsulate to (and the GRASP
                                  # initiator). Default: unbound (any local address; replies
                                  # leave from the address the proxy used), and the GRASP
                                  # initiator is the TCP locator address
    proxies = ["fd4a:5044::1"]    # allowed proxies: addresses or prefixes ("fd4a:5044::/64").
                                  # Empty: any proxy (up to max_proxies); an allowlist is
                                  # recommended, as outer source addresses are easy to forge
    max_proxies = 64              # at most this many per-proxy TUN devices at once
    ifname_prefix = "ipip-"       # TUN devices are named <prefix><n> (n = 0, 1, ...)
    mtu = 1460                    # TUN MTU: the backbone MTU minus the 40-byte outer header, so
                                  # encapsulated replies are never fragmented
    idle_timeout = 3600.0         # seconds without a packet from a proxy before its TUN device
                                  # (and the connections on it) is removed; 0: never
    stats_period = 60.0           # seconds between "ipip: stats {...}" log lines (only when a
                                  # counter changed); 0: only at stop

Requirement checked here: the registrar must listen on the IPv6 wildcard (``[::]:port``).
Pledge connections arrive on TUN devices created at run time, so no per-interface listen
address can exist at start; a socket bound to ``::`` (IPV6_V6ONLY, as aiohttp/asyncio set it)
accepts a link-local destination on any interface and keeps the interface as the peer's scope.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network

from .tomlconfig import ListenAddress, Table

PROTO_IPV6 = 41  # IPv6-in-IPv6 (RFC 2473), what the BRSKI drafts and an ip6tnl peer use
PROTO_ENCAP = 98  # ENCAP (RFC 1241), offered because the enrollment roadmap names it
PROTOCOLS = (PROTO_IPV6, PROTO_ENCAP)
IFNAMSIZ = 16  # including the terminating NUL
MAX_PROXIES = 4096


@dataclass(frozen=True)
class IpipConfig:
    enabled: bool = False
    protocols: tuple[int, ...] = (PROTO_IPV6,)
    link_local: IPv6Address | None = None
    address: IPv6Address | None = None
    proxies: tuple[IPv6Network, ...] = ()
    max_proxies: int = 64
    ifname_prefix: str = "ipip-"
    mtu: int = 1460
    idle_timeout: float = 3600.0
    stats_period: float = 60.0

    def allows(self, proxy: IPv6Address) -> bool:
        return not self.proxies or any(proxy in net for net in self.proxies)


def load_ipip_config(root: Table, listen: list[ListenAddress], *,
                     force: bool = False) -> IpipConfig:
    """Read ``[ipip]`` (every key is checked even when disabled, so a typo is never silent).
    ``force``: the ``--ipip`` command-line switch."""
    table = root.table("ipip")
    enabled = bool(table.boolean("enabled", False)) or force
    protocols = _protocols(table)
    link_local = _address(table, "link_local")
    if link_local is not None and not link_local.is_link_local:
        raise table.error("link_local", f"{link_local} is not a link-local (fe80::/10) address")
    address = _address(table, "address")
    if address is not None and (address.is_link_local or address.is_multicast
                                or address.is_unspecified or address.is_loopback):
        raise table.error("address", f"{address} cannot be reached by proxies: give the "
                                     "registrar's routable backbone address")
    proxies = tuple(table.each("proxies", table.strings("proxies", []), _network))
    max_proxies = table.integer("max_proxies", 64, minimum=1, maximum=MAX_PROXIES)
    prefix = table.string("ifname_prefix", "ipip-")
    if len(prefix) > IFNAMSIZ - 1 - len(str(MAX_PROXIES - 1)) or "/" in prefix \
            or any(c.isspace() for c in prefix):
        raise table.error("ifname_prefix", f"{prefix!r}: at most 11 characters, no '/' or "
                                           "spaces (interface names have 15)")
    mtu = table.integer("mtu", 1460, minimum=1280, maximum=65535)  # 1280: IPv6 minimum
    idle = table.number("idle_timeout", 3600.0, minimum=0, maximum=30 * 86400)
    stats = table.number("stats_period", 60.0, minimum=0, maximum=86400)
    table.finish()
    if enabled and not any(a.host == "::" for a in listen):
        raise root.error("server.listen", 'IPIP needs a wildcard IPv6 listen address such as '
                         '"[::]:8443": pledge connections arrive on TUN devices created at run '
                         "time")
    return IpipConfig(enabled=enabled, protocols=protocols, link_local=link_local,
                      address=address, proxies=proxies, max_proxies=max_proxies,
                      ifname_prefix=prefix, mtu=mtu, idle_timeout=idle, stats_period=stats)


def _protocols(table: Table) -> tuple[int, ...]:
    # Table has no list-of-integers getter; _get checks the array type and marks the key used.
    values = table._get("protocols", [PROTO_IPV6], (list,), "a list of protocol numbers")
    if not values:
        raise table.error("protocols", "needs at least one of 41, 98")
    out: list[int] = []
    for i, value in enumerate(values):
        if type(value) is not int or value not in PROTOCOLS:
            raise table.error(f"protocols[{i}]", f"{value!r} is not 41 (IPv6-in-IPv6) or 98 "
                                                 "(ENCAP)")
        if value in out:
            raise table.error(f"protocols[{i}]", f"{value} is listed twice")
        out.append(value)
    return tuple(out)


def _address(table: Table, name: str) -> IPv6Address | None:
    text = table.string(name)
    if text is None:
        return None
    try:
        return IPv6Address(text)
    except ValueError as exc:
        raise table.error(name, f"not an IPv6 address ({exc})") from exc


def _network(text: str) -> IPv6Network:
    try:
        return ipaddress.IPv6Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"not an IPv6 address or prefix ({exc})") from exc
