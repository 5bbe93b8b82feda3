"""The control plane: the one owner of configuration, links, registrars, relays and counters.

Everything that changes (a link, an address, the active registrar, the configuration) only
marks the desired state dirty; one reconcile task then derives the desired state and hands
each relay mode, announcer and discovery listener exactly what it should serve. Reconciling
is idempotent, so a burst of netlink events costs one pass.

Joining is open while a registrar is healthy: announcements go out and new circuits are
admitted. Without one, announcements stop and new circuits are refused (counted), while
established circuits are left alone.

The BPF data plane (datapath.py) is opened only when something runs in it: the join-port
guard (guard.py, on every served join link whatever its modes; with the guard off, on the
links where the ipip XDP fast path runs, as its dispatcher) or an ipip link. After the
first full reconcile, programs of ours on hooks this process did not attach (a killed run's)
are removed, so each hook holds exactly one.
"""

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from . import __version__, logs, sdnotify
from . import config as config_mod
from .aio import cancel_and_wait
from .config import Config, ConfigError
from .control import ControlServer
from .datapath import Datapath
from .discovery.announce import ProxyAnnouncer
from .discovery.grasp import GraspRegistrarListener
from .discovery.mdns import MdnsProxyAdvertiser, MdnsRegistrarBrowser
from .discovery.registrars import RegistrarSet
from .guard import MODE as GUARD_MODE
from .guard import Guard, GuardRunning
from .kernel import features
from .kernel.bpf import Program
from .kernel.netlink import InterfaceWatcher
from .metrics import Metrics
from .model import JoinInterface, LinkState, RegistrarEndpoint
from .relays import RelayContext, RelayMode, ipip_knobs, mode_class, mode_names
from .relays.ipip import IpipMode, usable_target

log = logging.getLogger("joinproxyd")
# How often the ipip XDP fast path's "auto" looks at the backbone again between reconciles:
# its xdp_features and forwarding knob change without an event the daemon listens to.
XDP_RECHECK_SECONDS = 5.0
# The clsact qdiscs this daemon added, beside the control socket (kernel/qdisc_record.py).
QDISC_RECORD_NAME = "clsact.json"


def static_endpoints(config: Config) -> list[RegistrarEndpoint]:
    return [RegistrarEndpoint(r.preference, r.address, r.port, source="static", ipip=r.ipip)
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
    """The ports the guard watches: each link's join port, and every port an ipip link
    relays (the registrar may take more than the one announced)."""
    ports = {i.port for i in interfaces}
    target, _ = usable_target(registrar, config.ipip.protocol)
    if target is not None and any("ipip" in i.modes for i in interfaces):
        ports.update(target.ports)
    return sorted(ports)


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
        self.metrics.register(GuardRunning(self.guard))
        self.context = RelayContext(self.metrics, lambda: self.config.limits,
                                    lambda: self.links.get(self.config.backbone), log,
                                    datapath=self.datapath, ipip=lambda: self.config.ipip)
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
        self.grasp_listener: GraspRegistrarListener | None = None
        self.mdns_browser: MdnsRegistrarBrowser | None = None
        self._backbone_index: int | None = None
        self.control = ControlServer(config.control_socket, {
            "status": self.status, "circuits": self.circuit_list})
        self._dirty = asyncio.Event()
        self._stop = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._metrics_listen: tuple[str, int] | None = None

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
            log.warning("no healthy registrar: joining closed, new circuits refused",
                        extra={"REGISTRAR": "none"})
        else:
            log.info("registrar %s (%s) is active: joining open", registrar.key,
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
            self.notifier.send(sdnotify.ready(self.summary()))
            log.info("joinproxyd %s started: %s", __version__, self.summary())
            self.notifier.start_watchdog(self.alive)
            await self._stop.wait()
        finally:
            await self.stop()
        return 0

    async def start(self) -> None:
        self.links = await self.watcher.start()
        wanted = {mode for spec in self.config.joins for mode in spec.modes}
        for name in mode_names():
            if name not in wanted:
                await mode_class(name).clean_leftovers(log)
        if "ipip" not in wanted:
            # The join links' sysctls a killed ipip run changed; their record is a file in
            # the runtime directory, which clean_leftovers (a classmethod) is not told of.
            await ipip_knobs.restore_leftovers(self.config.ipip.knob_record, log)
        if not self.config.needs_bpf:
            await self.datapath.clean_leftovers()
        await self.control.start()
        self._serve_metrics()
        await self.registrars.start()
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
        config = self.config
        registrar = self.registrars.active
        self.interfaces = desired_interfaces(config, self.links, registrar)
        wanted = {mode for spec in config.joins for mode in spec.modes}
        for name in sorted(set(self.modes) - wanted):
            await self.modes.pop(name).close(config.drain_seconds)
        for name in sorted(wanted):
            mode = self.modes.get(name)
            if mode is None:
                self.metrics.add_mode(name)
                mode = self.modes[name] = mode_class(name)(self.context)
            await mode.reconcile([i for i in self.interfaces if name in i.modes], registrar)
        if config.guard.enabled:
            self.metrics.drops.declare(GUARD_MODE)
        # The ipip XDP fast path runs behind the guard's program: with the guard off, that
        # program still goes on the links the fast path serves (relays/ipip_xdp.py).
        ipip = self.modes.get("ipip")
        fast = ipip.xdp_dispatch() if isinstance(ipip, IpipMode) else []
        await self.guard.reconcile(config.guard, self.interfaces,
                                   guarded_ports(config, self.interfaces, registrar),
                                   dispatch=[i for i in self.interfaces if i.name in fast])
        if not config.needs_bpf and self.datapath.opened:
            await self.datapath.close()  # turned off by a reload: unload it all
        joining = registrar is not None
        # A link where no configured mode can serve the pledges' addresses is not announced.
        announced = [i for i in self.interfaces if i.announce]
        self.announcer.set_targets(announced if config.announce_grasp else [])
        self.announcer.set_enabled(joining and config.announce_grasp)
        await self._reconcile_mdns_advertiser(joining)
        await self._reconcile_backbone()
        self.metrics.join_interfaces.set(len(self.interfaces))
        self.notifier.send(sdnotify.status(self.summary()))

    async def _reconcile_mdns_advertiser(self, joining: bool) -> None:
        if self.config.announce_mdns and self.advertiser is None:
            self.advertiser = MdnsProxyAdvertiser(metrics=self.metrics, log=log)
            await self.advertiser.start()
        elif not self.config.announce_mdns and self.advertiser is not None:
            await self.advertiser.stop()
            self.advertiser = None
        if self.advertiser is not None:
            self.advertiser.set_targets([i for i in self.interfaces if i.announce])
            self.advertiser.set_enabled(joining)

    async def _reconcile_backbone(self) -> None:
        """(Re)start registrar discovery on the backbone when its link (re)appears."""
        config = self.config
        backbone = self.links.get(config.backbone)
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
        if want_grasp and self.grasp_listener is None and index is not None:
            self.grasp_listener = GraspRegistrarListener(
                interface=config.backbone, ifindex=index, on_registrar=self.registrars.offer,
                metrics=self.metrics, log=log)
            await self.grasp_listener.start()
        if want_mdns and self.mdns_browser is None and index is not None:
            self.mdns_browser = MdnsRegistrarBrowser(
                interface=config.backbone, ifindex=index, on_registrar=self.registrars.offer,
                on_gone=self.registrars.withdraw, metrics=self.metrics, log=log)
            await self.mdns_browser.start()

    # -- reload ---------------------------------------------------------------------------------
    async def reload(self) -> bool:
        """SIGHUP: apply a new configuration without dropping established circuits."""
        if self.config_path is None:
            return False
        self.notifier.send(sdnotify.reloading())
        try:
            new = config_mod.load(self.config_path)
            missing = features.missing_for(m for spec in new.joins for m in spec.modes)
            if missing is not None:
                raise ConfigError("join.modes", missing)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.metrics.reloads.labels("error").inc()
            self.notifier.send(sdnotify.ready(self.summary()))
            return False
        old, self.config = self.config, new
        logs.set_level(new.log_level)
        for mode in self.modes.values():
            mode.limits_changed()
        self.registrars.reconfigure(static_endpoints(new), new.health_interval,
                                    new.health_timeout)
        self.announcer.interval = new.announce_interval
        if new.metrics_listen != old.metrics_listen:
            self.metrics.close()
            self._serve_metrics()
        if new.control_socket != old.control_socket:
            await self.control.close()
            self.control.path = new.control_socket
            await self.control.start()
        if new.discovery != old.discovery or new.backbone != old.backbone:
            self._backbone_index = -1  # force discovery listeners to restart
        if (new.bpf_pin_dir, new.bpf_object_dir) != (old.bpf_pin_dir, old.bpf_object_dir):
            log.warning("daemon.bpf_pin_dir and daemon.bpf_object_dir take effect at the next "
                        "start; this run keeps %s", self.datapath.pin_dir)
        await self.reconcile()
        self.metrics.reloads.labels("ok").inc()
        log.info("configuration reloaded from %s", self.config_path)
        self.notifier.send(sdnotify.ready(self.summary()))
        return True

    def _serve_metrics(self) -> None:
        listen = self.config.metrics_listen
        self._metrics_listen = listen
        if listen is None:
            return
        try:
            self.metrics.serve(listen)
        except OSError as exc:
            log.error("metrics endpoint [%s]:%d unavailable: %s", *listen,
                      exc.strerror or exc)

    # -- views ------------------------------------------------------------------------------------
    def summary(self) -> str:
        registrar = self.registrars.active
        names = ", ".join(f"{i.name}({'+'.join(i.modes)})" for i in self.interfaces) or "none"
        return (f"serving {names}; registrar "
                f"{registrar.key if registrar else 'none (joining closed)'}")

    def status(self) -> dict[str, Any]:
        backbone = self.links.get(self.config.backbone)
        active = self.registrars.active
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.started,
            "joining": active is not None,
            "backbone": {"name": self.config.backbone,
                         "ready": bool(backbone and backbone.ready)},
            "interfaces": [{"name": i.name, "index": i.index, "link_local": i.link_local,
                            "routable": list(i.routable), "modes": list(i.modes),
                            "port": i.port, "announce": list(i.announce)}
                           for i in self.interfaces],
            "registrars": self.registrars.status(),
            "relays": {name: mode.status() for name, mode in sorted(self.modes.items())},
            "guard": self.guard.status(),
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

    def circuit_list(self) -> list[dict[str, Any]]:
        return [{"mode": name, **c} for name, mode in sorted(self.modes.items())
                for c in mode.circuits()]
