"""The XDP join-port guard on every served join link, whatever its relay modes.

The guard (ebpf/guard.bpf.c) keeps a token bucket per (pledge address, join link) for the
packets sent to the join ports and drops what is over the rate, in XDP, before the stack or
any relay sees it. This is its control: the one place that says where it is attached and
what it is told.

    enabled   attached to every served join link; detached from a link that stops being
              served (a link that disappears takes its program with it), and from all at
              stop or when the guard is turned off by a reload
    rates     per source and link: UDP datagrams (rate, burst) and TCP SYNs, i.e. new
              connections (syn_rate, syn_burst); other TCP segments are never limited, so a
              pledge's connection never loses a segment to the guard
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

Who is dropped: each bucket also counts its own drops. While the guard drops anything (its
total drop counter moved), every REPORT_SECONDS the control walks the buckets and logs each
source that started losing packets since the last look, once per episode (a source that
stops and starts again is logged again), at most REPORT_LINES sources a look; status()
lists the sources that lost the most.
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
from .kernel.bpf_layout import JP_GUARD_MAX_PORTS, Program
from .model import JoinInterface

MODE = "guard"  # the mode label of its drops
REPORT_SECONDS = 5.0
REPORT_LINES = 10
PROTOCOLS = {6: "TCP SYNs", 17: "UDP datagrams"}


class Guard:
    def __init__(self, datapath: Datapath, log: logging.Logger,
                 settings: GuardSettings | None = None) -> None:
        self.datapath = datapath
        self.log = log
        self.settings = settings or GuardSettings()
        self.attached: dict[str, int] = {}  # link name -> ifindex it was attached at
        self.modes: dict[str, str] = {}  # link name -> "native" | "generic"
        # rate, burst, ports[, syn_rate, syn_burst]: what the kernel's map holds
        self.written: tuple[Any, ...] | None = None
        self.dispatcher = False  # attached only for the ipip XDP fast path (guard off)
        self.error: str | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._drops_seen = 0  # the guard's total drop count at the last look
        self._by_source: dict[tuple[str, int, int], int] = {}  # drops at the last look
        self._dropping: set[tuple[str, int, int]] = set()  # sources losing packets now
        self.top: list[dict[str, Any]] = []  # the sources that lost the most

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
        wanted: tuple[Any, ...] = (0, 1, ()) if self.dispatcher else \
            (settings.rate, settings.burst, tuple(ports), settings.syn_rate, settings.syn_burst)
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
                    self.log.info("join-port guard: UDP %d datagrams/s, burst %d; TCP %d "
                                  "SYNs/s, burst %d; ports %s", settings.rate, settings.burst,
                                  settings.syn_rate, settings.syn_burst,
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
                self.log.info("join-port guard on %s (XDP %s), per source: UDP %d "
                              "datagrams/s, burst %d; TCP %d SYNs/s, burst %d", name, mode,
                              settings.rate, settings.burst, settings.syn_rate,
                              settings.syn_burst, extra={"INTERFACE": name, "MODE": MODE})
        if errors:
            self._failed("; ".join(errors))
        else:
            self.error = None
        if self.attached and not self.dispatcher and \
                (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.create_task(self._report_forever(), name="guard-drops")

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            try:
                await self.report_drops()
            except KernelError as exc:
                self._failed(f"cannot read the guard's drops by source: {exc}")

    async def report_drops(self) -> None:
        """Log the sources that started losing packets since the last look (see the module
        docstring); cheap when the guard dropped nothing since."""
        total = sum(self.datapath.kernel_drops((Program.GUARD,)).values())
        if total == self._drops_seen:
            self._dropping = set()  # every episode is over
            return
        self._drops_seen = total
        dp = await self.datapath.get()
        now = await asyncio.to_thread(dp.guard_drops_by_source)
        rising = {key for key, count in now.items() if count > self._by_source.get(key, 0)}
        started = sorted(rising - self._dropping, key=lambda key: -now[key])
        names = {index: name for name, index in self.attached.items()}
        for source, index, proto in started[:REPORT_LINES]:
            rate, burst = (self.settings.syn_rate, self.settings.syn_burst) if proto == 6 \
                else (self.settings.rate, self.settings.burst)
            name = names.get(index, f"ifindex {index}")
            self.log.warning(
                "join-port guard drops %s from %s on %s: over %d/s, burst %d (%d dropped "
                "so far)", PROTOCOLS.get(proto, f"protocol {proto}"), source, name, rate, burst,
                now[(source, index, proto)],
                extra={"INTERFACE": name, "MODE": MODE, "PLEDGE": source,
                       "REASON": "rate-limit"})
        if len(started) > REPORT_LINES:
            self.log.warning("join-port guard drops packets from %d more sources",
                             len(started) - REPORT_LINES, extra={"MODE": MODE})
        self._dropping, self._by_source = rising, now
        self.top = [{"source": source, "interface": names.get(index, index),
                     "protocol": {6: "tcp", 17: "udp"}.get(proto, proto), "drops": count}
                    for (source, index, proto), count
                    in sorted(now.items(), key=lambda item: -item[1])[:REPORT_LINES]]

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
        if self._reporter is not None and not self._reporter.done():
            self._reporter.cancel()
            await asyncio.wait([self._reporter])
        self._reporter = None
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
                "syn_rate": s.syn_rate, "syn_burst": s.syn_burst,
                "ports": list(self.written[2]) if self.written else [],
                "interfaces": {name: self.modes.get(name) for name in sorted(self.attached)},
                "dropped_most": self.top, "error": self.error}


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
