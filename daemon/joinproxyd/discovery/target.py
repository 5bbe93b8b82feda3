"""What an announcement on one join link says, whichever method carries it (GRASP, mDNS)."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import JoinInterface

UDP_MODES = frozenset({"coaps"})  # relay modes that take pledges' datagrams, not connections


@dataclass(frozen=True)
class AnnounceTarget:
    name: str
    index: int
    link_local: str
    port: int
    addresses: tuple[str, ...]  # where pledges should connect: GRASP locators, AAAA records
    # Transports served at the port: 6 (TCP: circuit, nat66, ipip), 17 (UDP: coaps).
    protocols: tuple[int, ...] = (6,)

    @classmethod
    def of(cls, iface: JoinInterface) -> AnnounceTarget:
        link_local = iface.link_local.split("%")[0]
        udp = any(m in UDP_MODES for m in iface.modes)
        tcp = not udp or any(m not in UDP_MODES for m in iface.modes)
        protocols = ((6,) if tcp else ()) + ((17,) if udp else ())
        return cls(iface.name, iface.index, link_local, iface.port,
                   iface.announce or (link_local,), protocols)
