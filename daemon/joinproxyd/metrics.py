"""Every Prometheus metric joinproxyd exports, defined in one place (habit 12).

Each daemon gets its own CollectorRegistry, so tests can make as many as they like. Drop
counters exist for every (mode, reason) pair from the start, at zero, so a dashboard can tell
"never happened" from "not exported". Kernel counters are read at scrape time by collectors:
BpfPackets (joinproxyd_bpf_packets_total) from the source the control plane gives it, and the
kernel-counted drops through DropCounters' sources; nothing polls them into gauges.
"""

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .model import DropReason, PolicyDropReason

# Activities that count drops from the start; each relay mode adds its own name when the
# control plane creates it, so only modes in use are exported.
DROP_MODES = ("discovery", "announce")

# The *_created series say when a process started counting: noise for an operator.
disable_created_metrics()


DropSource = Callable[[], Mapping[tuple[str, str], float]]


class DropCounters(Collector):
    """joinproxyd_drops_total{mode,reason}: drops counted in Python plus drops the kernel
    counts (nft and BPF counters), merged into one family when scraped."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], float] = {}
        self._sources: list[DropSource] = []
        self._lock = threading.Lock()

    def declare(self, mode: str) -> None:
        with self._lock:
            for reason in (*DropReason, *PolicyDropReason):
                self._counts.setdefault((mode, reason.value), 0.0)

    def inc(self, mode: str, reason: DropReason | PolicyDropReason, count: float = 1) -> None:
        with self._lock:
            key = (mode, reason.value)
            self._counts[key] = self._counts.get(key, 0.0) + count

    def add_source(self, source: DropSource) -> None:
        self._sources.append(source)

    def values(self) -> dict[tuple[str, str], float]:
        with self._lock:
            merged = dict(self._counts)
        for source in self._sources:
            for key, value in source().items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "joinproxyd_drops", "Connections, packets or messages refused, by reason",
            labels=["mode", "reason"])
        for (mode, reason), value in sorted(self.values().items()):
            family.add_metric([mode, reason], value)
        yield family


PacketSource = Callable[[], Mapping[tuple[str, str], float]]


class BpfPackets(Collector):
    """joinproxyd_bpf_packets_total{program,action}: what each BPF program did, read from
    the kernel's per-CPU counters at scrape time (nothing polls them). Before the BPF data
    plane is opened, and in a proxy that never opens it, there is no such family."""

    def __init__(self) -> None:
        self._source: PacketSource | None = None

    def set_source(self, source: PacketSource | None) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        source = self._source
        values = source() if source is not None else {}
        if not values:
            return
        family = CounterMetricFamily(
            "joinproxyd_bpf_packets", "Packets seen by each BPF program, by what it did",
            labels=["program", "action"])
        for (program, action), value in sorted(values.items()):
            family.add_metric([program, action], value)
        yield family


class _ScrapeRegistry(CollectorRegistry):
    """Runs the before_scrape hooks first: counters kept elsewhere (a BPF map the jpy relay
    folds into its series) are brought up to date before they are read."""

    def __init__(self) -> None:
        super().__init__()
        self.before_scrape: list[Callable[[], None]] = []

    def collect(self) -> Iterator[Metric]:
        for hook in list(self.before_scrape):
            hook()
        yield from super().collect()


class Metrics:
    def __init__(self, modes: Iterable[str] = DROP_MODES) -> None:
        self.registry = _ScrapeRegistry()
        self.before_scrape = self.registry.before_scrape
        r = self.registry
        self.build_info = Info("joinproxyd_build", "joinproxyd version", registry=r)
        self.build_info.info({"version": __version__})
        self.circuits_active = Gauge(
            "joinproxyd_circuits_active", "Open relayed connections",
            ["interface", "mode"], registry=r)
        self.circuits = Counter(
            "joinproxyd_circuits", "Pledge connections relayed to a registrar",
            ["mode"], registry=r)
        self.relayed_bytes = Counter(
            "joinproxyd_relayed_bytes", "Bytes relayed; upstream is pledge to registrar",
            ["mode", "direction"], registry=r)
        # Datagram relays (coaps, jpy): datagrams per direction, beside relayed_bytes.
        self.relayed_datagrams = Counter(
            "joinproxyd_relayed_datagrams", "Datagrams relayed; upstream is pledge to registrar",
            ["mode", "direction"], registry=r)
        self.drops = DropCounters()
        r.register(self.drops)
        self.bpf_packets = BpfPackets()
        r.register(self.bpf_packets)
        self.registrar_up = Gauge(
            "joinproxyd_registrar_up", "1 if the registrar answered its last health probe",
            ["registrar", "source"], registry=r)
        # The constrained modes' UDP endpoints (discovery/constrained.py): coaps and jpy ports
        # probed with DTLS, a JRC (cojp) with a CoAP ping; the endpoint label is kind://[addr]:port
        self.constrained_up = Gauge(
            "joinproxyd_constrained_registrar_up",
            "1 if the registrar's UDP endpoint answered its last probe (DTLS, or CoAP ping "
            "for a cojp JRC)", ["endpoint", "kind"], registry=r)
        # Per configured relay mode: what joinproxyctl status shows as joining_modes.
        self.mode_joining = Gauge(
            "joinproxyd_mode_joining", "1 while the relay mode takes new pledges", ["mode"],
            registry=r)
        self.registrar_active = Gauge(
            "joinproxyd_registrar_active", "1 for the registrar new circuits go to",
            ["registrar"], registry=r)
        self.announcements = Counter(
            "joinproxyd_announcements", "Announcements sent to pledges",
            ["method", "interface"], registry=r)
        self.discovery_messages = Counter(
            "joinproxyd_discovery_messages", "Registrar announcements heard and accepted",
            ["method"], registry=r)
        self.join_interfaces = Gauge(
            "joinproxyd_join_interfaces", "Join interfaces being served", registry=r)
        self.reloads = Counter(
            "joinproxyd_config_reloads", "Configuration reloads", ["result"], registry=r)
        # interface "" for listeners not on a join link (mode "metrics", "discovery-grasp")
        self.listener_errors = Counter(
            "joinproxyd_listener_errors", "Failed attempts to bind a listening socket",
            ["interface", "mode", "reason"], registry=r)
        self.join_window_open = Gauge(
            "joinproxyd_join_window_open",
            "1 while the operator's join window is open (joinproxyctl window)", registry=r)
        self.join_window_open.set(1)
        self.listeners_unbound = Gauge(
            "joinproxyd_listeners_unbound", "Configured listeners not bound now (retrying)",
            registry=r)
        for mode in modes:
            self.add_mode(mode)
        self._server: object | None = None

    def add_mode(self, mode: str, flows: bool = True) -> None:
        """Declare a mode's series at zero. flows=False for a mode that keeps no flows (the
        stateless ipip relay: its packets are joinproxyd_bpf_packets_total), so no
        circuits or bytes series claims a count that nothing will ever make."""
        self.drops.declare(mode)
        if flows and mode not in ("discovery", "announce"):
            self.circuits.labels(mode)
            for direction in ("upstream", "downstream"):
                self.relayed_bytes.labels(mode, direction)

    def forget_interface(self, name: str) -> None:
        """A link went away: its labelled series go with it, or they would stay forever
        (interface names come and go with hot-plug)."""
        for family in (self.circuits_active, self.announcements, self.listener_errors):
            family.remove_by_labels({"interface": name})

    def drop(self, mode: str, reason: DropReason | PolicyDropReason, count: int = 1) -> None:
        self.drops.inc(mode, reason, count)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def serve(self, address: tuple[str, int]) -> None:
        """Serve /metrics over HTTP from a background thread (prometheus_client's server)."""
        server, thread = start_http_server(address[1], addr=address[0], registry=self.registry)
        self._server = (server, thread)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server  # type: ignore[misc]
            server.shutdown()
            server.server_close()
            if isinstance(thread, threading.Thread):
                thread.join(timeout=2)
            self._server = None
