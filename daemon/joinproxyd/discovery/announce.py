"""Telling pledges where the proxy is: GRASP M_FLOOD AN_Proxy on every join link (RFC 8995 §4.1.1).

While announcing is enabled (the control plane enables it only while a registrar is healthy,
so pledges are never lured to a proxy that cannot relay), each target interface gets
``["AN_Proxy", 4, 1, ""]`` with ``[O_IPv6_LOCATOR, <its link-local>, 6, <join port>]`` sent to
[ff02::13%iface]:7017 at once, then every ``interval`` seconds with ±10 % jitter so proxies
that started together do not stay in step.

One UDP socket serves every join link: IPV6_PKTINFO on each datagram names the outgoing
interface and the source address, which is the link-local the locator announces (the same
effect as IPV6_MULTICAST_IF, without a setsockopt per send). Hop limit 1 as graspy (the
reference GRASP implementation) does for DULL; the group is link-local, so nothing forwards
it anyway. The socket sends from an ephemeral port: GRASP receivers listen on 7017 and do not
care where a flood comes from, and not binding 7017 means the announcer never competes with
our registrar listener or another GRASP stack for that port. The socket exists only while
there is something to announce.

A failed send is counted and logged, never raised: the link may be going away, and the next
reconcile will drop it from the targets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv6Address
from typing import Any, Final

from brski import grasp as wire
from brski.errors import UsageError

from ..aio import cancel_and_wait, woken_or_timeout
from ..metrics import Metrics
from ..model import DropReason, JoinInterface
from .peerlog import PeerWarnings
from .target import AnnounceTarget

METHOD: Final = "grasp"
HOP_LIMIT: Final = 1
JITTER: Final = 0.1  # ± this fraction of the interval
_MAX_TTL_MS: Final = 0xFFFFFFFF


def flood_ttl_ms(interval: float) -> int:
    """RFC 8995's 180 s, unless the interval is so long that pledges would forget us
    between floods: then three intervals, so one lost flood costs nothing."""
    return min(_MAX_TTL_MS, max(wire.DEFAULT_TTL_MS, int(interval * 3000)))


def send_drop_reason(err: int | None) -> DropReason:
    # A full queue is the kernel rate-limiting us; anything else (link down or gone, address
    # removed, a firewall's EPERM) means the link is not usable right now.
    if err in (errno.ENOBUFS, errno.EAGAIN, errno.EWOULDBLOCK):
        return DropReason.RATE_LIMIT
    return DropReason.SEND_ERROR


class ProxyAnnouncer:
    def __init__(self, *, interval: float, metrics: Metrics, log: logging.Logger,
                 rng: Callable[[int], bytes] = os.urandom,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self.metrics = metrics
        self.log = log
        self._rng = rng
        self._clock = clock
        self._warnings = PeerWarnings(log)
        self._targets: dict[str, AnnounceTarget] = {}
        self._next: dict[str, float] = {}  # target name -> when its next flood is due
        self._enabled = False
        self._sock: socket.socket | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- what the control plane sets --------------------------------------------------------
    @property
    def interval(self) -> float:
        return self._interval

    @interval.setter
    def interval(self, value: float) -> None:
        """A reload: nobody waits longer than the new interval for their next flood."""
        self._interval = value
        limit = self._clock() + value
        for name, due in self._next.items():
            self._next[name] = min(due, limit)
        self._kick()

    def set_targets(self, interfaces: Sequence[JoinInterface]) -> None:
        """Announce on exactly these interfaces; a new (or changed) one is flooded at once."""
        wanted = {i.name: AnnounceTarget.of(i) for i in interfaces}
        if wanted == self._targets:
            return
        for name, target in wanted.items():
            if self._targets.get(name) != target:
                self._next[name] = 0.0
        for name in set(self._next) - set(wanted):
            del self._next[name]
        self._targets = wanted
        self._kick()

    def set_enabled(self, enabled: bool) -> None:
        if enabled == self._enabled:
            return
        self._enabled = enabled
        if enabled:
            self._next = dict.fromkeys(self._targets, 0.0)
        self.log.info("GRASP proxy announcements %s", "on" if enabled else "off")
        self._kick()

    @property
    def enabled(self) -> bool:
        return self._enabled

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Optional: the task also starts by itself on the first set_* call inside the loop."""
        self._closed = False
        self._kick()

    async def stop(self) -> None:
        self._closed = True
        await cancel_and_wait(self._task)
        self._task = None
        self._close_socket()

    def status(self) -> dict[str, Any]:
        return {"enabled": self._enabled, "interval": self._interval,
                "interfaces": sorted(self._targets)}

    # -- the sending loop -------------------------------------------------------------------
    def _kick(self) -> None:
        self._wake.set()
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # configured before the loop runs: start() or the next call starts it
        self._task = asyncio.create_task(self._run(), name="grasp-announcer")

    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                try:
                    deadline = self._pass()
                except Exception:  # our bug: say so, and keep announcing rather than stop
                    self.log.exception("GRASP announcer pass failed")
                    deadline = self._clock() + 1.0
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
                await woken_or_timeout(self._wake, timeout)
        finally:
            self._close_socket()

    def _pass(self) -> float | None:
        """Send what is due; returns when the next flood is due (None: nothing to do)."""
        if not (self._enabled and self._targets):
            self._close_socket()  # nothing to say: hold no socket
            return None
        now = self._clock()
        for name, target in self._targets.items():
            if self._next.get(name, 0.0) <= now:
                self._next[name] = now + self._jittered()
                self._send(target)
        return min(self._next[n] for n in self._targets)

    def _jittered(self) -> float:
        fraction = int.from_bytes(self._rng(2), "big") / 0xFFFF  # 0..1
        return self._interval * (1 - JITTER + 2 * JITTER * fraction)

    def _socket(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, HOP_LIMIT)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, target: AnnounceTarget) -> None:
        for protocol in target.protocols:  # one flood per transport (coaps: UDP locators)
            self._send_one(target, protocol)

    def _send_one(self, target: AnnounceTarget, protocol: int) -> None:
        try:
            data = wire.proxy_flood(self._rng, IPv6Address(target.link_local), target.port,
                                    protocol=protocol, ttl_ms=flood_ttl_ms(self._interval),
                                    locators=[IPv6Address(a) for a in target.addresses]
                                    ).encode()
        except (UsageError, ValueError) as exc:  # our input, not the network's: a bug
            self.log.error("cannot build the AN_Proxy flood for %s: %s", target.name, exc,
                           extra={"INTERFACE": target.name})
            return
        destination = (str(wire.ALL_GRASP_NEIGHBORS), wire.GRASP_PORT, 0, target.index)
        # IPV6_PKTINFO pins the source to the address the flood names (a join link may carry
        # several link-locals, and a pledge may well connect to where the flood came from).
        pktinfo = IPv6Address(target.link_local).packed + struct.pack("@I", target.index)
        try:
            self._socket().sendmsg([data], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                             pktinfo)], 0, destination)
        except OSError as exc:
            reason = send_drop_reason(exc.errno)
            self.metrics.drop("announce", reason)
            self._warnings.warn(f"{target.name}:{exc.errno}", "AN_Proxy flood on %s not sent: "
                                "%s", target.name, exc.strerror or exc)
            return
        self.metrics.announcements.labels(METHOD, target.name).inc()
        self.log.debug("AN_Proxy flood sent on %s (%s port %d)", target.name,
                       ", ".join(target.addresses), target.port)
