"""joinproxyd.toml: parsed and validated into typed, frozen objects.

Every error names the key and the reason, e.g.
``limits.circuits_per_pledge: must be an integer between 1 and 100000 (got -1)``.
Defaults are what an operator would expect on a small border router; the shipped
packaging/joinproxyd.toml documents each key.

    [daemon]        log_level, control_socket, drain_seconds, bpf_pin_dir, bpf_object_dir,
                    join_window ("open" or "closed" at start; joinproxyctl window changes it)
    [metrics]       listen ("[::1]:9465"; "" turns the endpoint off)
    [backbone]      interface
    [[join]]        interfaces (names or globs), modes, port (none: nothing is served)
    [registrars]    discovery (static, grasp, mdns, coap), static ([{address, port, preference,
                    coaps_port, jpy_port, cojp_port,
                    ipip = {link_local, address, protocols, ports}}]),
                    health_interval, health_timeout, constrained_mode, core_interval
    [limits]        circuits_total, circuits_per_interface, circuits_per_pledge,
                    new_circuits_per_second, new_circuits_burst, connect_timeout,
                    idle_timeout, circuit_lifetime; flows_per_pledge,
                    flows_per_interface, flow_idle_timeout (the coaps UDP relay)
    [announce]      interval, grasp, mdns
    [guard]         enabled, rate, burst, syn_rate, syn_burst (XDP join-port guard)
    [ipip]          protocol, backbone_prefix, backbone_addresses, xdp, datapath (ipip mode)
    [cojp]          rate, burst (the cojp relay's join rate limit per join link)
    [circuit]       splice (auto|on|off: the circuit relay spliced in the kernel by a sockhash)
    [jpy]           key_rotation (seconds between header keys of the stateless jpy relay),
                    datapath (auto|kernel|user: where the jpy relay's per-datagram work runs)

The guard is off when [guard] is absent, so a configuration written before it existed (and
a circuit-only one with the guard off) loads no BPF at all; the shipped joinproxyd.toml
turns it on. Rates and bursts are whole packets because the kernel's token buckets count
whole packets: rate/burst UDP datagrams, syn_rate/syn_burst TCP SYNs (new connections);
other TCP segments are never limited by the guard.
"""

import fnmatch
import ipaddress
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .model import IpipTarget

DEFAULT_PATH = Path("/etc/joinproxyd/joinproxyd.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
# "coap": CoRE discovery of constrained registrars (also on whenever a constrained mode is).
DISCOVERY_METHODS = ("static", "grasp", "mdns", "coap")
CONSTRAINED_MODE_CHOICES = ("auto", "coaps", "jpy")  # auto: jpy when a registrar offers it
# Relay modes this build knows; relays/__init__.py maps each name to its implementation.
JPY_DATAPATHS = ("auto", "kernel", "user")
CIRCUIT_SPLICE = ("auto", "on", "off")
KNOWN_MODES = ("circuit", "nat66", "ipip", "coaps", "jpy", "cojp")
# The join port a [[join]] without `port` gets: 5684 (CoAPS) when only constrained (UDP)
# modes serve it, the draft's default; else BRSKI's 8443.
CONSTRAINED_MODES = frozenset({"coaps", "jpy"})
COAPS_JOIN_PORT = 5684
# cojp (RFC 9031): pledges send their Join Request to the proxy's CoAP port, 5683, and so it is
# the default port of a [[join]] that serves cojp (it cannot share a link with other modes).
COAP_JOIN_PORT = 5683
DEFAULT_BPF_PIN_DIR = Path("/sys/fs/bpf/joinproxyd")
KNOB_RECORD_NAME = "ipip-knobs.json"  # beside the control socket (IpipSettings.knob_record)
IPIP_PROTOCOLS = (41, 98)  # IPv6-in-IPv6 (RFC 2473, the drafts' choice), ENCAP (RFC 1241)
IPIP_MAX_PORTS = 4  # ports the kernel's IPIP program matches per join link
IPIP_DATAPATHS = ("auto", "bpf", "kernel")  # ipip.datapath (relays/ipip.py choose_datapath)
IPIP_XDP = ("auto", "on", "off")  # ipip.xdp: the XDP encapsulation fast path (relays/ipip_xdp.py)
IFNAMSIZ = 15  # longest interface name
# A derived backbone address is the prefix plus the join link's ifindex: leave it room.
IPIP_PREFIX_MAX_LEN = 112


class ConfigError(Exception):
    """A configuration that cannot be used; str() is the one line an operator needs."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class StaticRegistrar:
    address: str
    port: int
    preference: int
    ipip: IpipTarget | None = None  # the registrar also terminates the IPIP proxy
    coaps_port: int | None = None  # its CoAPS (DTLS) port, for the coaps relay mode
    jpy_port: int | None = None  # its JPY port, for the stateless jpy relay mode
    cojp_port: int | None = None  # its JRC's CoAP port, for the cojp relay mode (RFC 9031)


@dataclass(frozen=True)
class CojpSettings:
    """The cojp relay (RFC 9031 stateless join proxy): how many pledge datagrams per second
    each join link may forward to the JRC (RFC 9031 §6.1 and §8.4.2: the proxy limits join
    traffic; 0 forwards none, as a join rate of 0 means), and the burst above that rate."""

    rate: float = 5.0
    burst: int = 10


@dataclass(frozen=True)
class GuardSettings:
    """The XDP join-port guard: token buckets per (pledge address, join link), one for UDP
    datagrams and one for TCP SYNs; the reasoning behind the defaults is in
    packaging/joinproxyd.toml and joinproxyd.toml(5)."""

    enabled: bool = False
    rate: int = 20  # UDP datagrams per second to the join ports, per source and link
    burst: int = 40  # datagrams
    syn_rate: int = 10  # TCP SYNs (new connections) per second, per source and link
    syn_burst: int = 20  # SYNs


@dataclass(frozen=True)
class IpipSettings:
    """The ipip relay mode: the outer protocol and the proxy's backbone address per link."""

    protocol: int = 41
    # One backbone address per join link (the stateless rule that sends replies to the right
    # link): configured by name, else the prefix plus the link's ifindex.
    backbone_prefix: ipaddress.IPv6Network | None = None
    backbone_addresses: dict[str, str] = field(default_factory=dict)
    # The XDP encapsulation in front of the tc one: "auto" when the backbone can take it.
    xdp: str = "auto"
    # Who encapsulates: "bpf" (tc/XDP programs), "kernel" (ip6ip6 tunnels configured over
    # netlink, kernel/ip6tnl.py; protocol 41 only), "auto": BPF where it runs, else tunnels.
    datapath: str = "auto"
    # Not a key: where the mode records the join links' sysctls from before it changed them
    # (relays/ipip_knobs.py), in the control socket's directory, the daemon's runtime one.
    knob_record: Path = field(default=Path("/run/joinproxyd") / KNOB_RECORD_NAME,
                              compare=False)


@dataclass(frozen=True)
class CircuitSettings:
    """The circuit relay: "on" splices each circuit's two sockets in the kernel
    (ebpf/splice.bpf.c) where it takes them, else the asyncio relay moves the bytes, and
    logs an error when the kernel cannot splice at all; "auto" and "off" run the asyncio
    relay. Not spliced unless "on": on the measured kernel (6.18, 2 vCPU) a spliced circuit
    costs more CPU to set up, and MSS-sized segments from a pledge cost the sockhash's
    egress redirect far more per byte than the asyncio relay (README)."""

    splice: str = "off"


@dataclass(frozen=True)
class JpySettings:
    """The stateless jpy relay mode: how long a header key seals before the next one takes
    over; the previous key still opens for one more period (relays/jpy.py)."""

    key_rotation: float = 86400.0  # draft §4.5.5 suggests about a day
    # Where the per-datagram work runs: "kernel" (tc programs, ebpf/jpy.bpf.c), "user" (the
    # asyncio relay, AES-SIV header), "auto": the kernel where its BPF crypto kfuncs exist.
    datapath: str = "auto"


@dataclass(frozen=True)
class JoinSpec:
    interfaces: tuple[str, ...]
    modes: tuple[str, ...]
    port: int

    def matches(self, ifname: str) -> bool:
        return any(fnmatch.fnmatchcase(ifname, pattern) for pattern in self.interfaces)


@dataclass(frozen=True)
class Limits:
    circuits_total: int = 1000
    circuits_per_interface: int = 500
    circuits_per_pledge: int = 8
    new_circuits_per_second: float = 2.0
    new_circuits_burst: int = 8
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0
    circuit_lifetime: float = 600.0
    # The coaps relay (UDP, stateful, draft §4.3): flows per pledge address and per join
    # link, and how long a flow outlives its last datagram either way.
    flows_per_pledge: int = 2
    flows_per_interface: int = 10
    flow_idle_timeout: float = 30.0


@dataclass(frozen=True)
class Config:
    backbone: str
    joins: tuple[JoinSpec, ...]
    log_level: str = "info"
    control_socket: Path = Path("/run/joinproxyd/control.sock")
    drain_seconds: float = 10.0
    join_window: str = "open"
    metrics_listen: tuple[str, int] | None = ("::1", 9465)
    discovery: tuple[str, ...] = ("static", "grasp", "mdns")
    static_registrars: tuple[StaticRegistrar, ...] = ()
    health_interval: float = 2.0
    health_timeout: float = 1.0
    constrained_mode: str = "auto"  # which constrained relay a registrar is used with
    core_interval: float = 30.0  # seconds between CoRE discovery rounds on the backbone
    limits: Limits = field(default_factory=Limits)
    announce_interval: float = 30.0
    announce_grasp: bool = True
    announce_mdns: bool = True
    bpf_pin_dir: Path = DEFAULT_BPF_PIN_DIR
    bpf_object_dir: Path | None = None  # None: where `make -C ebpf` builds them
    guard: GuardSettings = field(default_factory=GuardSettings)
    ipip: IpipSettings = field(default_factory=IpipSettings)
    cojp: CojpSettings = field(default_factory=CojpSettings)
    jpy: JpySettings = field(default_factory=JpySettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)

    @property
    def uses_ipip(self) -> bool:
        return any("ipip" in spec.modes for spec in self.joins)

    @property
    def needs_bpf(self) -> bool:
        """Whether anything configured runs in BPF (else no BPF object is ever loaded): the
        guard, ipip or the jpy relay's kernel path, and a join link for them to serve."""
        jpy_kernel = self.jpy.datapath != "user" and any("jpy" in s.modes for s in self.joins)
        return bool(self.joins) and (self.guard.enabled or self.uses_ipip or jpy_kernel)

    def join_spec_for(self, ifname: str) -> JoinSpec | None:
        """The first [[join]] entry whose patterns match (order in the file decides)."""
        if ifname == self.backbone:
            return None
        return next((spec for spec in self.joins if spec.matches(ifname)), None)


class _Table:
    """One TOML table being read: every key taken is checked, leftovers are errors."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path, "must be a table")
        self.data: dict[str, Any] = dict(data)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def take(self, name: str, default: Any = None) -> Any:
        return self.data.pop(name, default)

    def table(self, name: str) -> "_Table":
        return _Table(self.take(name, {}), self.key(name))

    def string(self, name: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.take(name, default)
        if not isinstance(value, str):
            raise ConfigError(self.key(name), f"must be a string (got {value!r})"
                              if value is not None else "is required")
        if choices and value not in choices:
            raise ConfigError(self.key(name), f"must be one of {', '.join(choices)} "
                                              f"(got {value!r})")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(self.key(name), f"must be an integer between {low} and {high} "
                                              f"(got {value!r})")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.take(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not low <= value <= high:
            raise ConfigError(self.key(name), f"must be a number between {low:g} and {high:g} "
                                              f"(got {value!r})")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.take(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), f"must be true or false (got {value!r})")
        return value

    def strings(self, name: str, default: tuple[str, ...] | None,
                choices: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.take(name, default)
        if value is None:
            raise ConfigError(self.key(name), "is required")
        if not isinstance(value, list | tuple) or not value \
                or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.key(name), f"must be a non-empty list of strings "
                                              f"(got {value!r})")
        for v in value:
            if choices and v not in choices:
                raise ConfigError(self.key(name), f"{v!r} is not one of {', '.join(choices)}")
        if len(set(value)) != len(value):
            raise ConfigError(self.key(name), "lists a value twice")
        return tuple(value)

    def integers(self, name: str, default: tuple[int, ...], low: int, high: int,
                 most: int) -> tuple[int, ...]:
        value = self.take(name, default)
        if not isinstance(value, list | tuple) or not 1 <= len(value) <= most or any(
                isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high
                for v in value):
            raise ConfigError(self.key(name), f"must be a list of 1 to {most} integers between "
                                              f"{low} and {high} (got {value!r})")
        if len(set(value)) != len(value):
            raise ConfigError(self.key(name), "lists a value twice")
        return tuple(value)

    def abspath(self, name: str, default: Path | None) -> Path | None:
        value = self.take(name, None if default is None else str(default))
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(self.key(name), f"must be an absolute path (got {value!r})")
        return Path(value)

    def done(self) -> None:
        if self.data:
            unknown = sorted(self.data)[0]
            raise ConfigError(self.key(unknown), "unknown key")


def _listen(value: str, key: str) -> tuple[str, int] | None:
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port_number = int(port)
    except ValueError:
        raise ConfigError(key, f"must look like [::1]:9465 or 127.0.0.1:9465 (got {value!r})")\
            from None
    if not sep or not 1 <= port_number <= 65535:
        raise ConfigError(key, f"must look like [::1]:9465 (got {value!r})")
    return host, port_number


def _static_registrar(item: object, key: str) -> StaticRegistrar:
    table = _Table(item, key)
    address = table.string("address")
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        raise ConfigError(table.key("address"), f"must be an IPv6 address (got {address!r})")\
            from None
    if ip.is_link_local:
        raise ConfigError(table.key("address"), "a link-local registrar cannot be configured "
                                                "statically; use a ULA or global address")
    port = table.integer("port", 443, 1, 65535)
    preference = table.integer("preference", 100, 0, 65535)
    ipip = None
    if "ipip" in table.data:
        ipip = _static_ipip(table.table("ipip"), str(ip), port)
    udp = {name: table.integer(name, 0, 1, 65535) if name in table.data else None
           for name in ("coaps_port", "jpy_port", "cojp_port")}
    table.done()
    return StaticRegistrar(str(ip), port, preference, ipip, **udp)


def _ipv6(table: _Table, name: str, default: str | None = None) -> ipaddress.IPv6Address:
    text = table.string(name, default)
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise ConfigError(table.key(name), f"must be an IPv6 address (got {text!r})") from None


def _routable(table: _Table, name: str, address: ipaddress.IPv6Address) -> None:
    if address.is_link_local or address.is_multicast or address.is_unspecified \
            or address.is_loopback or address.ipv4_mapped is not None:
        raise ConfigError(table.key(name), f"must be a unicast ULA or global address "
                                           f"(got {address})")


def _static_ipip(table: _Table, address: str, port: int) -> IpipTarget:
    """registrars.static[i].ipip: this registrar takes IPIP (what its GRASP flood would say)."""
    link_local = _ipv6(table, "link_local")
    if not link_local.is_link_local:
        raise ConfigError(table.key("link_local"), f"must be a link-local (fe80::/10) address "
                                                   f"(got {link_local}): pledges connect to it")
    outer = _ipv6(table, "address", address)
    _routable(table, "address", outer)
    protocols = table.integers("protocols", (41,), 0, 255, 2)
    for proto in protocols:
        if proto not in IPIP_PROTOCOLS:
            raise ConfigError(table.key("protocols"), f"{proto} is not 41 (IPv6-in-IPv6) or "
                                                      "98 (ENCAP)")
    ports = table.integers("ports", (port,), 1, 65535, IPIP_MAX_PORTS)
    table.done()
    return IpipTarget(link_local.compressed, outer.compressed, protocols, ports)


def _guard(table: _Table) -> GuardSettings:
    defaults = GuardSettings()
    guard = GuardSettings(
        enabled=table.boolean("enabled", defaults.enabled),
        rate=table.integer("rate", defaults.rate, 1, 10_000_000),
        burst=table.integer("burst", defaults.burst, 1, 1_000_000),
        syn_rate=table.integer("syn_rate", defaults.syn_rate, 1, 10_000_000),
        syn_burst=table.integer("syn_burst", defaults.syn_burst, 1, 1_000_000))
    table.done()
    return guard


def _ipip(table: _Table) -> IpipSettings:
    protocol = table.integer("protocol", 41, 0, 255)
    if protocol not in IPIP_PROTOCOLS:
        raise ConfigError(table.key("protocol"), f"must be 41 (IPv6-in-IPv6) or 98 (ENCAP) "
                                                 f"(got {protocol})")
    prefix = None
    raw_prefix = table.take("backbone_prefix", None)
    if raw_prefix is not None:
        try:
            prefix = ipaddress.IPv6Network(raw_prefix)
        except (ValueError, TypeError):
            raise ConfigError(table.key("backbone_prefix"), f"must be an IPv6 prefix with no "
                              f"host bits set, e.g. fd00::1:0/112 (got {raw_prefix!r})") from None
        if prefix.prefixlen > IPIP_PREFIX_MAX_LEN:
            raise ConfigError(table.key("backbone_prefix"), f"/{prefix.prefixlen} is too long: "
                              f"at most /{IPIP_PREFIX_MAX_LEN}, each join link takes the "
                              "address at its interface index")
        _routable(table, "backbone_prefix", prefix.network_address)
    addresses_table = table.table("backbone_addresses")
    addresses: dict[str, str] = {}
    for name in sorted(addresses_table.data):
        if not name or len(name) > IFNAMSIZ or "/" in name or name.strip() != name:
            raise ConfigError(addresses_table.key(name), "is not an interface name")
        address = _ipv6(addresses_table, name)
        _routable(addresses_table, name, address)
        if address.compressed in addresses.values():
            raise ConfigError(addresses_table.key(name), f"{address} is given to two join "
                                                         "links: one address per link")
        addresses[name] = address.compressed
    addresses_table.done()
    xdp = table.take("xdp", "auto")
    if not isinstance(xdp, str) or xdp not in IPIP_XDP:
        shown = str(xdp).lower() if isinstance(xdp, bool) else repr(xdp)
        raise ConfigError(table.key("xdp"), f'must be "auto", "on" or "off" (got {shown})')
    datapath = table.take("datapath", "auto")
    if not isinstance(datapath, str) or datapath not in IPIP_DATAPATHS:
        raise ConfigError(table.key("datapath"),
                          f'must be "auto", "bpf" or "kernel" (got {datapath!r})')
    if datapath == "kernel" and protocol != 41:
        raise ConfigError(table.key("datapath"), f'"kernel" (ip6ip6 tunnels) carries protocol '
                          f'41 only; ipip.protocol = {protocol} needs "bpf" or "auto"')
    table.done()
    return IpipSettings(protocol, prefix, addresses, xdp, datapath=datapath)


def _cojp(table: _Table) -> CojpSettings:
    defaults = CojpSettings()
    cojp = CojpSettings(rate=table.number("rate", defaults.rate, 0, 1e6),
                        burst=table.integer("burst", defaults.burst, 1, 1_000_000))
    table.done()
    return cojp


def _jpy(table: _Table) -> JpySettings:
    # At least a second (tests use a few); at most 30 days: a key that lives longer seals
    # more headers than a day's worth for little gain (draft §4.5.5: about a day).
    settings = JpySettings(key_rotation=table.number(
        "key_rotation", JpySettings.key_rotation, 1, 30 * 86400),
        datapath=table.string("datapath", JpySettings.datapath, JPY_DATAPATHS))
    table.done()
    return settings


def _circuit(table: _Table) -> CircuitSettings:
    splice = table.take("splice", CircuitSettings.splice)
    if not isinstance(splice, str) or splice not in CIRCUIT_SPLICE:
        shown = str(splice).lower() if isinstance(splice, bool) else repr(splice)
        raise ConfigError(table.key("splice"), f'must be "auto", "on" or "off" (got {shown})')
    table.done()
    return CircuitSettings(splice)


def _join(item: object, key: str) -> JoinSpec:
    table = _Table(item, key)
    interfaces = table.strings("interfaces", None)
    modes = table.strings("modes", ("circuit",), KNOWN_MODES)
    default_port = COAP_JOIN_PORT if "cojp" in modes else \
        COAPS_JOIN_PORT if set(modes) <= CONSTRAINED_MODES else 8443
    spec = JoinSpec(interfaces=interfaces, modes=modes,
                    port=table.integer("port", default_port, 1, 65535))
    if "ipip" in spec.modes and len(spec.modes) > 1:
        raise ConfigError(table.key("modes"), "ipip cannot share a join link with other modes: "
                                              "pledges there are sent to the registrar's own "
                                              "link-local address and port")
    if "cojp" in spec.modes and len(spec.modes) > 1:
        raise ConfigError(table.key("modes"), "cojp cannot share a join link with other modes: "
                                              "its port takes plain CoAP join requests "
                                              "(RFC 9031), not DTLS or TCP")
    for pattern in spec.interfaces:
        if len(pattern) > 15 and not any(c in pattern for c in "*?["):
            raise ConfigError(table.key("interfaces"), f"{pattern!r} is longer than an "
                                                       "interface name can be (15)")
    table.done()
    return spec


def parse(data: dict[str, Any]) -> Config:
    root = _Table(data, "")
    daemon = root.table("daemon")
    metrics = root.table("metrics")
    backbone = root.table("backbone")
    registrars = root.table("registrars")
    limits_table = root.table("limits")
    announce = root.table("announce")
    guard = _guard(root.table("guard"))
    ipip = _ipip(root.table("ipip"))
    cojp = _cojp(root.table("cojp"))
    jpy = _jpy(root.table("jpy"))
    circuit = _circuit(root.table("circuit"))
    # No [[join]] table is a valid configuration (the shipped one): the daemon runs and
    # serves nothing, saying "no join link configured", so that a fresh install serves no
    # guessed interface (README, joinproxyd(8)).
    joins_raw = root.take("join", [])
    if not isinstance(joins_raw, list):
        raise ConfigError("join", "must be a list of [[join]] tables")
    joins = tuple(_join(item, f"join[{i}]") for i, item in enumerate(joins_raw))
    defaults = Limits()
    limits = Limits(
        circuits_total=limits_table.integer("circuits_total", defaults.circuits_total, 1,
                                            1_000_000),
        circuits_per_interface=limits_table.integer(
            "circuits_per_interface", defaults.circuits_per_interface, 1, 1_000_000),
        circuits_per_pledge=limits_table.integer("circuits_per_pledge",
                                                 defaults.circuits_per_pledge, 1, 100_000),
        new_circuits_per_second=limits_table.number(
            "new_circuits_per_second", defaults.new_circuits_per_second, 0.001, 1e6),
        new_circuits_burst=limits_table.integer("new_circuits_burst",
                                                defaults.new_circuits_burst, 1, 1_000_000),
        connect_timeout=limits_table.number("connect_timeout", defaults.connect_timeout,
                                            0.1, 300),
        idle_timeout=limits_table.number("idle_timeout", defaults.idle_timeout, 0.1, 86400),
        circuit_lifetime=limits_table.number("circuit_lifetime", defaults.circuit_lifetime,
                                             1, 7 * 86400),
        flows_per_pledge=limits_table.integer("flows_per_pledge", defaults.flows_per_pledge,
                                              1, 100_000),
        flows_per_interface=limits_table.integer(
            "flows_per_interface", defaults.flows_per_interface, 1, 1_000_000),
        flow_idle_timeout=limits_table.number("flow_idle_timeout", defaults.flow_idle_timeout,
                                              0.1, 86400),
    )
    static_raw = registrars.take("static", [])
    if not isinstance(static_raw, list):
        raise ConfigError("registrars.static", "must be a list of tables")
    static = tuple(_static_registrar(item, f"registrars.static[{i}]")
                   for i, item in enumerate(static_raw))
    discovery = registrars.strings("discovery", ("static", "grasp", "mdns"), DISCOVERY_METHODS)
    if discovery == ("static",) and not static:
        raise ConfigError("registrars.static", "is empty and discovery is static only: "
                                               "the proxy would have no registrar")
    config = Config(
        backbone=backbone.string("interface"),
        joins=joins,
        log_level=daemon.string("log_level", "info", LOG_LEVELS),
        control_socket=Path(daemon.string("control_socket", "/run/joinproxyd/control.sock")),
        drain_seconds=daemon.number("drain_seconds", 10.0, 0, 3600),
        join_window=daemon.string("join_window", "open", ("open", "closed")),
        metrics_listen=_listen(metrics.string("listen", "[::1]:9465"), "metrics.listen"),
        discovery=discovery,
        static_registrars=static,
        health_interval=registrars.number("health_interval", 2.0, 0.1, 3600),
        health_timeout=registrars.number("health_timeout", 1.0, 0.05, 60),
        constrained_mode=registrars.string("constrained_mode", "auto", CONSTRAINED_MODE_CHOICES),
        core_interval=registrars.number("core_interval", 30.0, 1, 3600),
        limits=limits,
        announce_interval=announce.number("interval", 30.0, 1, 3600),
        announce_grasp=announce.boolean("grasp", True),
        announce_mdns=announce.boolean("mdns", True),
        bpf_pin_dir=daemon.abspath("bpf_pin_dir", DEFAULT_BPF_PIN_DIR) or DEFAULT_BPF_PIN_DIR,
        bpf_object_dir=daemon.abspath("bpf_object_dir", None),
        guard=guard,
        ipip=ipip,
        cojp=cojp,
        jpy=jpy,
        circuit=circuit,
    )
    config = replace(config, ipip=replace(
        ipip, knob_record=config.control_socket.parent / KNOB_RECORD_NAME))
    for table in (daemon, metrics, backbone, registrars, limits_table, announce, root):
        table.done()
    if any(spec.matches(config.backbone) for spec in joins):
        raise ConfigError("backbone.interface", f"{config.backbone!r} also matches a [[join]] "
                                                "interface pattern")
    if config.uses_ipip and ipip.backbone_prefix is None and not ipip.backbone_addresses:
        raise ConfigError("ipip.backbone_prefix", "is required when a [[join]] uses ipip (or "
                                                  "list ipip.backbone_addresses): the proxy "
                                                  "needs its own backbone address per join link")
    return config


def load(path: Path) -> Config:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), exc.strerror or str(exc)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse(data)
