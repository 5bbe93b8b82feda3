"""The ipip relay without BPF: Linux ip6ip6 tunnels configured over netlink, where the kernel
has them (ip6_tunnel: Debian's stock kernels; not this project's CI kernel, platform.md).

Per join link served, towards the active registrar R (one tunnel per link and registrar: the
link's backbone address B_link is the tunnel's local end, which is what sends each reply to
the right link, as in the BPF path):

    tunnel    jpt<ifindex of the join link>: ip6tnl, mode ip6ip6 (protocol 41), local B_link,
              remote R, over the backbone, no encapsulation limit option (a plain 6in6
              header, what the BPF path and the registrar speak)
    up        tc clsact on the join link, u32 filters matching the registrar's link-local
              address and ports (TCP or UDP), action mirred: redirect to the tunnel. Not a
              route: the kernel refuses to forward a packet with a link-local source to
              another link (ip6_forward: "beyond scope"), and mirred sends without
              forwarding, dropping the join link's Ethernet header
    down      an nftables netdev table on the tunnel's ingress: ``fwd ip6 to ip6 daddr
              device <join link>``, which resolves the pledge's link-local address as a
              neighbour on the join link and sends the decapsulated packet there (a route
              cannot: link-local destinations are looked up on the arriving device only;
              mirred cannot: it would send the packet without an Ethernet header). The
              inner hop limit goes down by one on the way
    proxy NDP and the backbone address: as in the BPF path (relays/ipip.py, kernel/ndp.py)

Counters are the tunnel's own statistics: tx packets are pledge packets relayed, rx packets
registrar packets delivered, errors and drops as the tunnel counts them. Protocol 98 (ENCAP)
has no kernel tunnel: it needs the BPF path. Measured on Debian 12's 6.1 kernel under QEMU
(tests/vm/). nftables' plain ``fwd to`` is not used upstream either: 6.1 pushes the Ethernet
header back before sending to the tunnel (fixed in later kernels).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import KernelError, describe_errno
from .nftables import Table

ETH_P_IPV6 = 0x86DD
INGRESS = 0xFFFFFFF2  # clsact's ingress (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS))
CLSACT = 0xFFFF0000
IP6_TNL_F_IGN_ENCAP_LIMIT = 0x1
FILTER_PRIO = 0xA1  # our u32 filters' priority on the join link's ingress
TABLE_PREFIX = "joinproxyd_ipip_"


def tunnel_name(join_index: int) -> str:
    return f"jpt{join_index}"


@dataclass(frozen=True)
class TunnelSpec:
    """One join link relayed through a kernel tunnel."""

    join_name: str
    join_index: int
    backbone_index: int
    local: str  # the link's backbone address (B_link)
    remote: str  # the registrar's backbone address
    registrar_ll: str
    ports: tuple[int, ...]
    protocol: int = 41

    @property
    def name(self) -> str:
        return tunnel_name(self.join_index)


def _ipr() -> Any:
    from pyroute2 import IPRoute  # the daemon's netlink library (kernel/netlink.py)

    return IPRoute()


def _failed(exc: Exception, what: str) -> KernelError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    return KernelError(f"{what}: {describe_errno(code) if code else exc}", errno=code)


def probe() -> str | None:
    """None if this kernel can make an ip6ip6 tunnel, else why not (one line). Makes one and
    removes it at once (nothing else tells: the module may load on demand)."""
    name = f"jpprobe{os.getpid() % 100000}"
    with _ipr() as ipr:
        try:
            # ends of its own (documentation prefix): one without any would be the
            # kernel's fallback device ip6tnl0 (EEXIST)
            ipr.link("add", ifname=name, kind="ip6tnl", ip6tnl_proto=socket.IPPROTO_IPV6,
                     ip6tnl_remote=f"2001:db8::{os.getpid() % 0xFFFF:x}")
        except Exception as exc:  # NetlinkError
            code = getattr(exc, "code", 0)
            if code in (errno.EOPNOTSUPP, errno.ENODEV, errno.ENOENT):
                return f"the kernel has no ip6ip6 tunnels ({describe_errno(code)})"
            return f"cannot make an ip6ip6 tunnel: {_failed(exc, 'ip link add')}"
        with contextlib.suppress(Exception):
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    return None


def _u32_keys(address: str, port: int) -> list[str]:
    """u32 keys (value/mask+offset from the IPv6 header) for: destination address, TCP or
    UDP (checked by the caller's two filters), destination port (no extension headers,
    like the BPF path)."""
    raw = ipaddress.IPv6Address(address).packed
    keys = [f"0x{int.from_bytes(raw[i:i + 4], 'big'):08x}/0xffffffff+{24 + i}"
            for i in range(0, 16, 4)]
    keys.append(f"0x{port:08x}/0x0000ffff+40")
    return keys


def _proto_key(proto: int) -> str:
    return f"0x{proto << 8:08x}/0x0000ff00+4"


def _del_filters(ipr: Any, join_index: int) -> None:
    """Our u32 filters on the join link's ingress: the whole priority (handle 0); none there
    (or no clsact, or the link gone) is not an error."""
    with contextlib.suppress(Exception):
        ipr.tc("del-filter", "u32", join_index, parent=INGRESS, prio=FILTER_PRIO,
               protocol=ETH_P_IPV6, target=0)


def apply(spec: TunnelSpec) -> None:
    """Make the kernel relay spec's join link through its tunnel (idempotent: a tunnel with
    other ends is replaced)."""
    if spec.protocol != socket.IPPROTO_IPV6:
        raise KernelError(f"ipip protocol {spec.protocol} has no kernel tunnel (only 41): "
                          "use ipip.datapath = \"bpf\"", errno=errno.EPROTONOSUPPORT)
    with _ipr() as ipr:
        try:
            existing = ipr.link_lookup(ifname=spec.name)
            if existing:
                (link,) = ipr.get_links(existing[0])
                info = dict(link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")["attrs"])
                # (an "any" tunnel, proto 0, as an older version made, is replaced too)
                if (info.get("IFLA_IP6TNL_LOCAL"), info.get("IFLA_IP6TNL_REMOTE"),
                        info.get("IFLA_IP6TNL_PROTO")) != (spec.local, spec.remote,
                                                          socket.IPPROTO_IPV6):
                    ipr.link("del", index=existing[0])
                    existing = []
            if not existing:
                ipr.link("add", ifname=spec.name, kind="ip6tnl",
                         # ip6ip6 only: "any" (no proto) would take IPv4 inside too
                         ip6tnl_proto=socket.IPPROTO_IPV6, ip6tnl_local=spec.local,
                         ip6tnl_remote=spec.remote, ip6tnl_link=spec.backbone_index,
                         ip6tnl_flags=IP6_TNL_F_IGN_ENCAP_LIMIT, ip6tnl_ttl=64)
            tunnel = ipr.link_lookup(ifname=spec.name)[0]
            ipr.link("set", index=tunnel, state="up")
            # up: the join link's ingress, the registrar's address and ports, to the tunnel
            with contextlib.suppress(Exception):
                ipr.tc("add", "clsact", spec.join_index)
            _del_filters(ipr, spec.join_index)
            action = {"kind": "mirred", "direction": "egress", "action": "redirect",
                      "ifindex": tunnel}
            for port in spec.ports:
                for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                    ipr.tc("add-filter", "u32", spec.join_index, parent=INGRESS,
                           prio=FILTER_PRIO, protocol=ETH_P_IPV6, target=0,
                           keys=[_proto_key(proto), *_u32_keys(spec.registrar_ll, port)],
                           action=[action])
        except KernelError:
            raise
        except Exception as exc:
            raise _failed(exc, f"{spec.name}: configure the ip6ip6 tunnel") from exc
    # down: decapsulated packets to the pledge, as a neighbour on the join link
    Table("netdev", TABLE_PREFIX + spec.name).apply([
        {"chain": {"name": "down", "type": "filter", "hook": "ingress", "dev": spec.name,
                   "prio": 0, "policy": "accept"}},
        {"rule": {"chain": "down", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "protocol"}}, "right": "ip6"}},
            {"counter": None},
            {"fwd": {"dev": spec.join_name, "family": "ip6",
                     "addr": {"payload": {"protocol": "ip6", "field": "daddr"}}}}]}},
    ])


def remove(join_index: int) -> None:
    """Undo apply for a join link: its filters, its nftables table, its tunnel. What is
    already gone is not an error (a link that left took its filters with it)."""
    name = tunnel_name(join_index)
    Table("netdev", TABLE_PREFIX + name).delete()
    with _ipr() as ipr:
        _del_filters(ipr, join_index)
        found = ipr.link_lookup(ifname=name)
        if found:
            try:
                ipr.link("del", index=found[0])
            except Exception as exc:
                raise _failed(exc, f"ip link del {name}") from exc


def ours() -> list[int]:
    """Join ifindexes of the tunnels there are (ours by name: jpt<ifindex>), for removing
    what a killed run left."""
    with _ipr() as ipr:
        out = []
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name.startswith("jpt") and name[3:].isdigit():
                out.append(int(name[3:]))
        return out


def stats(join_indexes: Iterable[int], sysfs: Path = Path("/sys/class/net")) -> dict[str, int]:
    """The tunnels' statistics, summed: relayed (tx), delivered (rx), errors and drops. Read
    from sysfs, not netlink: status asks from the event loop, and this never blocks on it."""
    totals = {key: 0 for key in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes",
                                 "tx_errors", "tx_dropped", "rx_errors", "rx_dropped")}
    for index in join_indexes:
        for key in totals:
            with contextlib.suppress(OSError, ValueError):  # a tunnel gone meanwhile
                totals[key] += int((sysfs / tunnel_name(index) / "statistics" / key)
                                   .read_text())
    return totals


def describe(specs: Sequence[TunnelSpec]) -> list[dict[str, Any]]:
    return [{"tunnel": s.name, "join": s.join_name, "local": s.local, "remote": s.remote}
            for s in specs]
