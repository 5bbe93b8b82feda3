"""`joinproxyctl trace [PLEDGE]`: live drop reasons for one pledge address or all, from the
daemon, for as long as somebody asks.

The daemon, not joinproxyctl, loads and attaches the tracer (kernel/drop_trace.py): one
control plane owns the data plane (design.md), knows which links are join links and which is
the backbone, and holds the counters of our own programs and the refusals of the user-space
relays. joinproxyctl only asks on the control socket and prints what streams back.

The tracepoint program is attached when the first trace starts and detached when the last
one ends (its client closed the socket: Ctrl-C), so the kernel runs nothing for it while
nobody traces. Four sources feed one stream:

- ``kernel``: skb:kfree_skb on the join links, the backbone and the ipip mode's kernel
  tunnels (``jpt<ifindex>``), with the kernel's reason
  (its name from the running kernel's BTF) and the packet's addresses and ports;
- ``jp_guard``: the XDP guard's drops per source (its per-source buckets count them). XDP
  drops happen before the kernel builds an skb, so kfree_skb never sees them;
- ``jp_*``: our other programs' drop counters (ipip, jpy), as deltas; they do not say which
  pledge, so a trace of one pledge leaves them out;
- ``refusal``: the user-space relays' refusals (flow and circuit limits, window, ...), from
  the refusal log `joinproxyctl refusals` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from .control import ControlError
from .datapath import Datapath
from .kernel import KernelError
from .kernel.drop_trace import Drop, DropTracer, KernelSymbols, drop_reason_names, netns_inode
from .window import RefusalLog, pledge_key

POLL_SECONDS = 0.25  # how often counters, guard buckets and refusals are compared
QUEUE_MAX = 4096  # events a slow client may fall behind by; more are dropped and counted


def canonical(address: str) -> str:
    """The address as compare-able text: no brackets, zone or port, IPv6 compressed."""
    text = pledge_key(address)
    with contextlib.suppress(ValueError):
        addr = ipaddress.ip_address(text)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(addr)
    return text


class _Subscriber:
    def __init__(self, pledge: str | None) -> None:
        self.pledge = pledge
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_MAX)
        self.lost = 0

    def offer(self, event: dict[str, Any]) -> None:
        wanted = self.pledge
        if wanted is not None and wanted not in event.get("pledges", ()):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost += 1


class TraceHub:
    """The tracer, shared by every `joinproxyctl trace` running at the time."""

    def __init__(self, datapath: Datapath, refusals: RefusalLog,
                 devices: Callable[[], dict[int, str]], obj_dir: Path | None,
                 log: logging.Logger) -> None:
        self.datapath = datapath
        self.refusals = refusals
        self.devices = devices  # ifindex -> name: join links, backbone, tunnels
        self.obj_dir = obj_dir
        self.log = log
        self.subscribers: list[_Subscriber] = []
        self.tracer: DropTracer | None = None
        self._names: dict[int, str] = {}
        self._symbols: KernelSymbols | None = None
        self._poller: asyncio.Task[None] | None = None
        self._watched: dict[int, str] = {}
        self._counters: dict[tuple[str, str], int] = {}
        self._guard: dict[tuple[str, int, int], int] = {}
        self._last_refusal: object | None = None

    @property
    def attached(self) -> bool:
        return self.tracer is not None and self.tracer.attached

    def status(self) -> dict[str, Any]:
        return {"attached": self.attached, "tracing": len(self.subscribers),
                "links": sorted(self._watched.values())}

    async def subscribe(self, pledge: str | None, who: str) -> AsyncIterator[dict[str, Any]]:
        """Start a trace (attaching the tracer if it is the first); the events as they come.
        Closing the iterator ends the trace (detaching the tracer if it was the last)."""
        wanted = canonical(pledge) if pledge is not None else None
        if wanted is not None:
            try:
                ipaddress.ip_address(wanted)
            except ValueError:
                raise ControlError(f"trace: {pledge!r} is not an IP address") from None
        if self.tracer is None:
            await self._start()
        sub = _Subscriber(wanted)
        self.subscribers.append(sub)
        self.log.info("drop trace started by %s (%s)", who, wanted or "every pledge")
        return self._events(sub, who)

    async def _events(self, sub: _Subscriber, who: str) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"pledge": sub.pledge, "links": sorted(self._watched.values()),
                   "attached": self.attached}
            while True:
                event = await sub.queue.get()
                if sub.lost:
                    yield {"source": "trace", "reason": "lost", "count": sub.lost,
                           "time": time.time()}
                    sub.lost = 0
                yield event
        finally:
            self.subscribers.remove(sub)
            self.log.info("drop trace by %s ended", who)
            if not self.subscribers:
                await self._stop()

    async def _start(self) -> None:
        try:
            self._names = await asyncio.to_thread(drop_reason_names)
            self._symbols = await asyncio.to_thread(KernelSymbols)
            self.tracer = await asyncio.to_thread(DropTracer, self.obj_dir)
        except KernelError as exc:
            raise ControlError(f"trace: cannot attach the drop tracer: "
                               f"{str(exc).splitlines()[0]}") from None
        self._watched = {}
        self._update_devices()
        self._counters = self._our_counters()
        self._guard = self._guard_sources()
        self._last_refusal = self.refusals.entries[-1] if self.refusals.entries else None
        asyncio.get_running_loop().add_reader(self.tracer.fileno(), self._drain)
        self._poller = asyncio.create_task(self._poll_forever(), name="drop-trace-poll")
        self.log.info("drop tracer attached to skb:kfree_skb")

    async def _stop(self) -> None:
        tracer, self.tracer = self.tracer, None
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if tracer is not None:
            with contextlib.suppress(ValueError, OSError, KernelError):
                asyncio.get_running_loop().remove_reader(tracer.fileno())
            tracer.close()
            self.log.info("drop tracer detached (nobody traces)")
        self._watched = {}

    def close_now(self) -> None:
        """At daemon stop: detach whatever traces still run."""
        if self.tracer is not None:
            with contextlib.suppress(ValueError, OSError, KernelError):
                asyncio.get_running_loop().remove_reader(self.tracer.fileno())
            self.tracer.close()
            self.tracer = None
        if self._poller is not None:
            self._poller.cancel()

    # -- the sources ----------------------------------------------------------------------
    def _publish(self, event: dict[str, Any]) -> None:
        event.setdefault("time", time.time())
        for sub in self.subscribers:
            sub.offer(event)

    def _drain(self) -> None:
        if self.tracer is None:
            return
        try:
            drops = self.tracer.read()
        except KernelError as exc:
            self.log.warning("drop trace: reading the ring buffer: %s", exc)
            return
        for drop in drops:
            self._publish(self._kernel_event(drop))

    def _kernel_event(self, drop: Drop) -> dict[str, Any]:
        where = self._symbols.name(drop.location) if self._symbols is not None else None
        return {"source": "kernel",
                "reason": self._names.get(drop.reason, f"reason {drop.reason}"),
                "interface": self._watched.get(drop.ifindex, str(drop.ifindex)),
                **({"where": where} if where else {}),
                "length": drop.length, "packet": drop.packet.describe(),
                "pledges": sorted(canonical(a) for a in drop.packet.addresses())}

    def _update_devices(self) -> None:
        devices = self.devices()
        if devices != self._watched and self.tracer is not None:
            ns = netns_inode()
            self.tracer.watch((ns, index) for index in devices)
            self._watched = dict(devices)

    def _our_counters(self) -> dict[tuple[str, str], int]:
        return self.datapath.drops_by_program()

    def _guard_sources(self) -> dict[tuple[str, int, int], int]:
        return self.datapath.guard_drops_by_source()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                await self._poll()
            except Exception:  # a trace must not take the daemon down
                self.log.exception("drop trace: polling")

    async def _poll(self) -> None:
        self._update_devices()
        counters = await asyncio.to_thread(self._our_counters)
        for (program, reason), value in counters.items():
            delta = value - self._counters.get((program, reason), 0)
            # the guard's rate-limit drops are reported per source below
            if delta > 0 and not (program == "jp_guard" and reason == "rate-limit"):
                self._publish({"source": program, "reason": reason, "count": delta,
                               "pledges": []})
        self._counters = counters
        guard = await asyncio.to_thread(self._guard_sources)
        for (source, ifindex, proto), value in guard.items():
            delta = value - self._guard.get((source, ifindex, proto), 0)
            if delta > 0:
                self._publish({"source": "jp_guard", "reason": "rate-limit", "count": delta,
                               "interface": self._watched.get(ifindex, str(ifindex)),
                               "packet": {"src": source,
                                          "proto": {6: "tcp", 17: "udp"}.get(proto, str(proto))},
                               "pledges": [canonical(source)]})
        self._guard = guard
        entries = list(self.refusals.entries)
        start = 0
        for i in range(len(entries) - 1, -1, -1):
            if entries[i] is self._last_refusal:
                start = i + 1
                break
        for entry in entries[start:]:
            self._publish({"source": "refusal", "reason": entry.reason, "mode": entry.mode,
                           "interface": entry.interface, "packet": {"src": entry.pledge},
                           "pledges": [canonical(entry.pledge)], "time": entry.at})
        if entries:
            self._last_refusal = entries[-1]


def render_event(event: dict[str, Any]) -> str:
    """One line per event, as `joinproxyctl trace` prints it."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", time.time())))
    packet = event.get("packet") or {}
    parts = [stamp, f"{event.get('source', '?')}:", str(event.get("reason", "?"))]
    if event.get("count", 1) != 1:
        parts.append(f"x{event['count']}")
    if "where" in event:
        parts.append(f"in {event['where']}")
    if "interface" in event:
        parts.append(f"on {event['interface']}")
    if "mode" in event:
        parts.append(f"({event['mode']})")

    def flow(p: dict[str, Any]) -> str:
        src, dst = p.get("src", "?"), p.get("dst")
        text = f"{p.get('proto', '')} {src}"
        if p.get("sport") is not None:
            text += f" port {p['sport']}"
        if dst:
            text += f" -> {dst}"
            if p.get("dport") is not None:
                text += f" port {p['dport']}"
        if "type" in p:
            text += f" type {p['type']} code {p.get('code')}"
        return text.strip()

    if packet:
        parts.append(flow(packet))
        if "inner" in packet:
            parts.append(f"[inner {flow(packet['inner'])}]")
    return " ".join(parts)
