"""The jpy relay's kernel datapath (ebpf/jpy.bpf.c): the control plane of the tc programs.

The programs do the per-datagram work (wrap, seal, unwrap, open, checksums, redirect); this
module only decides and writes: which join links and which registrar (jp_jpy_cfg,
jp_jpy_links through kernel/bpf.py, the one map writer), the AES keys (two slots, current and
previous, created by the jp_jpy_setkey syscall program), where the programs hang (tc ingress
of each join link and of the backbone interface the route to the registrar leaves by), and
the counters (jp_jpy_stats, folded into the same joinproxyd_* series the user-space relay
feeds, with the same drop reasons).

Where the backbone allows it, jp_jpy_xdp_join does the pledge side's wrap in XDP, tail-called
from the join-port guard (jp_guard_next, shared with ipip's fast path, which comes first): the
backbone must take XDP-redirected frames (ndo-xmit in its xdp_features) and forward IPv6
(bpf_fib_lookup gives the program its next hop), decided as relays/ipip_xdp.py decides
"auto", again at every apply() and every XDP_RECHECK_SECONDS. What it does not finish (a
checksum that does not verify, no next hop yet) goes on to jp_jpy_join in tc, which stays
attached, so turning it on never loses the slow path. It needs the guard on the link.

The daemon's sockets stay open: they hold the join ports and the JPY source port, and they
receive what the programs leave to the stack (a datagram while the join window is closed, a
reply whose CBOR is not the canonical two-element array, a pledge not on fe80::/64, anything
from a source other than the registrar), which relays/jpy.py then handles as it always does,
with the same header format (brski.jpy.BlockHeaderSealer) and keys.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import TYPE_CHECKING, Any

from ..kernel import KernelError
from ..kernel.bpf import BpfDatapath
from ..kernel.bpf_layout import JP_JPY_MAX_CONTENT, JpyCfgC, JpyCount, JpyLinkC, Program
from ..model import DropReason, PolicyDropReason
from . import ipip_xdp

if TYPE_CHECKING:
    from .jpy import JpyMode

# jp_jpy_stats counter -> the drop reason the user-space relay counts for the same thing
DROPS: dict[str, DropReason | PolicyDropReason] = {
    JpyCount.FORGED: PolicyDropReason.JPY_FORGED,
    JpyCount.STALE: PolicyDropReason.JPY_STALE,
    JpyCount.REPLAYED: PolicyDropReason.JPY_REPLAYED,
    JpyCount.TOO_BIG: PolicyDropReason.TOO_BIG,
    JpyCount.MALFORMED: DropReason.MALFORMED,
    JpyCount.UNSOLICITED: DropReason.UNSOLICITED,
    JpyCount.SEND_ERROR: DropReason.SEND_ERROR,
}


XDP_RECHECK_SECONDS = 10.0  # the backbone's xdp_features and forwarding change silently


def decide_xdp(backbone: ipip_xdp.Backbone | None) -> ipip_xdp.Decision:
    """Pure: whether jp_jpy_xdp_join runs, and why (module docstring)."""
    if backbone is None:
        return ipip_xdp.Decision(False, "no backbone towards the registrar")
    name = backbone.name
    if backbone.features is None:
        return ipip_xdp.Decision(False, f"whether {name} takes XDP-redirected frames is not "
                                        f"known: {backbone.unknown}")
    if not backbone.takes_redirects:
        return ipip_xdp.Decision(False, f"{name} does not take XDP-redirected frames (no "
                                        "ndo-xmit in its xdp_features; a veth has it only "
                                        "while its peer has an XDP program or GRO on)")
    if backbone.forwarding != "1":
        return ipip_xdp.Decision(False, f"net.ipv6.conf.{name}.forwarding is "
                                        f"{backbone.forwarding or 'unreadable'}: "
                                        "bpf_fib_lookup gives XDP no next hop without it")
    return ipip_xdp.Decision(True, f"{name} takes XDP-redirected frames (ndo-xmit) with "
                                   "forwarding on")


@dataclass(frozen=True)
class Backbone:
    ifindex: int
    source: str  # our address the registrar is reached from


def route_to(registrar: str, scope_id: int) -> Backbone:
    """The interface and source address the kernel would send to the registrar from."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        args: dict[str, Any] = {"dst": registrar.split("%")[0], "family": 10}
        if scope_id:
            args["oif"] = scope_id
        try:
            route = ipr.route("get", **args)[0]
        except Exception as exc:  # NetlinkError: unreachable, no route
            raise KernelError(f"no route to the registrar {registrar}: {exc}",
                              errno=errno.EHOSTUNREACH) from exc
    oif, src = route.get_attr("RTA_OIF"), route.get_attr("RTA_PREFSRC")
    if not oif or not src:
        raise KernelError(f"the route to the registrar {registrar} names no interface or "
                          "source address", errno=errno.EHOSTUNREACH)
    return Backbone(int(oif), str(src))


class KernelPath:
    """What JpyMode keeps of the kernel datapath: on (with the dp it runs in) or off."""

    def __init__(self, mode: JpyMode) -> None:
        self.mode = mode
        self.dp: BpfDatapath | None = None
        self.slot = 0  # jp_jpy_keys slot that seals
        self.attached_joins: set[int] = set()
        self.backbone: Backbone | None = None
        self.synced: dict[str, int] = {}
        self.problem: str | None = None  # why the kernel path is not running
        self._bb_attached: int | None = None
        self._sync_lock = threading.Lock()  # the scrape thread syncs too
        self.pending: dict[str, int] = {}  # drops counted but not yet logged, by kind
        self.xdp = ipip_xdp.Decision(False, "not started")
        # what set_jpy_xdp was last told; None: nothing yet (a restart may have adopted a
        # pinned slot that still holds the wrap, so the first decision is always written)
        self._xdp_written: bool | None = None
        self._xdp_checked = 0.0

    @property
    def running(self) -> bool:
        return self.dp is not None

    async def start(self, key: bytes, key_id: int) -> bool:
        """Load what the kernel path needs (once) and install the first key; False with
        self.problem set when this kernel cannot run it."""
        ctx = self.mode.ctx
        if ctx.datapath is None:
            self.problem = "no BPF data plane in this context"
            return False
        try:
            dp = await ctx.datapath.get()
            if not dp.has_jpy:
                self.problem = dp.unavailable.get("jpy", "jpy.bpf.o not loaded")
                return False
            await asyncio.to_thread(dp.set_jpy_key, 0, key_id, key)
            await asyncio.to_thread(dp.set_jpy_key, 1, 0, None)
            self.synced = await asyncio.to_thread(dp.jpy_stats)  # a pinned map's old counts
        except KernelError as exc:
            self.problem = str(exc).splitlines()[0]
            return False
        self.dp, self.slot, self.problem = dp, 0, None
        hooks = getattr(ctx.metrics, "before_scrape", None)
        if hooks is not None:  # a scrape shows what the programs did up to that moment
            hooks.append(self.sync_counters)
        return True

    async def rotate(self, key: bytes, key_id: int) -> None:
        """The new key goes to the other slot, which then seals; the old current opens on."""
        if self.dp is None:
            return
        slot = 1 - self.slot
        await asyncio.to_thread(self.dp.set_jpy_key, slot, key_id, key)
        self.slot = slot
        await self.apply()

    async def apply(self) -> None:
        """Write the configuration for what the mode serves now, and attach or detach."""
        dp, mode = self.dp, self.mode
        if dp is None:
            return
        registrar = mode.registrar
        source_port = mode.source_port()
        cfg = None
        if registrar is not None and registrar.jpy_port is not None and source_port:
            try:
                self.backbone = await asyncio.to_thread(route_to, registrar.address,
                                                        registrar.scope_id)
            except KernelError as exc:
                mode.ctx.log.warning("jpy kernel path idle: %s", exc,
                                     extra={"MODE": mode.name})
                self.backbone = None
            if self.backbone is not None:
                cfg = JpyCfgC(backbone_ifindex=self.backbone.ifindex, current_slot=self.slot,
                              src_port=source_port, registrar_port=registrar.jpy_port,
                              max_content=JP_JPY_MAX_CONTENT)
                cfg.backbone_addr[:] = IPv6Address(self.backbone.source).packed
                cfg.registrar_addr[:] = IPv6Address(registrar.address.split("%")[0]).packed
        relay = 1 if mode.ctx.join_window() else 0
        links: dict[int, JpyLinkC] = {}
        for side in mode.joins.values():
            link = JpyLinkC(port=side.iface.port, relay=relay)
            link.addr[:] = IPv6Address(side.iface.link_local.split("%")[0]).packed
            links[side.iface.index] = link
        await asyncio.to_thread(dp.set_jpy, cfg, links)
        for index in set(links) - self.attached_joins:
            await asyncio.to_thread(dp.attach_tc, index, Program.JPY_JOIN)
            self.attached_joins.add(index)
        for index in self.attached_joins - set(links):
            await asyncio.to_thread(dp.detach_tc, index, Program.JPY_JOIN)
            self.attached_joins.discard(index)
        want_bb = self.backbone.ifindex if cfg is not None and self.backbone else None
        if want_bb != self._bb_attached:
            old = self._bb_attached
            if old is not None:
                await asyncio.to_thread(dp.detach_tc, old, Program.JPY_BACKBONE)
            if want_bb is not None:
                await asyncio.to_thread(dp.attach_tc, want_bb, Program.JPY_BACKBONE)
            self._bb_attached = want_bb
        await self._apply_xdp(want_bb)

    async def _apply_xdp(self, backbone: int | None) -> None:
        """Decide the XDP wrap afresh and write the guard's slot when that changes."""
        dp = self.dp
        if dp is None:
            return
        self._xdp_checked = time.monotonic()
        probed = None
        if backbone is not None and self.attached_joins:
            try:
                probed = await ipip_xdp.probe(socket.if_indextoname(backbone), backbone)
            except OSError as exc:
                probed = ipip_xdp.Backbone(str(backbone), None, unknown=str(exc))
        decision = decide_xdp(probed) if self.attached_joins else \
            ipip_xdp.Decision(False, "jpy serves no link")
        self.xdp = decision
        if decision.active != self._xdp_written:
            runs = await asyncio.to_thread(dp.set_jpy_xdp, decision.active)
            self._xdp_written = decision.active
            self.mode.ctx.log.info("jpy XDP wrap %s: %s", "on" if runs else "off",
                                   self.xdp_reason, extra={"MODE": self.mode.name})

    async def recheck_xdp(self) -> None:
        """Every XDP_RECHECK_SECONDS: the backbone's flags may have changed."""
        if self.dp is not None and time.monotonic() - self._xdp_checked >= XDP_RECHECK_SECONDS:
            await self._apply_xdp(self._bb_attached)

    def sync_counters(self) -> None:
        """Fold what the programs counted since the last call into the mode's metrics."""
        with self._sync_lock:
            self._sync()

    def _sync(self) -> None:
        dp, mode = self.dp, self.mode
        if dp is None:
            return
        try:
            now = dp.jpy_stats()
        except KernelError:
            return
        delta = {k: v - self.synced.get(k, 0) for k, v in now.items()}
        self.synced = now
        metrics = mode.ctx.metrics
        for count, reason in DROPS.items():
            if delta.get(count, 0) > 0:
                metrics.drop(mode.name, reason, delta[count])
                self.pending[count] = self.pending.get(count, 0) + delta[count]
        if delta.get(JpyCount.UP, 0) > 0:
            mode._datagrams_up.inc(delta[JpyCount.UP])
            mode._bytes_up.inc(delta["bytes_up"])
            mode.datagrams["upstream"] += delta[JpyCount.UP]
        if delta.get(JpyCount.DOWN, 0) > 0:
            mode._datagrams_down.inc(delta[JpyCount.DOWN])
            mode._bytes_down.inc(delta["bytes_down"])
            mode.datagrams["downstream"] += delta[JpyCount.DOWN]

    def report(self) -> None:
        """Log the drops the programs counted since the last report, once per sender and
        reason (the mode's RefusalSayer), naming the latest sender of each kind; a pledge's
        refusal is kept for `joinproxyctl refusals`. Called from the event loop only."""
        dp, mode = self.dp, self.mode
        with self._sync_lock:
            pending, self.pending = self.pending, {}
        if dp is None or not pending:
            return
        try:
            last = dp.jpy_last()
        except KernelError:
            return
        for kind, n in pending.items():
            reason = DROPS[kind]
            address, ifindex, port = last.get(kind, ("?", 0, 0))
            side = mode.by_index.get(ifindex)
            times = f"{n} time{'s' if n > 1 else ''} in the kernel"
            if side is not None:  # from a pledge, on a join link
                name = side.iface.name
                pledge = f"{address}%{name}"
                why = {JpyCount.TOO_BIG: f"datagram too big to fit in {1280 - 48} bytes "
                                         "once wrapped",
                       JpyCount.MALFORMED: "its lengths disagree"}.get(kind, "not relayed")
                mode.ctx.refusals.add(pledge, reason.value, name, mode.name)
                mode._say(pledge, reason.value, name,
                          f"jpy dropped ({reason.value}): pledge {pledge}: {why} ({times})",
                          "PLEDGE")
                continue
            who = f"[{address}]:{port}"
            why = {JpyCount.FORGED: "header does not authenticate",
                   JpyCount.STALE: "header sealed under a key id that is not live (older "
                                   "than the previous key, or from before a restart)",
                   JpyCount.REPLAYED: "already relayed",
                   JpyCount.MALFORMED: "truncated, or its lengths disagree",
                   JpyCount.UNSOLICITED: "for a join link that is not served",
                   JpyCount.SEND_ERROR: "the kernel could not rewrite it"}.get(kind, "")
            mode._say(who, reason.value, None,
                      f"jpy dropped ({reason.value}): reply from {who}: {why} ({times})",
                      "REGISTRAR")

    async def stop(self) -> None:
        dp = self.dp
        if dp is None:
            return
        self.sync_counters()
        hooks = getattr(self.mode.ctx.metrics, "before_scrape", None)
        if hooks is not None and self.sync_counters in hooks:
            hooks.remove(self.sync_counters)
        try:
            if self._xdp_written is not False:
                await asyncio.to_thread(dp.set_jpy_xdp, False)
            self._xdp_written, self.xdp = None, ipip_xdp.Decision(False, "stopped")
            await asyncio.to_thread(dp.set_jpy, None, {})
            for index in list(self.attached_joins):
                await asyncio.to_thread(dp.detach_tc, index, Program.JPY_JOIN)
            bb = self._bb_attached
            if bb is not None:
                await asyncio.to_thread(dp.detach_tc, bb, Program.JPY_BACKBONE)
            await asyncio.to_thread(dp.set_jpy_key, 0, 0, None)
            await asyncio.to_thread(dp.set_jpy_key, 1, 0, None)
        except KernelError as exc:
            self.mode.ctx.log.error("jpy kernel path: %s", exc, extra={"MODE": self.mode.name})
        self.attached_joins.clear()
        self._bb_attached = None
        with self._sync_lock:
            self.dp = None

    @property
    def xdp_runs(self) -> bool:
        """The guard's slot holds jp_jpy_xdp_join (ipip's fast path, when on, holds it)."""
        return self.dp is not None and self.dp.jpy_xdp_runs

    def _guarded(self) -> set[int]:
        if self.dp is None:
            return set()
        return {h.ifindex for h in self.dp.attached()
                if h.kind == "xdp" and h.program == Program.GUARD.value}

    @property
    def xdp_reason(self) -> str:
        if self.xdp.active and not self.xdp_runs:
            return "the ipip XDP fast path holds the guard's slot"
        if self.xdp.active and not self._guarded() & self.attached_joins:
            return "the guard, which calls it, is on no jpy link ([guard] enabled = false)"
        return self.xdp.why

    def status(self) -> dict[str, Any]:
        xdp_joins = sorted(self._guarded() & self.attached_joins) if self.xdp_runs else []
        return {"backbone_ifindex": self.backbone.ifindex if self.backbone else None,
                "backbone_source": self.backbone.source if self.backbone else None,
                "key_slot": self.slot, "joins": sorted(self.attached_joins),
                # the links where it runs: the guard's XDP hook is its way in
                "xdp": bool(xdp_joins), "xdp_joins": xdp_joins, "xdp_reason": self.xdp_reason,
                "counts": dict(self.synced)}
