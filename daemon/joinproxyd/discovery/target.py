"""What an announcement on one join link says, whichever method carries it (GRASP, mDNS)."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import JoinInterface


@dataclass(frozen=True)
class AnnounceTarget:
    name: str
    index: int
    link_local: str
    port: int
    addresses: tuple[str, ...]  # where pledges should connect: GRASP locators, AAAA records

    @classmethod
    def of(cls, iface: JoinInterface) -> AnnounceTarget:
        link_local = iface.link_local.split("%")[0]
        return cls(iface.name, iface.index, link_local, iface.port,
                   iface.announce or (link_local,))
