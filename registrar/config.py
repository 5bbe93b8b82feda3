"""The registrar's configuration file (TOML), validated at start.

Every key, its default and its meaning. Relative paths are relative to the config file.

    [server]
    listen = ["[::]:8443"]        # where the HTTPS (BRSKI + EST) server listens; each item is
                                  # "[ipv6]:port", "[fe80::1%eth0]:port" (link-local needs the
                                  # interface), "ipv4:port" or "name:port"
    cert = "registrar.crt"        # required. PEM: the TLS server certificate first, then its
                                  # chain; pledges put the first one in their proximity-registrar-
                                  # cert, and the RVR is signed with it (it needs id-kp-cmcRA)
    key = "registrar.key"         # required. its private key (PEM, unencrypted)
    tls_min_version = "1.2"       # "1.2" or "1.3" (RFC 8995 §5.1: pledges need at least 1.2)

    [pledges]
    manufacturer_cas = ["manufacturer-ca.crt"]  # required. IDevID trust anchors: TLS client
                                  # certificates must chain to one of these (or to the domain CA,
                                  # for LDevID holders re-enrolling)
    enroll = "manufacturer"       # "manufacturer": every device of those manufacturers;
                                  # "allowlist": only the serial numbers below
    serials = []                  # the allowlist (subject serialNumber of the IDevID)

    [domain_ca]
    cert = "ca.crt"               # required. the CA that issues LDevIDs; also the EST /cacerts
    key = "ca.key"                # required
    ldevid_days = 365             # LDevID lifetime
    ldevid_subject = "idevid"     # "idevid": copy the IDevID's subject; "csr": use the CSR's

    [masa]
    ca_certs = []                 # TLS trust anchors for every MASA (empty: the system store)
    timeout = 10.0                # seconds for one MASA exchange
    retry_after = 5               # Retry-After (s, 1..60) sent with 202 while a MASA is down

    [masa.override."masa.example:9443"]  # per MASA authority (as in the IDevID's MASA URL)
    address = "[fd4a:5044::100]:9443"    # connect here; the TLS name is still the authority's
    # url = "https://masa2.example/.well-known/brski"  # or: replace the whole URL
    ca_certs = ["masa-ca.crt"]           # this MASA's TLS trust anchors (default: masa.ca_certs)

    [store]
    path = "registrar.db"         # SQLite file (created if missing)
    # url = "postgresql://brski@db/brski_registrar"  # or: PostgreSQL, shared by the domain's
                                  # registrars (registrar.store_config; not both)

    [announce]
    interfaces = []               # interfaces to announce on; empty: no announcements
    grasp = true                  # flood AN_join_registrar to ff02::13 UDP 7017 (RFC 8995 §4.3)
    grasp_period = 60.0           # seconds between floods (RFC 8995: SHOULD NOT be below 60)
    mdns = true                   # advertise _brski-registrar._tcp.local. (RFC 8995 App. B)
    port = 8443                   # port announced (default: the first listen port)
    address = "fd4a:5044::100"    # IPv6 address in the locator (default: per interface, the
                                  # listen address there, else its first global/ULA address,
                                  # else its link-local one)
    instance = "registrar"        # mDNS instance name (default: "registrar-<hostname>")
    coaps_port = 5684             # the CoAPS (cBRSKI) port to announce beside the HTTPS one:
                                  # GRASP UDP locator, _brski-registrar._udp, and answers to
                                  # GET coap://[ff05::fd]/.well-known/core?rt=brski on UDP 5683
                                  # (registrar.coap_discovery); default: the port of
                                  # [coaps] listen when that is set, else not announced

    [ipip]                        # terminating the stateless IPIP join proxy (off by default;
    enabled = false               # `brski-registrar --ipip` turns it on): every key, and how a
                                  # proxy must encapsulate, in registrar.ipip_config and
                                  # registrar.ipip

    [coaps]
    listen = ""                   # cBRSKI + EST-coaps over DTLS (registrar.coaps) on this UDP
                                  # address, e.g. "[::]:5684" (the cBRSKI default port);
                                  # "" (default): off, so no UDP port opens unasked

    [jpy]
    listen = ""                   # the same CoAPS service for pledges behind stateless join
                                  # proxies (JPY messages, registrar.jpy_endpoint) on this UDP
                                  # address, e.g. "[::]:5685"; announced as rt=brski.rjp;
                                  # "" (default): off

    [cojp]                        # the 6TiSCH JRC (RFC 9031 CoJP over OSCORE): off by default;
    enabled = false               # keys in registrar.cojp_config, pledges and their PSKs from
                                  # `brski-registrar cojp add-pledge`

    [metrics]
    listen = ""                   # Prometheus /metrics, e.g. "[::1]:9466"; "" (default): off;
                                  # --metrics ADDRESS overrides it (registrar.metrics)

    [log]
    level = "info"                # debug, info, warning or error (to stderr)
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from .coap_discovery import COAP_PORT
from .cojp_config import CojpConfig, load_cojp_config
from .ipip_config import IpipConfig, load_ipip_config
from .metrics import load_metrics_listen, metrics_address
from .store_config import load_store_target
from .tomlconfig import (
    ConfigError,
    ListenAddress,
    PrivateKey,
    Table,
    check_key_matches,
    load_certs,
    load_key,
    log_level,
    parse_host_port,
    read_toml,
    require_ec,
)

__all__ = ["ConfigError", "MasaRoute", "RegistrarConfig", "load_registrar_config"]

DEFAULT_PORT = 8443
ENROLL_POLICIES = ("manufacturer", "allowlist")
SUBJECT_POLICIES = ("idevid", "csr")


@dataclass(frozen=True)
class MasaRoute:
    """How to reach one MASA authority: connect to ``address`` (host, port) or ``url``, and
    trust ``ca_certs`` for its TLS server certificate."""

    address: tuple[str, int] | None = None
    url: str | None = None
    ca_certs: list[Path] = field(default_factory=list)


@dataclass
class RegistrarConfig:
    source: Path
    listen: list[ListenAddress]
    cert_file: Path
    key_file: Path
    tls_chain: list[x509.Certificate]  # [server cert, its chain...]
    tls_key: PrivateKey
    tls_min_version: str
    manufacturer_ca_files: list[Path]
    manufacturer_cas: list[x509.Certificate]
    enroll: str
    serials: frozenset[str]
    ca_cert_file: Path
    ca_cert: x509.Certificate
    ca_key: PrivateKey
    ldevid_days: int
    ldevid_subject: str
    masa_ca_certs: list[Path]
    masa_timeout: float
    retry_after: int
    masa_overrides: dict[str, MasaRoute]
    store_path: Path | str  # an SQLite file, or a postgresql:// URL
    announce_interfaces: list[str]
    grasp: bool
    grasp_period: float
    mdns: bool
    announce_port: int
    announce_address: ipaddress.IPv6Address | None
    mdns_instance: str
    log_level: int
    announce_coaps_port: int | None = None  # [announce] coaps_port
    metrics_listen: tuple[str, int] | None = None  # [metrics] listen (registrar.metrics)
    ipip: IpipConfig = field(default_factory=IpipConfig)
    coaps_listen: tuple[str, int] | None = None  # [coaps] listen (registrar.coaps)
    jpy_listen: tuple[str, int] | None = None  # [jpy] listen (registrar.jpy_endpoint)
    cojp: CojpConfig = field(default_factory=CojpConfig)  # [cojp] (registrar.cojp_config)

    @property
    def server_cert(self) -> x509.Certificate:
        return self.tls_chain[0]


def load_registrar_config(path: Path, *, ipip: bool = False) -> RegistrarConfig:
    """Read and check the whole file, including every certificate and key it names.
    ``ipip``: turn ``[ipip]`` on whatever the file says (the ``--ipip`` switch)."""
    root = read_toml(path)
    server = root.table("server", required=True)
    listen = server.listen("listen", [f"[::]:{DEFAULT_PORT}"])
    cert_file, key_file = server.file("cert"), server.file("key")
    tls_chain = load_certs(server, "cert", cert_file)
    tls_key = load_key(server, "key", key_file)
    check_key_matches(server, "key", tls_key, tls_chain[0])
    require_ec(server, "key", tls_key, "registrar voucher-requests are signed with it")
    tls_min = server.string("tls_min_version", "1.2", choices=("1.2", "1.3"))
    server.finish()

    pledges = root.table("pledges", required=True)
    mfg_files = pledges.files("manufacturer_cas")
    if not mfg_files:
        raise pledges.error("manufacturer_cas", "needs at least one CA certificate file")
    mfg_cas = [c for i, f in enumerate(mfg_files)
               for c in load_certs(pledges, f"manufacturer_cas[{i}]", f)]
    enroll = pledges.string("enroll", "manufacturer", choices=ENROLL_POLICIES)
    serials = frozenset(pledges.strings("serials", []))
    if enroll == "allowlist" and not serials:
        raise pledges.error("serials", 'empty: with enroll = "allowlist" no pledge can enroll')
    pledges.finish()

    ca = root.table("domain_ca", required=True)
    ca_file, ca_key_file = ca.file("cert"), ca.file("key")
    ca_cert = load_certs(ca, "cert", ca_file)[0]
    ca_key = load_key(ca, "key", ca_key_file)
    check_key_matches(ca, "key", ca_key, ca_cert)
    ldevid_days = ca.integer("ldevid_days", 365, minimum=1, maximum=36500)
    subject = ca.string("ldevid_subject", "idevid", choices=SUBJECT_POLICIES)
    ca.finish()

    masa = root.table("masa")
    masa_cas = masa.files("ca_certs", [])
    for i, f in enumerate(masa_cas):
        load_certs(masa, f"ca_certs[{i}]", f)
    timeout = masa.number("timeout", 10.0, minimum=0.1, maximum=600)
    retry_after = masa.integer("retry_after", 5, minimum=1, maximum=60)
    overrides = {name: _masa_route(name, t) for name, t in masa.table("override").subtables()
                 .items()}
    masa.finish()

    store_path = load_store_target(root, "registrar.db")

    ann = root.table("announce")
    interfaces = ann.strings("interfaces", [])
    for i, name in enumerate(interfaces):
        if not _interface_exists(name):
            raise ann.error(f"interfaces[{i}]", f"{name!r}: no such network interface")
    grasp = ann.boolean("grasp", True)
    period = ann.number("grasp_period", 60.0, minimum=0.05, maximum=86400)
    mdns = ann.boolean("mdns", True)
    port = ann.integer("port", listen[0].port, minimum=1, maximum=65535)
    address = None
    if ann.has("address"):
        try:
            address = ipaddress.IPv6Address(ann.string("address"))
        except ValueError as exc:
            raise ann.error("address", f"not an IPv6 address ({exc})") from exc
    instance = ann.string("instance", f"registrar-{socket.gethostname()}")
    coaps_port = ann.integer("coaps_port", None, minimum=1, maximum=65535)
    ann.finish()

    ipip_config = load_ipip_config(root, listen, force=ipip)
    level = log_level(root)
    metrics_listen = load_metrics_listen(root)
    coaps_listen = _coaps_listen(root)
    jpy_listen = _coaps_listen(root, "jpy")
    cojp_config = load_cojp_config(root)
    if coaps_port is None and coaps_listen is not None:
        coaps_port = coaps_listen[1]  # announce the CoAPS listener the registrar runs
    if (cojp_config.enabled and cojp_config.listen[1] == COAP_PORT and interfaces
            and (coaps_port is not None or jpy_listen is not None)):
        # Both would bind UDP 5683 on every address: the second start would fail.
        raise ConfigError(f"cojp.listen: UDP {COAP_PORT} is also the CoAP discovery port, "
                          "which this registrar serves on the [announce] interfaces; give "
                          "the JRC another port (its join proxies must then be told it)")
    root.finish()
    return RegistrarConfig(
        source=path, listen=listen, cert_file=cert_file, key_file=key_file,
        tls_chain=tls_chain, tls_key=tls_key, tls_min_version=tls_min,
        manufacturer_ca_files=mfg_files, manufacturer_cas=mfg_cas, enroll=enroll,
        serials=serials, ca_cert_file=ca_file, ca_cert=ca_cert, ca_key=ca_key,
        ldevid_days=ldevid_days, ldevid_subject=subject, masa_ca_certs=masa_cas,
        masa_timeout=timeout, retry_after=retry_after, masa_overrides=overrides,
        store_path=store_path, announce_interfaces=interfaces, grasp=grasp,
        grasp_period=period, mdns=mdns, announce_port=port, announce_address=address,
        mdns_instance=instance, log_level=level, metrics_listen=metrics_listen,
        ipip=ipip_config, announce_coaps_port=coaps_port, coaps_listen=coaps_listen,
        jpy_listen=jpy_listen, cojp=cojp_config,
    )


def _coaps_listen(root: Table, name: str = "coaps") -> tuple[str, int] | None:
    table = root.table(name)
    if table.data.get("listen") == "":
        del table.data["listen"]  # "" is "off", as in [metrics]
    text = table.string("listen", None) or ""
    try:
        address = metrics_address(text)
    except ValueError as exc:
        raise table.error("listen", f"{text!r}: {exc}") from exc
    table.finish()
    return address


def _masa_route(authority: str, table: Table) -> MasaRoute:
    try:
        parse_host_port(authority) if ":" in authority else None
    except ValueError as exc:
        raise ConfigError(f"{table.path}: MASA authority {authority!r}: {exc}") from exc
    address = table.string("address")
    url = table.string("url")
    if address and url:
        raise table.error("url", "give either address or url, not both")
    if not address and not url:
        raise table.error("address", "missing: give address (host:port) or url")
    parsed = None
    if address:
        try:
            parsed = parse_host_port(address)
        except ValueError as exc:
            raise table.error("address", f"{address!r}: {exc}") from exc
    if url and not url.startswith("https://"):
        raise table.error("url", "must be an https:// URL (RFC 8995 §2.3.2: MASA over HTTPS)")
    cas = table.files("ca_certs", [])
    for i, f in enumerate(cas):
        load_certs(table, f"ca_certs[{i}]", f)
    table.finish()
    return MasaRoute(address=parsed, url=url, ca_certs=cas)


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True

