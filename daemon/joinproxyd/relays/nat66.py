"""NAT66 relay: the kernel carries pledge connections to the registrar (DNAT + masquerade).

Nothing of a pledge's traffic passes through user space. The mode owns one nftables table,
``ip6 joinproxyd``, and replaces it whole, atomically, on every reconcile (a table left by a
killed daemon is simply replaced). For each served join interface X with join port P and the
registrar R:RP, the table holds:

    chain prerouting   nat hook prerouting, priority dstnat
        iifname X ip6 saddr != fe80::/10 tcp dport P dnat to [R]:RP
    chain postrouting  nat hook postrouting, priority srcnat
        oifname <backbone> iifname X ip6 daddr R tcp dport RP counter name flows-X masquerade
    chain forward      filter hook forward, priority filter, policy accept
        iifname X ct status dnat counter name upstream-X accept          relayed flows
        iifname X ip6 daddr R tcp dport RP counter name upstream-X accept    addressed to R
        iifname {joins} counter name not-to-registrar drop     anything else from pledges
        oifname X ct state established,related counter name downstream-X accept
        oifname {joins} counter name unsolicited drop          anything not asked for

Why these rules:
- Link-local sources are skipped on purpose. The kernel cannot forward a packet whose source
  is link-local (ip6_forward answers "beyond scope" before any SNAT hook, platform.md fact 2),
  so NAT66 serves only pledges with ULA/global addresses; link-local pledges are left to the
  circuit mode, which can listen on the same port when both modes are configured.
- The forward chain keeps the router closed to pledges: from a join link only flows the
  prerouting rule sent to the registrar are forwarded, and towards a join link only replies.
  Traffic between other interfaces is not this mode's business (policy accept).
- A pledge may also address the registrar itself. With the join port equal to the
  registrar's, the DNAT then rewrites nothing, and the kernel sets no dnat status in
  conntrack for a translation that changed nothing, so "ct status dnat" alone would drop
  it; with another join port no DNAT happens at all. The second forward rule admits such
  flows: from a join link to exactly the registrar's address and port, nothing more.
- The masquerade rule names the join link (iifname works in postrouting for forwarded
  packets) and the registrar, so other traffic of the router is not masqueraded.
- Without a usable registrar (none, or a link-local one: the kernel would not forward to it
  either) there are no DNAT rules at all; pledges' join-port packets are only counted
  (counter no-registrar) and reach the proxy itself, which answers with a reset.

IPv6 forwarding. NAT66 needs net.ipv6.conf.all.forwarding=1: Linux decides whether to forward
an IPv6 packet by that knob. While the mode serves at least one interface it turns forwarding
on, after its table is in place (so forwarding is never on without the join-link filter), and
it restores the previous value when it serves none any more and on close (restoring first,
then removing the table). Writing the "all" knob also rewrites every interface's own
forwarding knob, and with forwarding on the kernel ignores router advertisements on links
with accept_ra=1: a backbone configured by SLAAC needs accept_ra=2. The previous value is
also written into the table (a comment in the never-jumped-to chain "state"), so a daemon
started after a crash restores the value from before the crashed run, not the 1 it left.

A closed join window (window.py) is the draining table below, with the pledges' join-port
packets counted as "window-closed" instead of "no-registrar": no new flow is translated,
flows already NATed keep going, and opening the window puts the DNAT rules back. The kernel
keeps no pledge address for these, so `joinproxyctl refusals` cannot list them per pledge.

Closing drains: the DNAT rules go first (new connections are no longer relayed), flows the
kernel already NATed keep going (their binding lives in conntrack) until they end or
drain_seconds pass, then forwarding is restored and the table removed, which cuts the rest
(counted as DropReason.SHUTDOWN). While draining, flows addressed to the registrar itself
are admitted only when already established. Open flows are read from conntrack (entries
with destination or source NAT to a registrar this run relayed to), which also gives
circuits() its list.

Relayed traffic. Per join interface X, named counters count new flows (flows-X: the
masquerade rule, which the kernel evaluates only for a flow's first packet, so each flow
once, retransmitted SYNs not again) and the bytes of the forwarded IPv6 packets, headers
included, each way (upstream-X, downstream-X; the circuit mode counts TCP payload instead).
The mode reads them every TRAFFIC_POLL_SECONDS and just before each table replacement or
removal, and adds what they gained to joinproxyd_circuits_total{mode="nat66"} and
joinproxyd_relayed_bytes_total{mode="nat66",direction}: the metrics lag the kernel by at
most the poll interval. status() shows the totals per interface ("traffic").

Counters. The drop rules use named counters, which status() reports as
``drops: {"no-registrar": n, "not-to-registrar": n, "unsolicited": n}`` (packets), the
kernel's values plus those of the tables this run replaced (read just before each
replacement; packets counted in that millisecond are lost). To export them as
joinproxyd_drops_total{mode="nat66",reason=<key>}, the control plane reads drops() at scrape
time from a collector (habit 12); "no-registrar" is DropReason.NO_REGISTRAR, the two others
need DropReason members.
"""

import asyncio
import concurrent.futures
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..kernel import KernelError, sysctl
from ..kernel.netlink import NatFlow, nat_flows
from ..kernel.nftables import Table, TableSpec, table_present
from ..model import DropReason, JoinInterface, LinkState, RegistrarEndpoint
from .base import RelayContext, RelayMode

TABLE_FAMILY = "ip6"
TABLE_NAME = "joinproxyd"
# nft's named priorities, as numbers: given "dstnat" in JSON, libnftables 1.0.6 silently
# makes a regular chain with no hook at all.
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100
PRIORITY_FILTER = 0
STATE_CHAIN = "state"
DRAIN_POLL_SECONDS = 0.2
TRAFFIC_POLL_SECONDS = 1.0

# Named counters on the refusing rules, in the order status() lists them.
COUNTERS = ("no-registrar", "not-to-registrar", "unsolicited")
# Only in the table while the join window is closed (so an open window's table is as before);
# its packets are kept across replacements like the others' once it has existed.
WINDOW_COUNTER = "window-closed"

L4_NAMES = {6: "tcp", 17: "udp"}
_FORWARDING_NOTE = re.compile(r"^net\.ipv6\.conf\.all\.forwarding=([0-9]+) before joinproxyd$")

T = TypeVar("T")


# -- the ruleset, as a pure function --------------------------------------------------------

def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _names(names: Sequence[str]) -> Any:
    return names[0] if len(names) == 1 else {"set": list(names)}


def refusal(registrar: RegistrarEndpoint | None, backbone: str | None) -> str | None:
    """Why NAT66 cannot relay to this registrar right now, or None if it can."""
    if registrar is None:
        return "no registrar is known"
    if registrar.is_link_local:
        return (f"registrar {registrar.key} is link-local, and the kernel does not forward "
                "to link-local destinations")
    if registrar.protocol not in L4_NAMES:
        return f"registrar {registrar.key} uses IP protocol {registrar.protocol}"
    if backbone is None:
        return "the backbone interface is not known"
    return None


def traffic_counters(interface: str) -> tuple[str, str, str]:
    """Names of the table's counters of relayed traffic on one join interface: new flows,
    bytes upstream (pledge to registrar) and bytes downstream."""
    return (f"flows-{interface}", f"upstream-{interface}", f"downstream-{interface}")


def build_ruleset(interfaces: Sequence[JoinInterface], registrar: RegistrarEndpoint | None,
                  backbone: str | None, *, forwarding_before: str | None = None,
                  draining: bool = False, window_closed: bool = False) -> TableSpec:
    """The table's contents for this desired state (objects without family/table).

    ``forwarding_before`` is recorded in the table (chain "state") so that a later run can
    restore it; see the module docstring. ``draining``: no new flows (no DNAT, no
    masquerade), while flows already open to ``registrar`` keep going. ``window_closed``:
    the same, with the refused join-port packets counted as "window-closed".
    """
    ifaces = sorted(interfaces, key=lambda iface: iface.name)
    joins = [iface.name for iface in ifaces]
    usable = refusal(registrar, backbone) is None
    relaying = usable and not draining and not window_closed
    l4 = L4_NAMES.get(registrar.protocol, "tcp") if registrar is not None else "tcp"
    not_link_local = _match(_payload("ip6", "saddr"),
                            {"prefix": {"addr": "fe80::", "len": 10}}, "!=")

    spec: TableSpec = [{"counter": {"name": name}} for name in COUNTERS]
    if window_closed:
        spec.append({"counter": {"name": WINDOW_COUNTER}})
    spec += [{"counter": {"name": name}} for iface in ifaces
             for name in traffic_counters(iface.name)]
    spec += [
        {"chain": {"name": "prerouting", "type": "nat", "hook": "prerouting",
                   "prio": PRIORITY_DSTNAT, "policy": "accept"}},
        {"chain": {"name": "postrouting", "type": "nat", "hook": "postrouting",
                   "prio": PRIORITY_SRCNAT, "policy": "accept"}},
        {"chain": {"name": "forward", "type": "filter", "hook": "forward",
                   "prio": PRIORITY_FILTER, "policy": "accept"}},
    ]
    for iface in ifaces:
        expr = [_match(_meta("iifname"), iface.name), not_link_local,
                _match(_payload(l4, "dport"), iface.port)]
        if relaying:
            assert registrar is not None
            expr.append({"dnat": {"addr": registrar.address, "port": registrar.port}})
        else:
            expr.append({"counter": WINDOW_COUNTER if window_closed else "no-registrar"})
        spec.append({"rule": {"chain": "prerouting", "expr": expr}})
    to_registrar: list[dict[str, Any]] = []
    if usable:
        assert registrar is not None
        to_registrar = [_match(_payload("ip6", "daddr"), registrar.address),
                        _match(_payload(l4, "dport"), registrar.port)]
    if relaying:
        assert backbone is not None
        for iface in ifaces:
            # NAT chains see only a flow's first packet: this counts each new flow once.
            spec.append({"rule": {"chain": "postrouting", "expr": [
                _match(_meta("oifname"), backbone), _match(_meta("iifname"), iface.name),
                *to_registrar, {"counter": traffic_counters(iface.name)[0]},
                {"masquerade": None}]}})
    for iface in ifaces:
        upstream = {"counter": traffic_counters(iface.name)[1]}
        spec.append({"rule": {"chain": "forward", "expr": [
            _match(_meta("iifname"), iface.name),
            _match({"ct": {"key": "status"}}, "dnat", "in"), upstream, {"accept": None}]}})
        if to_registrar:
            # A pledge that addressed the registrar itself: the DNAT to the same address
            # changes nothing, so conntrack sets no dnat status for it. While draining,
            # only flows already open.
            new_too = [] if relaying else [
                _match({"ct": {"key": "state"}}, ["established", "related"], "in")]
            spec.append({"rule": {"chain": "forward", "expr": [
                _match(_meta("iifname"), iface.name), *to_registrar, *new_too, upstream,
                {"accept": None}]}})
    if joins:
        spec.append({"rule": {"chain": "forward", "expr": [
            _match(_meta("iifname"), _names(joins)),
            {"counter": "not-to-registrar"}, {"drop": None}]}})
    for iface in ifaces:
        spec.append({"rule": {"chain": "forward", "expr": [
            _match(_meta("oifname"), iface.name),
            _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
            {"counter": traffic_counters(iface.name)[2]}, {"accept": None}]}})
    if joins:
        spec.append({"rule": {"chain": "forward", "expr": [
            _match(_meta("oifname"), _names(joins)),
            {"counter": "unsolicited"}, {"drop": None}]}})
    if forwarding_before is not None:
        # A regular chain nothing jumps to: never evaluated, it only carries the note.
        spec += [
            {"chain": {"name": STATE_CHAIN}},
            {"rule": {"chain": STATE_CHAIN, "expr": [{"return": None}],
                      "comment": f"net.ipv6.conf.all.forwarding={forwarding_before} "
                                 "before joinproxyd"}},
        ]
    return spec


def recorded_forwarding(objects: Sequence[dict[str, Any]]) -> str | None:
    """The forwarding value a table built by build_ruleset recorded, if any."""
    for obj in objects:
        rule = obj.get("rule")
        if isinstance(rule, dict) and rule.get("chain") == STATE_CHAIN:
            found = _FORWARDING_NOTE.match(str(rule.get("comment", "")))
            if found:
                return found.group(1)
    return None


# -- the mode ---------------------------------------------------------------------------------

class Nat66Mode(RelayMode):
    name = "nat66"
    counts_active = False  # its flows are conntrack's: counted as they start, not as they end
    serves_link_local = False  # the kernel does not forward link-local sources
    serves_routable = True

    @classmethod
    async def clean_leftovers(cls, log: logging.Logger) -> None:
        """A killed nat66 run left its table (and forwarding on): restore and remove.
        Looked for over plain netlink: the nftables binding (optional, OpenWrt has none) is
        imported only when there is a table to remove."""
        try:
            if not await asyncio.to_thread(table_present, TABLE_FAMILY, TABLE_NAME):
                return
            table = Table(TABLE_FAMILY, TABLE_NAME)
            leftover = await asyncio.to_thread(table.list)
            if not leftover:
                return
            before = recorded_forwarding(leftover)
            if before is not None and sysctl.read(sysctl.IPV6_FORWARDING) != before:
                sysctl.write(sysctl.IPV6_FORWARDING, before)
            await asyncio.to_thread(table.delete)
        except KernelError as exc:
            log.error("cannot remove the nftables table %s %s left by an earlier run: %s",
                      TABLE_FAMILY, TABLE_NAME, exc)
            return
        log.info("removed the nftables table %s %s left by an earlier run (nat66 is not "
                 "configured now)%s", TABLE_FAMILY, TABLE_NAME,
                 f"; IPv6 forwarding restored to {before}" if before is not None else "")

    def __init__(self, ctx: RelayContext, *, table: Table | None = None,
                 sysctl_root: Path = sysctl.PROC_SYS,
                 flows: Callable[[], Awaitable[list[NatFlow]]] = nat_flows) -> None:
        """``table``, ``sysctl_root`` and ``flows`` are for tests; by default the mode owns
        ``ip6 joinproxyd``, the namespace's real /proc/sys and its conntrack table."""
        super().__init__(ctx)
        self._table = table
        self._sysctl_root = sysctl_root
        self._flows = flows
        self.interfaces: tuple[JoinInterface, ...] = ()
        self.registrar: RegistrarEndpoint | None = None
        self.relaying = False
        self.window_closed = False  # the table built last refuses new flows for the window
        self.error: str | None = None
        self._lock = asyncio.Lock()  # one kernel change at a time
        self._forwarding_before: str | None = None  # set while this mode holds forwarding on
        self._owned = False  # the kernel's table is one this run built
        self._replaced = dict.fromkeys(COUNTERS, 0)  # packets counted by replaced tables
        # Relayed traffic: what the current table's counters held at the last read, and
        # the totals per join interface (flows, upstream bytes, downstream bytes).
        self._traffic_seen: dict[str, int] = {}
        self.traffic: dict[str, dict[str, int]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._poll_error: str | None = None
        self._refusal_logged: str | None = None
        self._plan_logged: str | None = None
        self._warned_no_prefix: set[str] = set()
        self._relayed_to: set[tuple[str, int, int]] = set()  # (address, port, protocol)
        ctx.metrics.add_mode(self.name)

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        async with self._lock:
            self.interfaces = tuple(sorted(interfaces, key=lambda iface: iface.name))
            self.registrar = registrar
            self.window_closed = not self.ctx.join_window()
            backbone = self.ctx.backbone()
            self._explain(backbone)
            try:
                if self.interfaces:
                    await self._serve(backbone)
                else:
                    await self._stop_serving()
            except KernelError as exc:
                self._failed(exc)
            else:
                self.error = None

    async def close(self, drain_seconds: float) -> None:
        """Stop accepting, let open flows finish for up to drain_seconds, then give
        forwarding back and remove the table (which ends whatever flows are left)."""
        async with self._lock:
            if (self.relaying or self.window_closed) and drain_seconds > 0:
                try:
                    await self._drain(drain_seconds)
                except KernelError as exc:  # cannot wait properly: still clean up
                    self._failed(exc)
            self.interfaces = ()
            try:
                await self._stop_serving()
            except KernelError as exc:
                self._failed(exc)
        if self._poller is not None:
            from ..aio import cancel_and_wait
            await cancel_and_wait(self._poller)
            self._poller = None

    async def _drain(self, drain_seconds: float) -> None:
        # The same table without DNAT: new connections are no longer relayed, while flows
        # already NATed keep their binding (it lives in their conntrack entry) and the
        # forward rules still let them through.
        backbone = self.ctx.backbone()
        spec = build_ruleset(self.interfaces, self.registrar,
                             backbone.name if backbone else None,
                             forwarding_before=self._forwarding_before, draining=True)
        await self._fold_counters()
        await self._call(self._kernel_table().apply, spec)
        self._traffic_seen = {}  # the new table's counters start at zero
        self.relaying = False
        deadline = time.monotonic() + drain_seconds
        while (flows := await self._open_flows()) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        if flows:
            self.ctx.metrics.drop(self.name, DropReason.SHUTDOWN, len(flows))
            self.ctx.log.info("nat66: %d flow(s) still open after %g s are cut", len(flows),
                              drain_seconds, extra={"MODE": self.name})

    async def _open_flows(self) -> list[NatFlow]:
        """Open flows this run's DNAT rules made (to any registrar it relayed to)."""
        return [flow for flow in await self._flows()
                if flow.open and (flow.target, flow.target_port, flow.protocol)
                in self._relayed_to]

    async def _serve(self, backbone: LinkState | None) -> None:
        table = self._kernel_table()
        if self._forwarding_before is None:
            leftover = await self._call(table.list)
            if leftover and not self._owned:
                self.ctx.log.info("replacing the nftables table %s %s left by an earlier run",
                                  TABLE_FAMILY, TABLE_NAME, extra={"MODE": self.name})
            # After a crash, the value from before the crashed run; else the current one.
            self._forwarding_before = recorded_forwarding(leftover) or self._forwarding()
        spec = build_ruleset(self.interfaces, self.registrar,
                             backbone.name if backbone is not None else None,
                             forwarding_before=self._forwarding_before,
                             window_closed=self.window_closed)
        await self._fold_counters()
        await self._call(table.apply, spec)
        self._owned = True
        self._traffic_seen = {}
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_traffic(), name="nat66-traffic")
        if self._forwarding() != "1":
            # Only now: the join-link filter is in place before anything is forwarded.
            sysctl.write(sysctl.IPV6_FORWARDING, "1", self._sysctl_root)
            self.ctx.log.info("IPv6 forwarding turned on for NAT66 (it was %s; restored when "
                              "nat66 serves no interface)", self._forwarding_before,
                              extra={"MODE": self.name})
        self.relaying = not self.window_closed and \
            refusal(self.registrar, backbone.name if backbone else None) is None
        if self.relaying and self.registrar is not None:
            self._relayed_to.add((self.registrar.address, self.registrar.port,
                                  self.registrar.protocol))

    async def _stop_serving(self) -> None:
        table = self._kernel_table()
        leftover = await self._call(table.list)
        before = self._forwarding_before or recorded_forwarding(leftover)
        if before is not None and self._forwarding() != before:
            sysctl.write(sysctl.IPV6_FORWARDING, before, self._sysctl_root)
            self.ctx.log.info("IPv6 forwarding restored to %s", before,
                              extra={"MODE": self.name})
        self._forwarding_before = None
        self.relaying = False
        if leftover:
            await self._fold_counters()
            await self._call(table.delete)
            self._owned = False
            self._traffic_seen = {}

    # -- helpers ------------------------------------------------------------------------------
    def _kernel_table(self) -> Table:
        if self._table is None:
            self._table = Table(TABLE_FAMILY, TABLE_NAME)
        return self._table

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        # libnftables blocks while it talks to the kernel: keep the loop free meanwhile.
        return await asyncio.to_thread(func, *args)

    def _forwarding(self) -> str:
        return sysctl.read(sysctl.IPV6_FORWARDING, self._sysctl_root)

    async def _fold_counters(self) -> None:
        """Keep what the table about to be replaced has counted (this run's tables only)."""
        if not self._owned:
            return
        counters = await self._call(self._kernel_table().counters)
        for name, value in counters.items():
            if name == WINDOW_COUNTER:
                self._replaced.setdefault(name, 0)
            if name in self._replaced:
                self._replaced[name] += value.packets
        self._count_traffic(counters)

    def _count_traffic(self, counters: dict[str, Any]) -> None:
        """Add what the traffic counters gained since the last read to the metrics."""
        metrics = self.ctx.metrics
        keys = {"flows": ("packets", "flows"), "upstream": ("bytes", "upstream_bytes"),
                "downstream": ("bytes", "downstream_bytes")}
        for name, value in counters.items():
            kind, _, iface = name.partition("-")
            if kind not in keys or not iface:
                continue
            field, key = keys[kind]
            now = getattr(value, field)
            gained = now - self._traffic_seen.get(name, 0)
            self._traffic_seen[name] = now
            if gained <= 0:
                continue
            totals = self.traffic.setdefault(
                iface, {"flows": 0, "upstream_bytes": 0, "downstream_bytes": 0})
            totals[key] += gained
            if kind == "flows":
                metrics.circuits.labels(self.name).inc(gained)
            else:
                metrics.relayed_bytes.labels(self.name, kind).inc(gained)

    async def _poll_traffic(self) -> None:
        """Read the traffic counters every TRAFFIC_POLL_SECONDS (and at every table change,
        in _fold_counters): the metrics lag the kernel by at most that much."""
        while True:
            await asyncio.sleep(TRAFFIC_POLL_SECONDS)
            async with self._lock:
                if not self._owned:
                    continue
                try:
                    counters = await self._call(self._kernel_table().counters)
                except KernelError as exc:
                    if str(exc) != self._poll_error:  # once per distinct failure
                        self.ctx.log.warning("nat66: cannot read the traffic counters: %s",
                                             exc, extra={"MODE": self.name})
                    self._poll_error = str(exc)
                    continue
                self._poll_error = None
                self._count_traffic(counters)

    def _failed(self, exc: KernelError) -> None:
        message = str(exc)
        if message != self.error:  # once per distinct failure, not at every reconcile
            self.ctx.log.error("nat66: %s", message, extra={"MODE": self.name})
        self.error = message

    def _explain(self, backbone: LinkState | None) -> None:
        """Log, once per change, what the mode relays or what keeps it from relaying."""
        served = [iface.name for iface in self.interfaces]
        backbone_name = backbone.name if backbone is not None else None
        reason = refusal(self.registrar, backbone_name) if served else None
        if reason is not None and reason != self._refusal_logged:
            # No registrar yet is expected (discovery takes a moment); an unusable one is not.
            log = self.ctx.log.info if self.registrar is None else self.ctx.log.warning
            log("nat66 relays nothing: %s; pledges on %s get no NAT66 path", reason,
                ", ".join(served), extra={"MODE": self.name})
        self._refusal_logged = reason
        plan = None
        if served and reason is None and self.registrar is not None:
            plan = (f"pledges on {', '.join(f'{i.name}:{i.port}' for i in self.interfaces)} "
                    f"to {self.registrar.key} via {backbone_name}")
        if plan is not None and plan != self._plan_logged:
            self.ctx.log.info("nat66 relays %s", plan, extra={"MODE": self.name})
        self._plan_logged = plan
        for iface in self.interfaces:
            if iface.routable:
                self._warned_no_prefix.discard(iface.name)
            elif iface.name not in self._warned_no_prefix:
                self._warned_no_prefix.add(iface.name)
                self.ctx.log.warning(
                    "%s has no ULA or global prefix: NAT66 serves only pledges with ULA or "
                    "global addresses (the kernel does not forward link-local sources), so "
                    "link-local pledges there need the circuit mode", iface.name,
                    extra={"INTERFACE": iface.name, "MODE": self.name})
        self._warned_no_prefix &= set(served)

    # -- views --------------------------------------------------------------------------------
    def drops(self) -> dict[str, int]:
        """Packets refused, by counter name (see the module docstring)."""
        totals = dict(self._replaced)
        if self._owned:
            try:
                live = self._kernel_table().counters()
            except KernelError:
                live = {}
            for name, value in live.items():
                if name in totals or name == WINDOW_COUNTER:
                    totals[name] = totals.get(name, 0) + value.packets
        return totals

    def kernel_drops(self) -> dict[str, int]:
        return self.drops()

    def unserved(self) -> dict[str, str]:
        """With a registrar, links are served only while the rules are in the kernel and
        relay to it (status is true: not announced otherwise). Without one joining is closed
        and nothing is announced anyway."""
        if self.registrar is None or (self.window_closed and self.error is None):
            return {}  # joining is closed: nothing is announced anyway
        if self.error is not None:
            why = f"nat66: {self.error}"
        elif not self.relaying:
            backbone = self.ctx.backbone()
            why = "nat66: " + (refusal(self.registrar, backbone.name if backbone else None)
                               or "not relaying")
        else:
            return {}
        return {iface.name: why for iface in self.interfaces}

    def status(self) -> dict[str, Any]:
        """A JSON-ready view; reads the kernel's counters (a libnftables call, milliseconds)."""
        try:
            forwarding: str | None = self._forwarding()
        except KernelError:
            forwarding = None
        return {
            "table": f"{TABLE_FAMILY} {TABLE_NAME}",
            "interfaces": [{"interface": iface.name, "port": iface.port,
                            "routable": list(iface.routable)} for iface in self.interfaces],
            "registrar": self.registrar.key if self.registrar else None,
            "relaying": self.relaying,
            "window_closed": self.window_closed,
            "forwarding": {"now": forwarding, "before": self._forwarding_before},
            "drops": self.drops(),
            "traffic": {name: dict(totals) for name, totals in sorted(self.traffic.items())},
            "error": self.error,
        }

    def circuits(self) -> list[dict[str, Any]]:
        """Open NAT66 flows, from the kernel's conntrack table.

        This interface is synchronous, so the netlink dump runs on a worker thread (with an
        event loop of its own) while the caller waits: a few milliseconds, bounded to 2 s.
        """
        if not self._relayed_to:
            return []
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nat66-flows")
        try:
            flows = pool.submit(asyncio.run, self._open_flows()).result(timeout=2)
        except (KernelError, concurrent.futures.TimeoutError) as exc:
            self.ctx.log.info("nat66: cannot list flows: %s", exc or "timed out",
                              extra={"MODE": self.name})
            return []
        finally:
            pool.shutdown(wait=False)
        by_address = {address: iface.name for iface in self.interfaces
                      for address in iface.routable}
        return [{"interface": by_address.get(flow.destination),
                 "pledge": f"[{flow.source}]:{flow.source_port}",
                 "proxy": f"[{flow.destination}]:{flow.destination_port}",
                 "registrar": f"[{flow.target}]:{flow.target_port}"}
                for flow in sorted(flows, key=lambda f: (f.source, f.source_port))]
