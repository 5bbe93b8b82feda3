"""The XDP join-port guard on every served join link, whatever its relay modes.

The guard (ebpf/guard.bpf.c) keeps a token bucket per (pledge address, join link) for the
packets sent to the join ports and drops what is over the rate, in XDP, before the stack or
any relay sees it. This is its control: the one place that says where it is attached and
what it is told.

    enabled   attached to every served join link; detached from a link that stops being
              served (a link that disappears takes its program with it), and from all at
              stop or when the guard is turned off by a reload
    rate      packets per second per source and link; burst the bucket's depth
    ports     the join ports of the served links: each link's announced port (for an ipip
              link that is the registrar's port, which pledges send to)
    dispatch  with the guard off, the links where the ipip mode's XDP fast path runs still
              get the program, told rate 0 (which limits nothing): its tail call into the
              fast path is the only way there (relays/ipip_xdp.py)

Reconciling is idempotent and cheap when nothing changed: the configuration map is written
only when its contents change, and a link is attached once per ifindex (a link that comes
back with a new ifindex is attached again). Drops are counted by the program (reason
rate-limit, or table-full when no bucket could be stored) and exported as
joinproxyd_drops_total{mode="guard"} by the control plane.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import GuardSettings
from .datapath import Datapath
from .kernel import KernelError
from .kernel.bpf import JP_GUARD_MAX_PORTS
from .model import JoinInterface

MODE = "guard"  # the mode label of its drops


class Guard:
    def __init__(self, datapath: Datapath, log: logging.Logger,
                 settings: GuardSettings | None = None) -> None:
        self.datapath = datapath
        self.log = log
        self.settings = settings or GuardSettings()
        self.attached: dict[str, int] = {}  # link name -> ifindex it was attached at
        self.modes: dict[str, str] = {}  # link name -> "native" | "generic"
        self.written: tuple[int, int, tuple[int, ...]] | None = None  # rate, burst, ports
        self.dispatcher = False  # attached only for the ipip XDP fast path (guard off)
        self.error: str | None = None

    async def reconcile(self, settings: GuardSettings, interfaces: Sequence[JoinInterface],
                        ports: Sequence[int], dispatch: Sequence[JoinInterface] = ()) -> None:
        """Guard exactly these links, watching these ports; with the guard off, only be the
        XDP dispatcher on the `dispatch` links (see the module docstring)."""
        self.settings = settings
        self.dispatcher = not settings.enabled and bool(dispatch)
        if not settings.enabled and not dispatch:
            await self._detach_all()
            return
        if self.dispatcher:
            interfaces, ports = dispatch, ()
        try:
            dp = await self.datapath.get()
        except KernelError as exc:
            self._failed(f"the join-port guard cannot run: {exc}")
            return
        ports = sorted(set(ports))
        errors = []
        if len(ports) > JP_GUARD_MAX_PORTS:
            errors.append(f"the guard watches at most {JP_GUARD_MAX_PORTS} join ports; "
                          f"ports {ports[JP_GUARD_MAX_PORTS:]} are not guarded")
            ports = ports[:JP_GUARD_MAX_PORTS]
        # rate 0: the program limits nothing (and still tail-calls the fast path)
        wanted = (0, 1, ()) if self.dispatcher else \
            (settings.rate, settings.burst, tuple(ports))
        if wanted != self.written:
            try:
                # Written before attaching: a new link is never guarded by stale settings.
                await asyncio.to_thread(dp.set_guard, *wanted)
            except (KernelError, ValueError) as exc:
                errors.append(f"guard settings: {exc}")
            else:
                if self.dispatcher:
                    self.log.info("join-port guard off; its XDP program stays on the ipip "
                                  "links, limiting nothing, to hand packets to the XDP fast "
                                  "path", extra={"MODE": MODE})
                elif self.written is not None:
                    self.log.info("join-port guard: %d packets/s, burst %d, ports %s",
                                  settings.rate, settings.burst,
                                  ",".join(map(str, ports)) or "none")
                self.written = wanted
        desired = {i.name: i.index for i in interfaces}
        for name, index in list(self.attached.items()):
            if desired.get(name) != index:
                await self._detach(name, index)
        for name, index in desired.items():
            if self.attached.get(name) == index:
                continue
            try:
                mode = await asyncio.to_thread(dp.attach_guard, index)
            except KernelError as exc:
                errors.append(f"{name}: {exc}")
                continue
            self.attached[name] = index
            self.modes[name] = mode
            if self.dispatcher:
                self.log.info("join-port guard's program on %s (XDP %s) as the ipip fast "
                              "path's dispatcher, limiting nothing (guard.enabled = false)",
                              name, mode, extra={"INTERFACE": name, "MODE": MODE})
            else:
                self.log.info("join-port guard on %s (XDP %s): %d packets/s per source, "
                              "burst %d", name, mode, settings.rate, settings.burst,
                              extra={"INTERFACE": name, "MODE": MODE})
        if errors:
            self._failed("; ".join(errors))
        else:
            self.error = None

    async def _detach(self, name: str, index: int) -> None:
        self.attached.pop(name, None)
        self.modes.pop(name, None)
        if not self.datapath.opened:
            return
        try:
            dp = await self.datapath.get()
            await asyncio.to_thread(dp.detach_guard, index)
        except KernelError as exc:
            self._failed(f"{name}: {exc}")
            return
        self.log.info("join-port guard removed from %s", name,
                      extra={"INTERFACE": name, "MODE": MODE})

    async def _detach_all(self) -> None:
        for name, index in list(self.attached.items()):
            await self._detach(name, index)
        self.written = None

    async def close(self) -> None:
        await self._detach_all()

    def _failed(self, message: str) -> None:
        if message != self.error:  # once per distinct failure, not at every reconcile
            self.log.error("%s", message, extra={"MODE": MODE})
        self.error = message

    def status(self) -> dict[str, Any]:
        s = self.settings
        # running: enabled and on every link it should be; else error says why not (a
        # missing libbpf names the package to install)
        return {"enabled": s.enabled, "running": s.enabled and self.error is None,
                "rate": s.rate, "burst": s.burst,
                "ports": list(self.written[2]) if self.written else [],
                "interfaces": {name: self.modes.get(name) for name in sorted(self.attached)},
                "error": self.error}


class GuardRunning(Collector):
    """joinproxyd_guard_running: 1 while the enabled guard runs, 0 while it cannot (a missing
    libbpf, say; joinproxyctl status gives the reason); absent while it is off. Read at
    scrape time from the metrics thread: two attribute reads, no lock needed."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "joinproxyd_guard_running",
            "1 while the enabled join-port guard runs, 0 while it cannot (see joinproxyctl "
            "status)")
        if self.guard.settings.enabled:
            family.add_metric([], 0 if self.guard.error is not None else 1)
        yield family
