"""Plain data shared by the control plane and its parts: links, registrars, drop reasons.

Nothing here does I/O. The control plane derives the desired state from these values and
hands it to the relay modes and announcers, which reconcile the kernel and their sockets.
"""

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum


class DropReason(StrEnum):
    """Why something a pledge or peer sent was refused. Each member has its own counter
    (joinproxyd_drops_total{mode,reason}), exported even at zero."""

    NO_REGISTRAR = "no-registrar"
    RATE_LIMIT = "rate-limit"
    LIMIT_TOTAL = "limit-total"
    LIMIT_INTERFACE = "limit-interface"
    LIMIT_PLEDGE = "limit-pledge"
    REGISTRAR_UNREACHABLE = "registrar-unreachable"
    IDLE_TIMEOUT = "idle-timeout"
    LIFETIME = "lifetime"
    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    BAD_HEADER = "bad-header"
    TABLE_FULL = "table-full"
    IRRELEVANT = "irrelevant"  # well-formed, but not for us (another GRASP objective, ...)
    SEND_ERROR = "send-error"  # the kernel refused to send (link down, address gone, ...)
    NOT_TO_REGISTRAR = "not-to-registrar"  # nat66: forwarded traffic that is not enrollment
    UNSOLICITED = "unsolicited"  # nat66: traffic towards a join link nobody asked for
    SHUTDOWN = "shutdown"
    RESOURCES = "resources"  # the proxy itself ran out (open files, buffers, memory)


class PolicyDropReason(StrEnum):
    """Refusals only the control plane decides, counted in the same family as DropReason.
    Apart because DropReason is mirrored index for index by the BPF counters' layout
    (ebpf/joinproxy.h jp_drop_reason), which these never reach."""

    WINDOW_CLOSED = "window-closed"  # the operator closed the join window (joinproxyctl)
    OPERATOR = "operator"  # an established circuit the operator dropped (joinproxyctl drop)
    FLOW_LIMIT = "flow-limit"  # coaps: the pledge address or join link has its flows already
    # jpy (relays/jpy.py): a reply whose sealed header does not open, or whose bytes were
    # already relayed, or whose key was retired; a pledge datagram too big once wrapped.
    JPY_FORGED = "jpy-forged"
    JPY_REPLAYED = "jpy-replayed"
    JPY_STALE = "jpy-stale"
    TOO_BIG = "too-big"
    # cojp (relays/cojp.py): a JRC response whose token state does not open, whose key was
    # retired or whose lifetime is over, or whose bytes were already relayed.
    COJP_FORGED = "cojp-forged"
    COJP_STALE = "cojp-stale"
    COJP_REPLAYED = "cojp-replayed"


@dataclass(frozen=True)
class LinkState:
    """What the kernel says about one network interface."""

    name: str
    index: int
    up: bool  # administratively up with carrier
    link_local: tuple[str, ...] = ()  # usable (non-tentative) fe80:: addresses
    routable: tuple[str, ...] = ()  # usable ULA/global IPv6 addresses

    @property
    def ready(self) -> bool:
        """A join or backbone link is usable once it is up and has a link-local address."""
        return self.up and bool(self.link_local)


@dataclass(frozen=True)
class JoinInterface:
    """A join link the control plane serves, with the relay modes configured for it."""

    name: str
    index: int
    link_local: str
    routable: tuple[str, ...]
    modes: tuple[str, ...]
    port: int  # the join port announced to pledges
    # Where pledges should connect, in order: the link-local address for modes that serve
    # link-local pledges (circuit), a routable one for modes that need it (nat66).
    announce: tuple[str, ...] = ()

    @property
    def scoped_link_local(self) -> str:
        return f"{self.link_local}%{self.name}"


@dataclass(frozen=True)
class IpipTarget:
    """How a registrar takes pledge traffic from a stateless IPIP proxy (protocols.md §7):
    what its GRASP flood says next to its TCP locator, or what the configuration says."""

    link_local: str  # the IPIP locator: pledges connect to it, the proxy answers ND for it
    address: str  # where the proxy encapsulates to: the flood's initiator (backbone/ACP)
    protocols: tuple[int, ...] = (41,)  # outer next headers it accepts: 41 and/or 98
    ports: tuple[int, ...] = ()  # TCP/UDP ports relayed: its other locators' ports


@dataclass(frozen=True, order=True)
class RegistrarEndpoint:
    """A registrar the proxy may relay to, however it was learned."""

    preference: int  # lower is preferred; sort key first
    address: str
    port: int
    source: str = field(default="static", compare=False)  # static | grasp | mdns
    scope_id: int = field(default=0, compare=False)  # ifindex, for a link-local address
    protocol: int = field(default=6, compare=False)  # IPPROTO_TCP
    # Set when the registrar also terminates the stateless IPIP proxy (ipip mode).
    ipip: IpipTarget | None = field(default=None, compare=False)
    # The registrar's UDP ports for constrained pledges (cBRSKI over DTLS): its CoAPS port
    # (coaps mode, rt=brski / BRSKI_JP) and its JPY port (jpy mode, rt=brski.rjp / BRSKI_RJP).
    coaps_port: int | None = field(default=None, compare=False)
    jpy_port: int | None = field(default=None, compare=False)
    # Its JRC's CoAP port (cojp mode, RFC 9031), from static configuration.
    cojp_port: int | None = field(default=None, compare=False)

    @property
    def coaps_sockaddr(self) -> tuple[str, int, int, int] | None:
        if self.coaps_port is None:
            return None
        return (self.address, self.coaps_port, 0, self.scope_id)

    @property
    def key(self) -> str:
        return f"[{self.address}]:{self.port}"

    @property
    def sockaddr(self) -> tuple[str, int, int, int]:
        return (self.address, self.port, 0, self.scope_id)

    @property
    def is_link_local(self) -> bool:
        return ipaddress.IPv6Address(self.address.split("%")[0]).is_link_local
