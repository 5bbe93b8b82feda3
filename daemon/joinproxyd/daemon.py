"""The control plane: the one owner of configuration, links, registrars, relays and counters.

Everything that changes (a link, an address, the active registrar, the configuration) only
marks the desired state dirty; one reconcile task then derives the desired state and hands
each relay mode, announcer and discovery listener exactly what it should serve. Reconciling
is idempotent, so a burst of netlink events costs one pass.

Joining is open, per relay mode, while that mode has a healthy registrar, one of its join
links is served and the operator's join window (window.py, `joinproxyctl window`) is open:
the TCP modes (circuit, nat66, ipip) need a registrar whose TCP health probe answers, the
constrained ones (coaps, jpy) one whose UDP endpoint answers the DTLS probe
(discovery/constrained.py), cojp a JRC that answers a CoAP ping (learned from cojp_port or a
GRASP "6TiSCH-JRC" locator, probed in the same table). Only links with such a mode are
announced (GRASP, mDNS, CoRE join-port discovery for the constrained ones). A mode without a
healthy registrar refuses new pledges (counted), while established circuits and flows are
left alone.

The BPF data plane (datapath.py) is opened only when something runs in it: the join-port
guard (guard.py, on every served join link whatever its modes; with the guard off, on the
links where the ipip XDP fast path runs, as its dispatcher) or an ipip link. After the
first full reconcile, programs of ours on hooks this process did not attach (a killed run's)
are removed, so each hook holds exactly one.
"""

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__, logs, sdnotify
from . import config as config_mod
from .aio import cancel_and_wait
from .config import Config, ConfigError
from .control import ControlError, ControlServer, Request
from .datapath import Datapath
from .discovery.announce import ProxyAnnouncer
from .discovery.constrained_off import NoConstrainedDiscovery, NoJoinPortAnnouncer
from .discovery.grasp import GraspRegistrarListener
from .discovery.mdns import MdnsProxyAdvertiser, MdnsRegistrarBrowser
from .discovery.registrars import RegistrarSet
from .guard import MODE as GUARD_MODE
from .guard import Guard, GuardRunning
from .kernel import features
from .kernel.bpf_layout import Program
from .kernel.netlink import InterfaceWatcher
from .listeners import Listeners
from .metrics import Metrics
from .model import DropReason, JoinInterface, LinkState, RegistrarEndpoint
from .relays import (
    RelayContext,
    RelayMode,
    ipip_knobs,
    mode_class,
    modes_with_kernel_state,
)
from .relays.circuit import CircuitMode
from .relays.coaps import COAPS_ID_PREFIX, CoapsMode
from .relays.ipip import IpipMode, usable_target
from .trace import TraceHub
from .window import JoinWindow, RefusalLog, pledge_key

log = logging.getLogger("joinproxyd")
# How often the ipip XDP fast path's "auto" looks at the backbone again between reconciles:
# its xdp_features and forwarding knob change without an event the daemon listens to.
XDP_RECHECK_SECONDS = 5.0
# The clsact qdiscs this daemon added, beside the control socket (kernel/qdisc_record.py).
QDISC_RECORD_NAME = "clsact.json"
# What status, STATUS= and the journal say when the configuration has no [[join]] table (the
# shipped one): the daemon runs and serves nothing until the operator names a join link.
NO_JOIN_LINK = "no join link configured: add a [[join]] table and reload"


def static_endpoints(config: Config) -> list[RegistrarEndpoint]:
    return [RegistrarEndpoint(r.preference, r.address, r.port, source="static", ipip=r.ipip,
                              coaps_port=r.coaps_port, jpy_port=r.jpy_port,
                              cojp_port=r.cojp_port)
            for r in config.static_registrars if "static" in config.discovery]


def announced_addresses(modes: tuple[str, ...], link_local: str,
                        routable: tuple[str, ...],
                        ipip_link_local: str | None = None) -> tuple[str, ...]:
    """Where pledges should connect: the link-local address if a mode serves link-local
    pledges, and a routable (ULA/global) one if a mode serves only those (NAT66). An ipip
    link announces the registrar's own link-local address (which the proxy answers ND for),
    and nothing while no registrar offers IPIP."""
    if "ipip" in modes:
        return (ipip_link_local,) if ipip_link_local else ()
    classes = [mode_class(name) for name in modes]
    out = [link_local] if any(cls.serves_link_local for cls in classes) else []
    if routable and any(cls.serves_routable for cls in classes):
        out.append(sorted(routable)[0])
    return tuple(out)


def joinable_view(iface: JoinInterface, healthy: set[str]) -> JoinInterface | None:
    """The served link as far as joining is open on it: only its modes with a healthy
    registrar (and the addresses they serve announced); None when it has none."""
    modes = tuple(m for m in iface.modes if m in healthy)
    if modes == iface.modes:
        return iface
    if not modes:
        return None
    return dataclasses.replace(iface, modes=modes, announce=announced_addresses(
        modes, iface.link_local, iface.routable))


def desired_interfaces(config: Config, links: dict[str, LinkState],
                       registrar: RegistrarEndpoint | None = None) -> list[JoinInterface]:
    """The join interfaces to serve: configured, up, and with a usable link-local address.
    An ipip link's port is the registrar's (the drafts: the port the proxy announces SHOULD
    be the registrar's, so nothing is rewritten), the configured one until it is known."""
    target, _ = usable_target(registrar, config.ipip.protocol)
    out = []
    for link in sorted(links.values(), key=lambda link: link.name):
        spec = config.join_spec_for(link.name)
        if spec is None or not link.ready:
            continue
        link_local = sorted(link.link_local)[0]
        ipip = "ipip" in spec.modes and target is not None
        out.append(JoinInterface(
            link.name, link.index, link_local, link.routable, spec.modes,
            target.ports[0] if ipip and target is not None else spec.port,
            announced_addresses(spec.modes, link_local, link.routable,
                                target.link_local if target is not None else None)))
    return out


def guarded_ports(config: Config, interfaces: list[JoinInterface],
                  registrar: RegistrarEndpoint | None) -> list[int]:
    """The ports the guard watches: each link's join port, every port an ipip link relays
    (the registrar may take more than the one announced), and CoAP's 5683 where a coaps or
    jpy link answers CoRE discovery (discovery/coap_join.py) with a packet of its own."""
    ports = {i.port for i in interfaces}
    if any(config_mod.CONSTRAINED_MODES.intersection(i.modes) for i in interfaces):
        ports.add(config_mod.COAP_JOIN_PORT)
    target, _ = usable_target(registrar, config.ipip.protocol)
    if target is not None and any("ipip" in i.modes for i in interfaces):
        ports.update(target.ports)
    return sorted(ports)


def _samples(metric: Any) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of a prometheus_client metric's own series (no _created)."""
    return [(sample.labels, sample.value) for family in metric.collect()
            for sample in family.samples if not sample.name.endswith("_created")]


class DaemonError(Exception):
    """The daemon cannot run at all (its control socket cannot be made, say): one line for
    the operator, exit 1."""


def link_problem(link: LinkState | None) -> str | None:
    """Why a configured link cannot be served now (None: it can)."""
    if link is None:
        return "missing"
    if not link.up:
        return "link down"
    if not link.link_local:
        return "no link-local address"
    return None


def served_view(iface: JoinInterface, unserved: dict[str, str]) -> JoinInterface | None:
    """The interface as far as its bound listeners serve it: only those modes, and only
    the addresses they serve announced; None when no mode serves it."""
    if not unserved:
        return iface
    modes = tuple(m for m in iface.modes if m not in unserved)
    if not modes:
        return None
    return dataclasses.replace(iface, modes=modes, announce=announced_addresses(
        modes, iface.link_local, iface.routable))


class Daemon:
    def __init__(self, config: Config, config_path: Path | None,
                 notifier: sdnotify.Notifier | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or sdnotify.Notifier()
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.links: dict[str, LinkState] = {}
        self.interfaces: list[JoinInterface] = []
        self.modes: dict[str, RelayMode] = {}
        # The pin directory and objects are fixed for the life of the process (a reload
        # that changes them is logged and ignored).
        self.datapath = Datapath(config.bpf_pin_dir, config.bpf_object_dir, log,
                                 config.control_socket.parent / QDISC_RECORD_NAME)
        self.guard = Guard(self.datapath, log, config.guard)
        self.window = JoinWindow(config.join_window == "open", "configuration", time.time())
        self.metrics.join_window_open.set(int(self.window.open))
        self.refusals = RefusalLog()
        self.metrics.register(GuardRunning(self.guard))
        self.context = RelayContext(self.metrics, lambda: self.config.limits,
                                    lambda: self.links.get(self.config.backbone), log,
                                    datapath=self.datapath, ipip=lambda: self.config.ipip,
                                    cojp=lambda: self.config.cojp,
                                    jpy=lambda: self.config.jpy,
                                    circuit=lambda: self.config.circuit,
                                    join_window=lambda: self.window.open,
                                    refusals=self.refusals)
        self._dirty = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self.listeners = Listeners(self.metrics, log, on_retry=self._dirty.set)
        self.context.listeners = self.listeners
        self.metrics.drops.add_source(self._kernel_drops)
        self.metrics.bpf_packets.set_source(self.datapath.counters)
        self.watcher = InterfaceWatcher(self._links_changed, log)
        self.registrars = RegistrarSet(
            static=static_endpoints(config), health_interval=config.health_interval,
            health_timeout=config.health_timeout, metrics=self.metrics, log=log,
            on_change=self._registrar_changed)
        self.announcer = ProxyAnnouncer(interval=config.announce_interval,
                                        metrics=self.metrics, log=log)
        self.advertiser: MdnsProxyAdvertiser | None = None
        # Registrars' UDP endpoints for the constrained modes (coaps, jpy), DTLS-probed, and
        # CoRE join-port discovery on their links: only where aiocoap and pyOpenSSL are
        # installed (a start with a constrained mode is refused without them, features.py).
        missing = features.constrained_problem()
        if missing is None:
            from .discovery.coap_join import JoinPortAnnouncer, constrained_targets
            from .discovery.constrained import ConstrainedDiscovery

            self.core_join: Any = JoinPortAnnouncer(log, refused=lambda: self.metrics.drop(
                "discovery", DropReason.MALFORMED))
            self.constrained: Any = ConstrainedDiscovery(
                static=static_endpoints(config), health_interval=config.health_interval,
                health_timeout=config.health_timeout, mode=config.constrained_mode,
                on_change=self._dirty.set, metrics=self.metrics, log=log)
            self._constrained_targets: Callable[..., list[Any]] = constrained_targets
        else:
            if "coap" in config.discovery:
                log.warning("registrars.discovery: CoRE discovery (coap) is off: %s", missing)
            self.core_join = NoJoinPortAnnouncer(missing)
            self.constrained = NoConstrainedDiscovery(missing)
            self._constrained_targets = lambda *args: []
        self.grasp_listener: GraspRegistrarListener | None = None
        self.mdns_browser: MdnsRegistrarBrowser | None = None
        self._backbone_index: int | None = None
        self.control = ControlServer(config.control_socket, {
            "status": self.status, "circuits": self.circuit_list,
            "window": self.window_command, "refusals": self.refusal_list,
            "drop": self.drop_command, "trace": self.trace_command})
        self.traces = TraceHub(self.datapath, self.refusals, self._traced_links,
                               config.bpf_object_dir, log)
        self._stop = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._metrics_listen: tuple[str, int] | None = None
        self._metrics_serving = False
        self._metric_links: set[str] = set()
        # Join links with at least one mode serving, as announced; and what is not served
        self.served: list[JoinInterface] = []
        self.unserved: dict[str, dict[str, str]] = {}  # link -> mode -> why
        self._started = False
        self._ready = False
        self._backbone_problem: str | None = None  # what was last logged about it
        self._joining_said: bool | None = None
        self._modes_exported: set[str] = set()  # joinproxyd_mode_joining's labels
        self._targets: dict[str, RegistrarEndpoint | None] | None = None  # per mode, applied

    def _kernel_drops(self) -> dict[tuple[str, str], float]:
        # Runs on the metrics thread: iterate over a copy, the loop may change the dict.
        drops: dict[tuple[str, str], float] = {
            (name, reason): value for name, mode in list(self.modes.items())
            for reason, value in mode.kernel_drops().items()}
        for reason, value in self.datapath.kernel_drops((Program.GUARD,)).items():
            drops[(GUARD_MODE, reason)] = value
        return drops

    # -- events from the parts ------------------------------------------------------------
    def _links_changed(self, snapshot: dict[str, LinkState]) -> None:
        self.links = snapshot
        self._dirty.set()

    def _registrar_changed(self, registrar: RegistrarEndpoint | None) -> None:
        if registrar is None:
            log.warning("no healthy registrar: new circuits refused",
                        extra={"REGISTRAR": "none"})
        else:
            log.info("registrar %s (%s) is active", registrar.key,
                     registrar.source, extra={"REGISTRAR": registrar.key})
        self._dirty.set()

    # -- life cycle -------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        try:
            await self.start()
            self._started = True
            self._notify()
            self.notifier.start_watchdog(self.alive)
            await self._stop.wait()
        finally:
            await self.stop()
        return 0

    async def start(self) -> None:
        self.links = await self.watcher.start()
        wanted = {mode for spec in self.config.joins for mode in spec.modes}
        for name in modes_with_kernel_state():
            if name not in wanted:
                await mode_class(name).clean_leftovers(log)
        if "ipip" not in wanted:
            # The join links' sysctls a killed ipip run changed; their record is a file in
            # the runtime directory, which clean_leftovers (a classmethod) is not told of.
            await ipip_knobs.restore_leftovers(self.config.ipip.knob_record, log)
        if not self.config.needs_bpf:
            await self.datapath.clean_leftovers()
        await self._start_control()
        self._serve_metrics()
        await self.registrars.start()
        await self.constrained.start()
        await self.announcer.start()
        await self.reconcile()
        # Everything this run wants is attached now, replacing a killed run's programs on
        # the same hooks; what is left on other hooks is stale.
        await self.datapath.detach_stale(clear_ipip=not self.config.uses_ipip)
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="reconcile")

    async def stop(self) -> None:
        self.notifier.send(sdnotify.stopping())
        log.info("stopping: draining circuits for up to %g s", self.config.drain_seconds)
        self.announcer.set_enabled(False)
        if self._reconciler is not None:
            await cancel_and_wait(self._reconciler)
        for part in (self.advertiser, self.grasp_listener, self.mdns_browser):
            if part is not None:
                try:
                    await part.stop()
                except Exception:  # keep stopping the rest: kernel state must still go
                    log.exception("stopping %s failed", type(part).__name__)
        await self.announcer.stop()
        await self.core_join.stop()
        await self.constrained.stop()
        await asyncio.gather(*(mode.close(self.config.drain_seconds)
                               for mode in self.modes.values()))
        self.modes.clear()
        try:
            await self.guard.close()
        except Exception:  # keep stopping: the data plane must still be closed
            log.exception("stopping the join-port guard failed")
        await self.datapath.close()
        await self.registrars.stop()
        await self.watcher.stop()
        await self.control.close()
        self.traces.close_now()
        self.listeners.close()
        self.metrics.close()
        await self.notifier.close()
        log.info("stopped")

    def alive(self) -> bool:
        """Liveness for the watchdog: the reconcile task must still be running."""
        return self._reconciler is not None and not self._reconciler.done()

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), XDP_RECHECK_SECONDS)
            except TimeoutError:
                if not await self._xdp_outdated():
                    continue
            self._dirty.clear()
            try:
                await self.reconcile()
            except Exception:  # a bug in one pass must not stop later passes
                log.exception("reconcile failed")
                await asyncio.sleep(1)
                self._dirty.set()

    async def _xdp_outdated(self) -> bool:
        ipip = self.modes.get("ipip")
        if not isinstance(ipip, IpipMode):
            return False
        try:
            outdated = await ipip.xdp_outdated()
        except Exception as exc:  # never the end of the reconcile task; a kernel
            # error that persists is said by the next reconcile, which probes the same way
            log.debug("ipip: re-checking the XDP fast path: %s", exc)
            return False
        if outdated:
            log.info("ipip: the backbone's XDP flags or forwarding changed; reconciling")
        return outdated

    # -- the one place desired state is derived and applied ------------------------------------
    async def reconcile(self) -> None:
        # One pass at a time: the reconcile task, a reload and joinproxyctl window may all
        # ask for one, and a mode half-way through a pass must not be handed another.
        async with self._reconcile_lock:
            await self._reconcile()

    async def _reconcile(self) -> None:
        config = self.config
        registrar = self.registrars.active
        self.interfaces = desired_interfaces(config, self.links, registrar)
        wanted = {mode for spec in config.joins for mode in spec.modes}
        # One view of the registrars per pass: the modes are given it, and joining and the
        # announcements follow it (a registrar turning healthy mid-pass dirties the next).
        targets = self._targets = self.mode_targets()
        for name in sorted(set(self.modes) - wanted):
            await self.modes.pop(name).close(config.drain_seconds)
        for name in sorted(wanted):
            mode = self.modes.get(name)
            if mode is None:
                self.metrics.add_mode(name, flows=mode_class(name).keeps_flows)
                mode = self.modes[name] = mode_class(name)(self.context)
            await mode.reconcile([i for i in self.interfaces if name in i.modes],
                                 targets.get(name))
        if config.guard.enabled:
            self.metrics.drops.declare(GUARD_MODE)
        # The ipip XDP fast path runs behind the guard's program: with the guard off, that
        # program still goes on the links the fast path serves (relays/ipip_xdp.py).
        ipip = self.modes.get("ipip")
        fast = ipip.xdp_dispatch() if isinstance(ipip, IpipMode) else []
        # With no join link configured there is nothing to guard: nothing is loaded.
        guard = config.guard if config.joins else dataclasses.replace(config.guard,
                                                                      enabled=False)
        await self.guard.reconcile(guard, self.interfaces,
                                   guarded_ports(config, self.interfaces, registrar),
                                   dispatch=[i for i in self.interfaces if i.name in fast])
        if not config.needs_bpf and self.datapath.opened:
            await self.datapath.close()  # turned off by a reload: unload it all
        self._account_served()
        # Only what is bound, and has a mode with a healthy registrar, is announced: a link
        # whose listeners could not bind (the port is taken) is left out until a retry binds
        # them, a coaps link while no constrained registrar answers the DTLS probe, a circuit
        # link while no registrar answers on TCP. A link where no configured mode can serve
        # the pledges' addresses is not announced either.
        joinable = self.joinable() if self.window.open else []
        announced = [i for i in joinable if i.announce]
        joining = bool(announced)
        self.announcer.set_targets(announced if config.announce_grasp else [])
        self.announcer.set_enabled(joining and config.announce_grasp)
        await self._reconcile_mdns_advertiser(joining, announced)
        await self.core_join.set_targets(self._constrained_targets(
            joinable, bool(joinable), lambda mode: mode_class(mode).constrained))
        await self._reconcile_backbone()
        self._forget_gone_links()
        if self._metrics_listen is not None and not self._metrics_serving:
            self._serve_metrics()  # its retry is due (Listeners woke us)
        self.metrics.join_interfaces.set(len(self.served))
        self.metrics.listeners_unbound.set(len(self.listeners.failures))
        self._say_joining()
        self._export_mode_joining()
        self._notify()

    def mode_target(self, name: str) -> RegistrarEndpoint | None:
        """The registrar a mode relays to now: the active (TCP-healthy) one for circuit,
        nat66 and ipip; for a constrained mode the one whose UDP endpoint for it answered
        the DTLS probe (discovery/constrained.py), None while none does."""
        cls = mode_class(name)
        if cls.registrar_port == "cojp_port":
            return self._jrc_target()
        if cls.constrained:
            kind = {"coaps_port": "coaps", "jpy_port": "jpy"}.get(cls.registrar_port)
            return None if kind is None else self.constrained.endpoint_for(kind)
        return self.registrars.active

    def _jrc_target(self) -> RegistrarEndpoint | None:
        """The cojp mode's JRC: the one that answered the CoAP ping. Without the constrained
        discovery's libraries (aiocoap, pyOpenSSL) there is no such probe: the active
        registrar, if it is configured with a cojp_port, stands in (its TCP probe)."""
        if isinstance(self.constrained, NoConstrainedDiscovery):
            active = self.registrars.active
            return active if active is not None and active.cojp_port is not None else None
        return self.constrained.endpoint_for("cojp")

    @staticmethod
    def _unhealthy_text(name: str) -> str:
        if mode_class(name).registrar_port == "cojp_port":
            return "no JRC answers the CoAP ping"
        if mode_class(name).constrained:
            return "no constrained registrar answers the DTLS probe"
        return "no healthy registrar"

    def mode_targets(self) -> dict[str, RegistrarEndpoint | None]:
        wanted = sorted({mode for spec in self.config.joins for mode in spec.modes})
        return {name: self.mode_target(name) for name in wanted}

    def applied_targets(self) -> dict[str, RegistrarEndpoint | None]:
        """What the last reconcile gave each mode (what the relays really use); before the
        first one, what it would give."""
        return self._targets if self._targets is not None else self.mode_targets()

    def joinable(self) -> list[JoinInterface]:
        """The served links restricted to their modes with a healthy registrar."""
        healthy = {name for name, target in self.applied_targets().items()
                   if target is not None}
        return [view for i in self.served if (view := joinable_view(i, healthy)) is not None]

    @staticmethod
    def _target_text(name: str, target: RegistrarEndpoint) -> str:
        if mode_class(name).registrar_port == "cojp_port":
            return f"JRC [{target.address}]:{target.cojp_port}"
        if mode_class(name).constrained:
            port = getattr(target, mode_class(name).registrar_port)
            return f"constrained registrar [{target.address}]:{port}"
        return f"registrar {target.key}"

    def joining(self) -> tuple[bool, str]:
        """Whether pledges can join now, and why (not): a join link configured, the operator's
        join window open, and a served join link with a mode whose registrar is healthy (TCP
        probe for circuit, nat66, ipip; DTLS probe for coaps, jpy); announced only then."""
        if not self.config.joins:
            return False, NO_JOIN_LINK
        if not self.window.open:
            return False, f"join window closed by {self.window.by}"
        targets = self.applied_targets()
        if not any(targets.values()):
            by_why: dict[str, list[str]] = {}
            for m in targets:
                by_why.setdefault(self._unhealthy_text(m), []).append(m)
            if list(by_why) == ["no healthy registrar"]:
                return False, "no healthy registrar"
            return False, "; ".join(f"{text} ({', '.join(modes)})"
                                    for text, modes in by_why.items())
        if not self.served:
            return False, "no join link served"
        joinable = self.joinable()
        if not joinable:
            down = sorted({m for i in self.served for m in i.modes if targets.get(m) is None})
            return False, (f"no served join link has a mode with a healthy registrar "
                           f"(none for {', '.join(down)})")
        used = sorted({m for i in joinable for m in i.modes})
        via = []
        for name in used:
            target = targets[name]
            assert target is not None
            text = self._target_text(name, target)
            if text not in via:
                via.append(text)
        return True, f"on {', '.join(i.name for i in joinable)} via {', '.join(via)}"

    def joining_modes(self) -> dict[str, dict[str, Any]]:
        """Per configured mode: whether new pledges are taken, and the registrar or why not."""
        out: dict[str, dict[str, Any]] = {}
        served = {m for i in self.served for m in i.modes}
        for name, target in self.applied_targets().items():
            why = None
            if not self.window.open:
                why = f"join window closed by {self.window.by}"
            elif target is None:
                why = self._unhealthy_text(name)
            elif name not in served:
                why = "no join link served"
            out[name] = {"open": why is None, "reason": why,
                         "registrar": None if target is None
                         else self._target_text(name, target).split(" ")[-1]}
        return out

    def _export_mode_joining(self) -> None:
        """joinproxyd_mode_joining{mode}: joining_modes as a gauge; gone modes removed."""
        states = self.joining_modes()
        for name in self._modes_exported - set(states):
            self.metrics.mode_joining.remove(name)
        for name, state in states.items():
            self.metrics.mode_joining.labels(name).set(int(state["open"]))
        self._modes_exported = set(states)

    def _say_joining(self) -> None:
        """Log when joining opens or closes (once per change, with why)."""
        state = self.joining()
        if state[0] == self._joining_said:
            return
        first = self._joining_said is None
        self._joining_said = state[0]
        if state[0]:
            log.info("joining open %s", state[1])
        elif not first:
            log.warning("joining closed: %s", state[1])

    def _account_served(self) -> None:
        """What each mode really serves (a listener may have failed to bind), and why the
        configured links that are not served are not."""
        unserved: dict[str, dict[str, str]] = {}
        for name, mode in self.modes.items():
            for link, why in mode.unserved().items():
                unserved.setdefault(link, {})[name] = why
        self.unserved = unserved
        self.served = [view for i in self.interfaces
                       if (view := served_view(i, unserved.get(i.name, {}))) is not None]

    def _forget_gone_links(self) -> None:
        """Labelled metric series of links that no longer exist are removed."""
        present = set(self.links)
        for name in sorted(self._metric_links - present):
            self.metrics.forget_interface(name)
        self._metric_links = (self._metric_links & present) | {i.name for i in self.interfaces}

    def pending(self) -> list[str]:
        """Configured listeners not bound now: while any is, READY=1 is withheld."""
        return list(self._failures_text().values())

    def _failures_text(self) -> dict[tuple[str, str], str]:
        return {key: self.listeners.describe(*key) or "" for key in
                sorted(self.listeners.failures)}

    def _notify(self) -> None:
        """READY=1 once start-up is done and every configured listener is bound; STATUS=
        after every reconcile. Links that are missing, down or without a link-local address
        do not hold READY back (they are served when they come, like a hot-plugged link);
        a listener that cannot bind does, and if it never binds systemd's TimeoutStartSec
        fails the start (README, joinproxyd(8))."""
        summary = self.summary()
        if self._started and not self._ready and not self.pending():
            self._ready = True
            self.notifier.send(sdnotify.ready(summary))
            log.info("joinproxyd %s started: %s", __version__, summary)
            return
        if self._started and not self._ready:
            summary = "starting, waiting for listeners: " + summary
        self.notifier.send(sdnotify.status(summary))

    async def _reconcile_mdns_advertiser(self, joining: bool,
                                         announced: list[JoinInterface]) -> None:
        if self.config.announce_mdns and self.advertiser is None:
            self.advertiser = MdnsProxyAdvertiser(metrics=self.metrics, log=log)
            await self.advertiser.start()
        elif not self.config.announce_mdns and self.advertiser is not None:
            await self.advertiser.stop()
            self.advertiser = None
        if self.advertiser is not None:
            self.advertiser.set_targets(announced)
            self.advertiser.set_enabled(joining)

    async def _reconcile_backbone(self) -> None:
        """(Re)start registrar discovery on the backbone when its link (re)appears."""
        config = self.config
        backbone = self.links.get(config.backbone)
        self._say_backbone(link_problem(backbone))
        index = backbone.index if backbone is not None and backbone.ready else None
        want_grasp = index is not None and "grasp" in config.discovery
        want_mdns = index is not None and "mdns" in config.discovery
        moved = index != self._backbone_index
        if self.grasp_listener is not None and (moved or not want_grasp):
            await self.grasp_listener.stop()
            self.grasp_listener = None
        if self.mdns_browser is not None and (moved or not want_mdns):
            await self.mdns_browser.stop()
            self.mdns_browser = None
        self._backbone_index = index
        if not want_grasp:
            self.listeners.forget(config.backbone, "discovery-grasp")
        if not want_mdns:
            self.listeners.forget(config.backbone, "discovery-mdns")
        if (want_grasp and self.grasp_listener is None and index is not None
                and self.listeners.due(config.backbone, "discovery-grasp")):
            listener = GraspRegistrarListener(
                interface=config.backbone, ifindex=index, on_registrar=self.registrars.offer,
                metrics=self.metrics, log=log, on_flood=self.constrained.grasp_flood)
            try:
                await listener.start()
            except OSError as exc:  # the port held by a socket without SO_REUSEPORT, ...
                self.listeners.failed(config.backbone, "discovery-grasp",
                                      f"[ff02::13%{config.backbone}]:7017", exc)
            else:
                self.listeners.bound(config.backbone, "discovery-grasp")
                self.grasp_listener = listener
        if (want_mdns and self.mdns_browser is None and index is not None
                and self.listeners.due(config.backbone, "discovery-mdns")):
            browser = MdnsRegistrarBrowser(
                interface=config.backbone, ifindex=index, on_registrar=self.registrars.offer,
                on_gone=self.registrars.withdraw, metrics=self.metrics, log=log)
            try:
                await browser.start()
            except (OSError, RuntimeError) as exc:  # zeroconf: RuntimeError, no adapter
                self.listeners.failed(config.backbone, "discovery-mdns",
                                      f"[ff02::fb%{config.backbone}]:5353", exc)
            else:
                self.listeners.bound(config.backbone, "discovery-mdns")
                self.mdns_browser = browser
        # CoRE discovery only where the operator lists it ("coap" in registrars.discovery),
        # as every other source; mDNS _udp beside _tcp where a constrained mode is served.
        constrained = any(mode_class(m).constrained for spec in config.joins
                          for m in spec.modes)
        await self.constrained.reconcile_backbone(
            config.backbone, index, core="coap" in config.discovery,
            mdns=(constrained or "coap" in config.discovery) and want_mdns,
            core_interval=config.core_interval)

    def _say_backbone(self, problem: str | None) -> None:
        """Log once when the backbone becomes unusable (with what that stops), and once when
        it is back: joinproxyctl is not the only place an operator looks."""
        if problem == self._backbone_problem:
            return
        was, self._backbone_problem = self._backbone_problem, problem
        name = self.config.backbone
        if problem is None:
            if was is not None:
                log.info("backbone interface %s is usable again", name,
                         extra={"INTERFACE": name})
            return
        log.warning("backbone interface %s: %s; until it is usable: %s", name, problem,
                    "; ".join(self.backbone_stops()), extra={"INTERFACE": name,
                                                             "REASON": problem})

    def backbone_stops(self) -> list[str]:
        """What a missing or unusable backbone stops, for this configuration."""
        config = self.config
        out = [f"no registrar discovery by {m} on it" for m in config.discovery
               if m in ("grasp", "mdns")]
        wanted = {mode for spec in config.joins for mode in spec.modes}
        out += [f"{m} links do not relay (they need it)" for m in sorted(wanted)
                if m in ("ipip", "nat66")]
        if "static" in config.discovery:
            out.append("static registrars are still probed over whatever route exists")
        return out

    # -- reload ---------------------------------------------------------------------------------
    async def reload(self) -> bool:
        """SIGHUP: apply a new configuration without dropping established circuits."""
        if self.config_path is None:
            return False
        self._send_reload(sdnotify.reloading())
        try:
            new = config_mod.load(self.config_path)
            missing = features.missing_for(m for spec in new.joins for m in spec.modes)
            if missing is not None:
                raise ConfigError("join.modes", missing)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.metrics.reloads.labels("error").inc()
            self._send_reload(sdnotify.ready(self.summary()))
            return False
        old, self.config = self.config, new
        logs.set_level(new.log_level)
        for mode in self.modes.values():
            mode.limits_changed()
        self.registrars.reconfigure(static_endpoints(new), new.health_interval,
                                    new.health_timeout)
        self.constrained.reconfigure(static_endpoints(new), new.health_interval,
                                     new.health_timeout, new.constrained_mode)
        self.announcer.interval = new.announce_interval
        if new.metrics_listen != old.metrics_listen:
            self.metrics.close()
            self._serve_metrics()
        if new.control_socket != old.control_socket:
            await self.control.close()
            self.control.path = new.control_socket
            try:
                await self._start_control()
            except DaemonError as exc:
                log.error("reload: %s; joinproxyctl cannot reach this daemon until a reload "
                          "names a usable path", exc)
        if new.discovery != old.discovery or new.backbone != old.backbone:
            self._backbone_index = -1  # force discovery listeners to restart
        if new.join_window != old.join_window:
            # The key changed: the operator's newer word; otherwise joinproxyctl's stands.
            self._set_window(new.join_window == "open", "configuration reload")
        if (new.bpf_pin_dir, new.bpf_object_dir) != (old.bpf_pin_dir, old.bpf_object_dir):
            log.warning("daemon.bpf_pin_dir and daemon.bpf_object_dir take effect at the next "
                        "start; this run keeps %s", self.datapath.pin_dir)
        await self.reconcile()
        self.metrics.reloads.labels("ok").inc()
        log.info("configuration reloaded from %s", self.config_path)
        self._send_reload(sdnotify.ready(self.summary()))
        return True

    def _send_reload(self, message: bytes) -> None:
        """RELOADING=1 and the READY=1 that ends a reload, only once the daemon was ready:
        before that, READY=1 still means every listener is bound (_notify sends it)."""
        if self._ready:
            self.notifier.send(message)
        else:
            self._notify()

    def _serve_metrics(self) -> None:
        """Serve /metrics; a port that cannot be bound is retried with backoff (and holds
        READY back) like every listener."""
        listen = self.config.metrics_listen
        if listen != self._metrics_listen:
            self.listeners.forget("", "metrics")
        self._metrics_listen = listen
        self._metrics_serving = False
        if listen is None or not self.listeners.due("", "metrics", f"[{listen[0]}]:{listen[1]}"):
            return
        try:
            self.metrics.serve(listen)
        except OSError as exc:
            self.listeners.failed("", "metrics", f"[{listen[0]}]:{listen[1]}", exc)
            return
        self.listeners.bound("", "metrics")
        self._metrics_serving = True

    async def _start_control(self) -> None:
        """The control socket is a path of ours: if it cannot be made, waiting will not help
        (a directory's permissions, a full disk); say so in one line and exit."""
        try:
            await self.control.start()
        except OSError as exc:
            raise DaemonError(f"control socket {self.control.path}: "
                              f"{exc.strerror or exc}") from None

    # -- views ------------------------------------------------------------------------------------
    def summary(self) -> str:
        registrar = self.registrars.active
        names = ", ".join(f"{i.name}({'+'.join(i.modes)})" for i in self.served) or "none"
        if not self.config.joins:
            names = f"nothing ({NO_JOIN_LINK})"
        joining, why = self.joining()
        targets = self.applied_targets()
        out = f"serving {names}"
        if any(not mode_class(m).registrar_port for m in targets) or not targets:
            out += f"; registrar {registrar.key if registrar else 'none'}"
        constrained = [m for m in targets if mode_class(m).constrained]
        if "cojp" in targets:
            jrc = targets["cojp"]
            out += f"; JRC {'none' if jrc is None else self._target_text('cojp', jrc)[4:]}"
        if constrained:
            found = sorted({self._target_text(m, t).split(" ")[-1]
                            for m in constrained if (t := targets[m]) is not None})
            out += f"; constrained registrar {', '.join(found) or 'none'}"
        if not joining:
            out += f" (joining closed: {why})"
        problems = [f"{link} {why}" for link in sorted(self.unserved)
                    for why in self.unserved[link].values()]
        problems += [text for (link, mode), text in self._failures_text().items()
                     if mode not in self.unserved.get(link, {})]
        if not self.window.open:
            out += f"; join window CLOSED by {self.window.by}"
        if self._backbone_problem is not None:
            problems.append(f"backbone {self.config.backbone}: {self._backbone_problem}")
        return out + (f"; NOT SERVING: {'; '.join(problems)}" if problems else "")

    def unserved_links(self) -> list[dict[str, Any]]:
        """Configured join links that are not served at all, and why: present but down or
        without a link-local address, missing (names without wildcards only), or every
        listener failed to bind."""
        out: list[dict[str, Any]] = []
        served = {i.name for i in self.served}
        for i in self.interfaces:
            if i.name not in served:
                out.append({"name": i.name, "modes": list(i.modes),
                            "reason": "; ".join(self.unserved.get(i.name, {}).values())})
        for link in sorted(self.links.values(), key=lambda link: link.name):
            spec = self.config.join_spec_for(link.name)
            problem = link_problem(link)
            if spec is not None and problem is not None:
                out.append({"name": link.name, "modes": list(spec.modes), "reason": problem})
        named = [(p, spec) for spec in self.config.joins for p in spec.interfaces
                 if not any(c in p for c in "*?[")]
        for name, spec in named:
            if name not in self.links and name != self.config.backbone:
                out.append({"name": name, "modes": list(spec.modes), "reason": "missing"})
        return sorted(out, key=lambda entry: entry["name"])

    def status(self) -> dict[str, Any]:
        backbone = self.links.get(self.config.backbone)
        joining, why = self.joining()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.started,
            "joining": joining,
            "joining_reason": why,
            # per configured mode: open or not, the registrar it relays to, or why not
            "joining_modes": self.joining_modes(),
            "join_window": self.window.status(),
            "ready": self._ready,
            "backbone": {"name": self.config.backbone,
                         "ready": bool(backbone and backbone.ready),
                         "problem": link_problem(backbone),
                         "stops": self.backbone_stops() if link_problem(backbone) else []},
            # the links served (with the modes that serve them); modes that do not serve a
            # link and why are in not_serving, links not served at all in unserved
            "interfaces": [{"name": i.name, "index": i.index, "link_local": i.link_local,
                            "routable": list(i.routable), "modes": list(i.modes),
                            "port": i.port, "announce": list(i.announce),
                            "not_serving": self.unserved.get(i.name, {})}
                           for i in self.served],
            "unserved": self.unserved_links(),
            "listener_errors": self.listeners.status(),
            "registrars": self.registrars.status(),
            "core_join_discovery": self.core_join.status(),
            "constrained_registrars": self.constrained.status(),
            "relays": {name: mode.status() for name, mode in sorted(self.modes.items())},
            # per mode: flows, datagrams, bytes and drops by reason, as /metrics has them
            "traffic": self.traffic(),
            "guard": self.guard.status(),
            "trace": self.traces.status(),  # joinproxyctl trace: attached only while it runs
            "bpf": self.datapath.status(),
            "counters": self.counters(),
        }

    def counters(self) -> dict[str, float]:
        out = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") or family.type == "gauge":
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def traffic(self) -> dict[str, dict[str, Any]]:
        """Per relay mode (and per other drop-counting activity: guard, discovery, announce)
        what /metrics counts: flows open and opened (modes that keep flows), datagrams and
        bytes each way, and drops by reason (those not zero). Read from the same series."""
        for mode in self.modes.values():
            mode.sync_counters()
        metrics = self.metrics
        out: dict[str, dict[str, Any]] = {}

        def entry(mode: str) -> dict[str, Any]:
            return out.setdefault(mode, {"drops": {}})

        for name, mode in self.modes.items():
            if mode.keeps_flows:
                entry(name)["flows"] = {"active": 0 if mode.counts_active else None,
                                        "opened": 0}
        for labels, value in _samples(metrics.circuits_active):
            flows = entry(labels["mode"]).get("flows")
            if flows is not None and flows["active"] is not None:
                flows["active"] += int(value)
        for labels, value in _samples(metrics.circuits):
            entry(labels["mode"]).setdefault("flows", {"active": 0, "opened": 0})["opened"] \
                = int(value)
        for key, family in (("datagrams", metrics.relayed_datagrams),
                            ("bytes", metrics.relayed_bytes)):
            for labels, value in _samples(family):
                entry(labels["mode"]).setdefault(key, {})[labels["direction"]] = int(value)
        for (mode_name, reason), value in sorted(metrics.drops.values().items()):
            if value:
                entry(mode_name)["drops"][reason] = int(value)
        return {name: out[name] for name in sorted(out)}

    def circuit_list(self) -> list[dict[str, Any]]:
        return [{"mode": name, **c} for name, mode in sorted(self.modes.items())
                for c in mode.circuits()]

    # -- the operator's commands (joinproxyctl) ---------------------------------------------------
    def _set_window(self, open_: bool, who: str) -> bool:
        """Open or close the join window; logged once per change with who. The caller
        reconciles (relays, announcements, STATUS= follow)."""
        if not self.window.set(open_, who):
            return False
        self.metrics.join_window_open.set(int(open_))
        if open_:
            log.info("join window opened by %s", who)
        else:
            log.warning("join window closed by %s: new pledges are refused, announcements "
                        "stop, established circuits stay", who)
        return True

    async def window_command(self, request: Request) -> dict[str, Any]:
        """{"state": "open"|"close"} changes the window (and returns once the relays and
        announcers follow); no state just shows it."""
        state = request.args.get("state")
        if state is not None:
            if state not in ("open", "close", "closed"):
                raise ControlError(f"window: state must be open or close (got {state!r})")
            if self._set_window(state == "open", request.who):
                await self.reconcile()
        joining, why = self.joining()
        return {**self.window.status(), "joining": joining, "joining_reason": why}

    def refusal_list(self, request: Request) -> list[dict[str, Any]]:
        pledge = request.args.get("pledge")
        if pledge is not None and not isinstance(pledge, str):
            raise ControlError("refusals: pledge must be an address")
        return self.refusals.by_pledge(pledge)

    async def trace_command(self, request: Request) -> Any:
        """Stream drop reasons (trace.py) until the client closes the socket."""
        pledge = request.args.get("pledge")
        if pledge is not None and not isinstance(pledge, str):
            raise ControlError("trace: pledge must be an address")
        return await self.traces.subscribe(pledge, request.who)

    def _traced_links(self) -> dict[int, str]:
        """What `joinproxyctl trace` watches: the join links, the backbone and the ipip
        mode's kernel tunnels (a pledge's packet lives on its jpt device in between)."""
        links = {iface.index: iface.name for iface in self.interfaces}
        backbone = self.links.get(self.config.backbone)
        if backbone is not None:
            links[backbone.index] = backbone.name
        ipip = self.modes.get("ipip")
        if isinstance(ipip, IpipMode):
            for name in ipip.tunnel_names():
                with contextlib.suppress(OSError):  # removed since: nothing to watch
                    links[socket.if_nametoindex(name)] = name
        return links

    def drop_command(self, request: Request) -> list[dict[str, Any]]:
        """Close circuits by id (as `circuits` lists them), coaps flows by theirs (coaps-N),
        or every circuit and coaps flow of a pledge address; returns what was dropped. nat66
        flows live in conntrack, ipip keeps none."""
        target = request.args.get("circuit")
        if not isinstance(target, str) or not target.strip():
            raise ControlError("drop: give a circuit id (joinproxyctl circuits) or a pledge "
                               "address")
        target = target.strip()
        mode = self.modes.get("circuit")
        circuits = sorted(mode.open, key=lambda c: c.id) if isinstance(mode, CircuitMode) else []
        coaps = self.modes.get("coaps")
        flows = sorted(coaps.flows.values(), key=lambda f: f.id) \
            if isinstance(coaps, CoapsMode) else []
        if target.isdigit():
            chosen, chosen_flows = [c for c in circuits if c.id == int(target)], []
        elif target.startswith(COAPS_ID_PREFIX):
            chosen, chosen_flows = [], [f for f in flows if f.label == target]
        else:
            chosen = [c for c in circuits if pledge_key(c.pledge) == pledge_key(target)]
            chosen_flows = [f for f in flows if pledge_key(f.pledge_address) == pledge_key(target)]
        if not chosen and not chosen_flows:
            raise ControlError(f"drop: no open circuit {target!r} (ids and pledges: "
                               "joinproxyctl circuits; nat66 and ipip flows are the kernel's "
                               "and cannot be dropped here)")
        now = time.monotonic()
        out = [c.info(now) for c in chosen] + [f.info(now) for f in chosen_flows]
        for circuit in chosen:
            assert isinstance(mode, CircuitMode)
            mode.drop(circuit, request.who)
        for flow in chosen_flows:
            assert isinstance(coaps, CoapsMode)
            coaps.drop(flow, request.who)
        return out
