"""GRASP M_FLOOD messages, the subset of RFC 8990 that BRSKI discovery uses.

RFC 8995 §4.1.1: a join proxy floods ``["AN_Proxy", 4, 1, ""]`` with an O_IPv6_LOCATOR naming its
link-local address and port, to ff02::13 UDP 7017, so pledges can find it. §4.3: a registrar
floods ``["AN_join_registrar", 4, 255, "EST-TLS"]`` with its locators, so proxies can find it.

    flood-message = [M_FLOOD, session-id, initiator, ttl, +[objective, (locator-option / [])]]
    objective     = [objective-name, objective-flags, loop-count, ?objective-value]
    ipv6-locator  = [O_IPv6_LOCATOR, ipv6-address, transport-proto, port-number]

Every other GRASP message type is refused on decode (we only listen to floods). Locator options
other than O_IPv6_LOCATOR are kept as :class:`OtherLocator` so a flood that also carries, say,
an FQDN locator still yields its IPv6 ones. Sans-IO: the session id comes from an injected rng.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Final

import cbor2

from .cbor_strict import loads_exact
from .errors import DecodeError, UsageError

M_FLOOD: Final = 9
O_IPV6_LOCATOR: Final = 103
ALL_GRASP_NEIGHBORS: Final = IPv6Address("ff02::13")
GRASP_PORT: Final = 7017
# RFC 8990 §2.6: GRASP_DEF_MAX_SIZE; a node need not accept anything longer.
GRASP_MAX_SIZE: Final = 2048

# Objective flag bits (RFC 8990 §2.10.2): F_DISC 0, F_NEG 1, F_SYNCH 2, F_NEG_DRY 3.
F_DISC: Final = 1 << 0
F_NEG: Final = 1 << 1
F_SYNCH: Final = 1 << 2
F_NEG_DRY: Final = 1 << 3

IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_IPV6: Final = 41  # the IPIP join proxy locator, RFC 8995 §4.3

AN_PROXY: Final = "AN_Proxy"
AN_JOIN_REGISTRAR: Final = "AN_join_registrar"  # the IANA-registered spelling (RFC 8995 §8.7)
# brski-discovery -06 writes "AN_Join_Registrar"; objective names compare case-sensitively,
# so accept that spelling and turn it into the registered one.
_OBJECTIVE_ALIASES: Final = {"AN_Join_Registrar": AN_JOIN_REGISTRAR}

REGISTRAR_VALUE_TLS: Final = "EST-TLS"  # RFC 8995 §4.3: EST over TLS at a TCP locator
REGISTRAR_VALUE_DTLS: Final = "BRSKI_JP"  # cBRSKI over DTLS at a UDP locator (see below)
# The stateless (JPY) port, as the constrained join-proxy drafts up to -15 registered it.
REGISTRAR_VALUE_JPY: Final = "BRSKI_RJP"
# The registrar's 6TiSCH JRC (RFC 9031 CoJP, CoAP + OSCORE) at a UDP locator. No document
# registers a GRASP objective value for a JRC (RFC 9031 finds it through the 6LBR or label 4 of
# the Configuration): this is joinproxyd's own, local value, chosen so that no BRSKI proxy
# mistakes the CoAP port for a DTLS one.
REGISTRAR_VALUE_COJP: Final = "6TiSCH-JRC"

DEFAULT_TTL_MS: Final = 180_000  # RFC 8995 §4.1.1 and §4.3 examples
PROXY_LOOP_COUNT: Final = 1  # link-local only
REGISTRAR_LOOP_COUNT: Final = 255  # "mandatory maximum"

_UINT32: Final = 0xFFFFFFFF


class _NoValue:
    """Sentinel: the objective has no value element (RFC 8990 makes it optional). Distinct from
    a CBOR null so that decode → encode gives the same bytes."""

    _instance: _NoValue | None = None

    def __new__(cls) -> _NoValue:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Final = _NoValue()


def canonical_objective_name(name: str) -> str:
    return _OBJECTIVE_ALIASES.get(name, name)


def _is_uint(value: object, limit: int) -> bool:
    # bool is an int subclass in Python, and CBOR true must not pass for 1.
    return type(value) is int and 0 <= value <= limit


@dataclass(frozen=True)
class Objective:
    name: str
    flags: int
    loop_count: int
    value: object = NO_VALUE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise UsageError("objective name must be a non-empty string")
        if not _is_uint(self.flags, 0xFF):
            raise UsageError(f"objective flags {self.flags!r} are not 0..255")
        if not _is_uint(self.loop_count, 0xFF):
            raise UsageError(f"loop count {self.loop_count!r} is not 0..255")
        object.__setattr__(self, "name", canonical_objective_name(self.name))

    def to_cbor(self) -> list[object]:
        items: list[object] = [self.name, self.flags, self.loop_count]
        if self.value is not NO_VALUE:
            items.append(self.value)
        return items

    @classmethod
    def from_cbor(cls, item: object) -> Objective:
        if not isinstance(item, list) or len(item) not in (3, 4):
            raise DecodeError("objective is not an array of 3 or 4 elements")
        name, flags, loop_count = item[:3]
        if not isinstance(name, str) or not name:
            raise DecodeError("objective name is not a non-empty text string")
        if not _is_uint(flags, 0xFF):
            raise DecodeError(f"objective {name!r}: flags are not a uint 0..255")
        if not _is_uint(loop_count, 0xFF):
            raise DecodeError(f"objective {name!r}: loop count is not a uint 0..255")
        return cls(name, flags, loop_count, item[3] if len(item) == 4 else NO_VALUE)


@dataclass(frozen=True)
class IPv6Locator:
    """O_IPv6_LOCATOR: where to connect. ``port`` is None where the announcer wrote nil
    (RFC 8995 §4.3's IPIP example ``[103, fe80::1234, 41, nil]``)."""

    address: IPv6Address
    protocol: int
    port: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.address, IPv6Address):
            raise UsageError("locator address must be an IPv6Address")
        if not _is_uint(self.protocol, 0xFF):
            raise UsageError(f"transport protocol {self.protocol!r} is not 0..255")
        if self.port is not None and not _is_uint(self.port, 0xFFFF):
            raise UsageError(f"port {self.port!r} is not 0..65535 or None")

    def to_cbor(self) -> list[object]:
        return [O_IPV6_LOCATOR, self.address.packed, self.protocol, self.port]


@dataclass(frozen=True)
class OtherLocator:
    """A locator option we do not interpret (O_IPv4_LOCATOR 104, O_FQDN_LOCATOR 105,
    O_URI_LOCATOR 106, ...), kept verbatim."""

    option: int
    fields: tuple[object, ...]

    def to_cbor(self) -> list[object]:
        return [self.option, *self.fields]


Locator = IPv6Locator | OtherLocator


def _locator_from_cbor(item: object) -> Locator | None:
    if not isinstance(item, list):
        raise DecodeError("locator is not an array")
    if not item:
        return None  # "[]": the objective is flooded without a locator
    option = item[0]
    if not _is_uint(option, _UINT32):
        raise DecodeError("locator option number is not a uint")
    if option != O_IPV6_LOCATOR:
        return OtherLocator(option, tuple(item[1:]))
    if len(item) != 4:
        raise DecodeError(f"O_IPv6_LOCATOR has {len(item)} elements, not 4")
    _, address, protocol, port = item
    if type(address) is not bytes or len(address) != 16:
        raise DecodeError("O_IPv6_LOCATOR address is not a 16-byte string")
    if not _is_uint(protocol, 0xFF):
        raise DecodeError("O_IPv6_LOCATOR transport protocol is not a uint 0..255")
    if port is not None and not _is_uint(port, 0xFFFF):
        raise DecodeError("O_IPv6_LOCATOR port is not a uint 0..65535 or null")
    return IPv6Locator(IPv6Address(address), protocol, port)


@dataclass(frozen=True)
class FloodEntry:
    """One ``[objective, locator-option / []]`` pair."""

    objective: Objective
    locator: Locator | None = None

    def to_cbor(self) -> list[object]:
        return [self.objective.to_cbor(), [] if self.locator is None else self.locator.to_cbor()]


@dataclass(frozen=True)
class Flood:
    """An M_FLOOD message. ``ttl_ms``: how long the flooded data is valid, in milliseconds."""

    session_id: int
    initiator: IPv6Address
    ttl_ms: int
    entries: tuple[FloodEntry, ...]

    def __post_init__(self) -> None:
        if not _is_uint(self.session_id, _UINT32):
            raise UsageError(f"session id {self.session_id!r} is not a 32-bit unsigned int")
        if not isinstance(self.initiator, IPv6Address):
            raise UsageError("initiator must be an IPv6Address")
        if not _is_uint(self.ttl_ms, _UINT32):
            raise UsageError(f"ttl {self.ttl_ms!r} is not a 32-bit unsigned int")
        if not isinstance(self.entries, tuple) or not self.entries:
            raise UsageError("a flood carries a non-empty tuple of entries")
        if not all(isinstance(e, FloodEntry) for e in self.entries):
            raise UsageError("flood entries must be FloodEntry objects")

    def encode(self) -> bytes:
        message = [M_FLOOD, self.session_id, self.initiator.packed, self.ttl_ms]
        message.extend(entry.to_cbor() for entry in self.entries)
        try:
            data = cbor2.dumps(message)
        except Exception as exc:  # an objective value cbor2 cannot encode
            raise UsageError(f"flood cannot be encoded: {exc}") from exc
        if len(data) > GRASP_MAX_SIZE:
            raise UsageError(f"flood of {len(data)} bytes exceeds GRASP's {GRASP_MAX_SIZE}")
        return data

    @classmethod
    def decode(cls, data: bytes) -> Flood:
        item = loads_exact(data, "GRASP message", GRASP_MAX_SIZE)
        if not isinstance(item, list) or not item:
            raise DecodeError("GRASP message is not a non-empty array")
        if item[0] != M_FLOOD or type(item[0]) is not int:
            raise DecodeError(f"GRASP message type {item[0]!r} is not M_FLOOD ({M_FLOOD})")
        if len(item) < 5:
            raise DecodeError(f"M_FLOOD has {len(item)} elements, needs at least 5")
        _, session_id, initiator, ttl = item[:4]
        if not _is_uint(session_id, _UINT32):
            raise DecodeError("M_FLOOD session id is not a 32-bit uint")
        if type(initiator) is not bytes or len(initiator) != 16:
            raise DecodeError("M_FLOOD initiator is not a 16-byte IPv6 address")
        if not _is_uint(ttl, _UINT32):
            raise DecodeError("M_FLOOD ttl is not a 32-bit uint")
        entries = []
        for pair in item[4:]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise DecodeError("M_FLOOD entry is not an [objective, locator] pair")
            entries.append(FloodEntry(Objective.from_cbor(pair[0]), _locator_from_cbor(pair[1])))
        return cls(session_id, IPv6Address(initiator), ttl, tuple(entries))

    def valued_locators_for(self, objective_name: str) -> list[tuple[object, IPv6Locator]]:
        """(objective value, locator) for each IPv6 locator flooded with the named objective:
        the value tells a registrar's services apart (EST-TLS, BRSKI_JP, BRSKI_RJP)."""
        name = canonical_objective_name(objective_name)
        return [(e.objective.value, e.locator) for e in self.entries
                if e.objective.name == name and isinstance(e.locator, IPv6Locator)]

    def locators_for(self, objective_name: str) -> list[IPv6Locator]:
        """The IPv6 locators flooded with the named objective (alias spellings accepted)."""
        name = canonical_objective_name(objective_name)
        return [
            e.locator
            for e in self.entries
            if e.objective.name == name and isinstance(e.locator, IPv6Locator)
        ]




def _session_id(rng: Callable[[int], bytes]) -> int:
    raw = rng(4)
    if not isinstance(raw, bytes) or len(raw) != 4:
        raise UsageError("rng(4) must return 4 bytes")
    return int.from_bytes(raw, "big")


def proxy_flood(
    rng: Callable[[int], bytes],
    address: IPv6Address,
    port: int,
    *,
    protocol: int = IPPROTO_TCP,
    ttl_ms: int = DEFAULT_TTL_MS,
    value: object = "",
    locators: Sequence[IPv6Address] | None = None,
) -> Flood:
    """The join proxy's announcement (RFC 8995 §4.1.1): ``["AN_Proxy", 4, 1, ""]`` plus a
    locator with the proxy's link-local address, which is also the initiator.

    ``locators`` replaces the locator addresses (one entry each, in order) when pledges should
    connect elsewhere too, e.g. to the proxy's ULA on a link where NAT66 serves ULA pledges.
    """
    if not isinstance(address, IPv6Address) or not address.is_link_local:
        raise UsageError("AN_Proxy is announced with the proxy's IPv6 link-local address")
    addresses = [address] if locators is None else list(locators)
    if not addresses:
        raise UsageError("an AN_Proxy flood needs at least one locator")
    objective = Objective(AN_PROXY, F_SYNCH, PROXY_LOOP_COUNT, value)
    entries = tuple(FloodEntry(objective, IPv6Locator(a, protocol, port)) for a in addresses)
    return Flood(_session_id(rng), address, ttl_ms, entries)


def registrar_flood(
    rng: Callable[[int], bytes],
    initiator: IPv6Address,
    locators: Sequence[IPv6Locator],
    *,
    ttl_ms: int = DEFAULT_TTL_MS,
    value: object = REGISTRAR_VALUE_TLS,
    udp_value: object = REGISTRAR_VALUE_DTLS,
    jpy_locators: Sequence[IPv6Locator] = (),
    cojp_locators: Sequence[IPv6Locator] = (),
) -> Flood:
    """The registrar's announcement (RFC 8995 §4.3): ``["AN_join_registrar", 4, 255,
    "EST-TLS"]``, one entry per locator (TCP is the only mandatory one).

    The objective value names the protocol at the locator, so a UDP (CoAPS/DTLS) locator gets
    ``udp_value`` instead: ``"BRSKI_JP"``, the value the constrained join-proxy draft
    registered for the registrar's stateful DTLS port (up to -15; later drafts leave GRASP to
    brski-discovery, which names none for it). Proxies that want TCP pick by protocol.
    ``jpy_locators`` are the stateless (JPY) UDP ports, flooded under ``"BRSKI_RJP"``;
    ``cojp_locators`` the JRC's CoAP ports, under the local value ``"6TiSCH-JRC"``."""
    if not locators:
        raise UsageError("a registrar flood needs at least one locator")
    if any(loc.protocol != IPPROTO_UDP for loc in (*jpy_locators, *cojp_locators)):
        raise UsageError("a JPY or CoJP locator is a UDP locator")
    tls = Objective(AN_JOIN_REGISTRAR, F_SYNCH, REGISTRAR_LOOP_COUNT, value)
    dtls = Objective(AN_JOIN_REGISTRAR, F_SYNCH, REGISTRAR_LOOP_COUNT, udp_value)
    jpy = Objective(AN_JOIN_REGISTRAR, F_SYNCH, REGISTRAR_LOOP_COUNT, REGISTRAR_VALUE_JPY)
    jrc = Objective(AN_JOIN_REGISTRAR, F_SYNCH, REGISTRAR_LOOP_COUNT, REGISTRAR_VALUE_COJP)
    entries = tuple(
        FloodEntry(dtls if isinstance(loc, IPv6Locator) and loc.protocol == IPPROTO_UDP
                   else tls, loc)
        for loc in locators) + tuple(FloodEntry(jpy, loc) for loc in jpy_locators) \
        + tuple(FloodEntry(jrc, loc) for loc in cojp_locators)
    return Flood(_session_id(rng), initiator, ttl_ms, entries)
