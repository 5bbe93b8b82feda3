"""Stateless IPIP relay (BRSKI drafts App. C, protocols.md §7): the kernel carries every byte,
and the proxy keeps nothing per pledge.

    pledge fe80::p ──TCP to [R_ll]:port──▶ join0 ─ tc jp_tc_join: IPv6-in-IPv6 (41, or 98)
        outer src = this link's backbone address B_join0, dst = the registrar's R ──▶ bb0
    registrar R ──outer R -> B_join0, inner R_ll -> fe80::p──▶ bb0 ─ tc jp_tc_backbone:
        decapsulated, sent out of the link B_join0 belongs to ──▶ join0 ──▶ pledge

The registrar offers IPIP in its GRASP flood (``[O_IPv6_LOCATOR, R_ll, 41, nil]``, initiator
R) or in the configuration (registrars.static[].ipip); either way it reaches this mode as the
active registrar's ``ipip`` (model.IpipTarget). For each join link served, the mode makes the
kernel match:

    proxy NDP     the link answers neighbour solicitations for R_ll (kernel/ndp.py), which is
                  what the link announces to pledges (GRASP AN_Proxy, mDNS), with the
                  registrar's port, so pledge packets need no rewriting at all
    address       B_link, one backbone address per join link: the one stateless rule that
                  sends a reply to the right link (ipip.backbone_addresses by name, else
                  ipip.backbone_prefix + ifindex), added to the backbone (/128, nodad) if
                  missing and removed when no longer used
    BPF           jp_join_cfg[link] = (R_ll, B_link, R, backbone, ports, protocol),
                  jp_bb_addrs[B_link] = link, jp_registrars[R] (kernel/bpf.py set_ipip);
                  jp_tc_join on each link's tc ingress, jp_tc_backbone on the backbone's
    XDP           the fast path: the guard's XDP program on each link hands pledge packets
                  to jp_xdp_join, which falls back to jp_tc_join; on, off or when the
                  backbone can take redirected frames (ipip.xdp, ipip_xdp.py)

Order: the return path first (address, backbone program, maps), then the join side (join
program, proxy NDP, which is what makes pledges send), so no packet leaves whose reply would
be refused, and the XDP fast path last (it hands over to the join program); removal goes the
other way. When the registrar is failed away from, the old one stays allowed to send until
the next change, so its last replies are not dropped.

Without an IPIP-capable registrar (none, one that does not offer the configured protocol, or
no backbone address for the link) the maps hold nothing for the link and its proxy entry is
removed: pledges there cannot resolve the registrar's address, and the link is not announced.
The programs stay attached and pass everything untouched.

A closed join window (window.py) removes only the proxy NDP entries (and the announcements
stop): a pledge that has not resolved the registrar's address cannot, while one in the
middle of its enrollment keeps its neighbour entry (TCP's progress keeps it reachable) and
goes on being relayed, since the maps and programs stay. Stateless, the kernel cannot tell a
new pledge from an established one, so nothing is counted per pledge; opening the window
puts the entries back.

What is left by a killed run is recognised: proxy entries and addresses carry our netlink
protocol mark, programs our names, maps are pinned; a configured mode adopts or replaces them
at its first reconcile, and an unconfigured one removes them (clean_leftovers). The join
links' sysctls from before the first run are in a file the killed run wrote before changing
them (ipip_knobs.py): a configured mode restores them from there when it stops serving a link,
and an unconfigured one at start (ipip_knobs.restore_leftovers).

Counters: the programs count by action and reason (jp_counters); drops are exported as
joinproxyd_drops_total{mode="ipip",reason} and every action as
joinproxyd_bpf_packets_total{program,action}. No per-pledge state means no circuits().
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import IpipSettings
from ..kernel import KernelError, ip6tnl, ndp
from ..kernel.bpf import BpfDatapath
from ..kernel.bpf_layout import IPIP_PROGRAMS, IpipJoin
from ..model import IpipTarget, JoinInterface, LinkState, RegistrarEndpoint
from . import ipip_knobs, ipip_xdp
from .base import RelayContext, RelayMode
from .ipip_knobs import KnobRecord, Saved

# -- the plan, as pure functions ----------------------------------------------------------------

def usable_target(registrar: RegistrarEndpoint | None,
                  protocol: int) -> tuple[IpipTarget | None, str | None]:
    """The registrar's IPIP offer if this proxy can use it, else (None, why not)."""
    if registrar is None:
        return None, "no registrar is known"
    target = registrar.ipip
    if target is None:
        return None, f"registrar {registrar.key} does not offer IPIP"
    if protocol not in target.protocols:
        return None, (f"registrar {registrar.key} takes IPIP protocol "
                      f"{'/'.join(map(str, target.protocols))}, not {protocol} "
                      "(ipip.protocol)")
    return target, None


def choose_datapath(setting: str, protocol: int, bpf_problem: str | None,
                    tunnel_problem: str | None) -> tuple[str | None, str]:
    """Who encapsulates ("bpf", "kernel" or None: nobody can) and why, from ipip.datapath
    and what the kernel offers (None: that path works, else why not). "auto" prefers BPF
    (XDP fast path, protocol 98, counters by reason); the tunnels carry protocol 41 only."""
    if setting == "bpf":
        return "bpf", "ipip.datapath = \"bpf\""
    if setting == "kernel":
        if tunnel_problem is not None:
            return None, f"ipip.datapath = \"kernel\": {tunnel_problem}"
        return "kernel", "ipip.datapath = \"kernel\""
    if bpf_problem is None:
        return "bpf", "auto: BPF runs here"
    if protocol != 41:
        return None, (f"auto: BPF does not run here ({bpf_problem}), and protocol {protocol} "
                      "has no kernel tunnel (protocol 98 needs BPF)")
    if tunnel_problem is not None:
        return None, f"auto: BPF does not run here ({bpf_problem}), nor tunnels: {tunnel_problem}"
    return "kernel", f"auto: BPF does not run here ({bpf_problem}): ip6ip6 tunnels"


def backbone_address(settings: IpipSettings, name: str, index: int) -> str:
    """This link's backbone address: configured by name, else prefix + ifindex (unique per
    link while the link exists). ValueError if there is none."""
    if name in settings.backbone_addresses:
        return settings.backbone_addresses[name]
    prefix = settings.backbone_prefix
    if prefix is None:
        raise ValueError(f"{name}: no backbone address (not in ipip.backbone_addresses, and "
                         "no ipip.backbone_prefix)")
    if index >= prefix.num_addresses or index <= 0:
        raise ValueError(f"{name}: ifindex {index} does not fit in ipip.backbone_prefix "
                         f"{prefix}")
    return (prefix.network_address + index).compressed


@dataclass(frozen=True)
class LinkPlan:
    name: str
    index: int
    outer_src: str


@dataclass
class Plan:
    """What the kernel should hold for one desired state."""

    target: IpipTarget | None
    refusal: str | None
    backbone_index: int | None
    links: list[LinkPlan] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # link -> why it is not relayed
    window_open: bool = True  # closed: no proxy NDP entries (new pledges cannot resolve)

    @property
    def relaying(self) -> bool:
        return self.target is not None and self.backbone_index is not None and \
            bool(self.links)

    def joins(self, protocol: int) -> dict[int, IpipJoin]:
        if self.target is None or self.backbone_index is None:
            return {}
        return {link.index: IpipJoin(registrar_ll=self.target.link_local,
                                     outer_src=link.outer_src, registrar=self.target.address,
                                     backbone_ifindex=self.backbone_index,
                                     ports=self.target.ports, proto=protocol)
                for link in self.links}

    def proxies(self) -> set[tuple[int, str]]:
        if not self.relaying or self.target is None or not self.window_open:
            return set()
        return {(link.index, self.target.link_local) for link in self.links}

    def addresses(self) -> set[str]:
        return {link.outer_src for link in self.links} if self.relaying else set()


def make_plan(interfaces: Sequence[JoinInterface], registrar: RegistrarEndpoint | None,
              settings: IpipSettings, backbone: LinkState | None) -> Plan:
    target, refusal = usable_target(registrar, settings.protocol)
    backbone_index = backbone.index if backbone is not None and backbone.up else None
    if target is not None and backbone_index is None:
        target, refusal = None, "the backbone interface is not up"
    plan = Plan(target, refusal, backbone_index)
    used: dict[str, str] = {}
    for iface in sorted(interfaces, key=lambda i: i.name):
        try:
            address = backbone_address(settings, iface.name, iface.index)
        except ValueError as exc:
            plan.errors[iface.name] = str(exc)
            continue
        if address in used:  # a configured address equal to a derived one
            plan.errors[iface.name] = (f"{iface.name}: backbone address {address} is also "
                                       f"{used[address]}'s")
            continue
        if target is not None and ipaddress.IPv6Address(address) == \
                ipaddress.IPv6Address(target.address):
            plan.errors[iface.name] = f"{iface.name}: backbone address {address} is the " \
                                      "registrar's"
            continue
        used[address] = iface.name
        plan.links.append(LinkPlan(iface.name, iface.index, address))
    return plan


# -- the mode -----------------------------------------------------------------------------------

class IpipMode(RelayMode):
    name = "ipip"
    serves_link_local = True  # inner packets are the pledges' own, link-local ones
    keeps_flows = False  # stateless: joinproxyd_bpf_packets_total counts what it relays

    @classmethod
    async def clean_leftovers(cls, log: logging.Logger) -> None:
        """Proxy entries and backbone addresses a killed ipip run left (it is not configured
        now). Its BPF programs and pins are the data plane's to clear."""
        try:
            proxies = await asyncio.to_thread(ndp.proxies)
            addresses = [(i, a) for i, a, ours in await asyncio.to_thread(ndp.addresses)
                         if ours]
            for index, address in proxies:
                await asyncio.to_thread(ndp.del_proxy, index, address)
            for index, address in addresses:
                await asyncio.to_thread(ndp.del_address, index, address)
            for join_index in await asyncio.to_thread(ip6tnl.ours):
                await asyncio.to_thread(ip6tnl.remove, join_index)
        except KernelError as exc:
            log.error("cannot remove what an earlier ipip run left: %s", exc)
            return
        if proxies or addresses:
            log.info("removed %d proxy neighbour entr%s and %d backbone address(es) an earlier "
                     "ipip run left (ipip is not configured now)", len(proxies),
                     "y" if len(proxies) == 1 else "ies", len(addresses))

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        self.plan = Plan(None, "not started", None)
        self.registrar: RegistrarEndpoint | None = None
        self.error: str | None = None
        self._lock = asyncio.Lock()  # one kernel change at a time
        self._adopted = False  # a killed run's entries and addresses looked at
        self._proxies: set[tuple[int, str]] = set()  # (ifindex, address) installed
        self._addresses: dict[str, int] = {}  # backbone address -> ifindex, added by us
        self._join_tc: dict[str, int] = {}  # link name -> ifindex with jp_tc_join
        self._backbone_tc: int | None = None
        self._knobs: dict[str, Saved] = {}  # link -> its sysctls before the first run
        self._knobs_set: set[str] = set()  # links whose knobs this process has set
        self._record: KnobRecord | None = None  # read at the first reconcile
        self._written: tuple[dict[int, IpipJoin], frozenset[str]] | None = None
        self._previous_registrar: str | None = None
        self._logged: str | None = None
        self._asked: tuple[str, ...] = ()  # the links the last reconcile asked to serve
        self._apply_error: str | None = None  # what the kernel refused at the last one
        self.xdp = ipip_xdp.Decision(False, "not started")
        self._xdp_backbone: ipip_xdp.Backbone | None = None  # as last read
        self._xdp_written: bool | None = None  # what jp_guard_next holds (None: not known)
        # ipip.datapath: "bpf" or "kernel" (ip6ip6 tunnels, kernel/ip6tnl.py) as chosen
        self.path: str | None = None
        self.path_why = "not started"
        self._tunnel_problem: str | None = None  # probed once: the kernel does not change
        self._tunnel_probed = False
        self._tunnels: dict[int, ip6tnl.TunnelSpec] = {}  # join ifindex -> tunnel made
        ctx.metrics.add_mode(self.name, flows=self.keeps_flows)

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        async with self._lock:
            settings = self.ctx.ipip()
            self._load_knobs(settings.knob_record)
            plan = make_plan(interfaces, registrar, settings, self.ctx.backbone())
            plan.window_open = self.ctx.join_window()
            old_target = self.plan.target
            if old_target is not None and (plan.target is None
                                           or plan.target.address != old_target.address):
                self._previous_registrar = old_target.address
            self.plan, self.registrar = plan, registrar
            self._asked = tuple(i.name for i in interfaces)
            self._explain(plan, settings.protocol)
            errors = list(plan.errors.values())
            self._apply_error = None
            try:
                path = await self._choose_path(settings) if interfaces else self.path
                if path != self.path and self.path is not None:
                    await self._teardown_path()  # the other path's state goes first
                self.path = path
                if not interfaces:
                    await self._teardown_path()
                elif path == "kernel":
                    await self._apply_kernel(plan, settings.protocol,
                                             [i for i in interfaces if i.name not in plan.errors])
                elif path == "bpf":
                    await self._apply(plan, settings.protocol, [i for i in interfaces
                                                                if i.name not in plan.errors])
                    await self._reconcile_xdp(settings.xdp, plan)
                else:
                    raise KernelError(self.path_why)
            except (KernelError, ValueError) as exc:
                # ValueError: the data plane refused a configuration (bpf.py validates);
                # said once, retried at the next change, never fatal.
                errors.append(str(exc))
                self._apply_error = str(exc)
            self._set_error("; ".join(errors) or None)

    async def close(self, drain_seconds: float) -> None:
        """Nothing to drain: connections live in the pledges and the registrar. Remove the
        proxy entries (pledges stop sending), then programs, maps and addresses."""
        async with self._lock:
            try:
                await self._teardown_path()
            except KernelError as exc:
                self._set_error(str(exc))
            self.plan = Plan(None, "stopped", None)
            self.xdp = ipip_xdp.Decision(False, "stopped")

    async def _choose_path(self, settings: IpipSettings) -> str | None:
        bpf_problem = None
        if settings.datapath == "auto":
            try:
                await self._datapath()
            except KernelError as exc:
                bpf_problem = str(exc).splitlines()[0]
        if settings.datapath != "bpf" and not self._tunnel_probed:
            self._tunnel_problem = await asyncio.to_thread(ip6tnl.probe)
            self._tunnel_probed = True
        path, why = choose_datapath(settings.datapath, settings.protocol, bpf_problem,
                                    self._tunnel_problem)
        if (path, why) != (self.path, self.path_why):
            self.ctx.log.info("ipip datapath: %s (%s)", path or "none", why,
                              extra={"MODE": self.name})
        self.path_why = why
        return path

    async def _teardown_path(self) -> None:
        if self._tunnels or self.path == "kernel":
            await self._teardown_kernel()
        if self.path != "kernel":
            await self._teardown()

    async def _apply_kernel(self, plan: Plan, protocol: int,
                            interfaces: Sequence[JoinInterface]) -> None:
        """The plan with ip6ip6 tunnels instead of BPF programs (kernel/ip6tnl.py): backbone
        addresses, one tunnel per link towards the registrar, then the links' knobs and
        proxy NDP, as _apply orders it (return path first)."""
        await self._adopt()
        if plan.backbone_index is not None:
            for address in sorted(plan.addresses() - set(self._addresses)):
                if await asyncio.to_thread(ndp.add_address, plan.backbone_index, address):
                    self._addresses[address] = plan.backbone_index
        specs: dict[int, ip6tnl.TunnelSpec] = {}
        if plan.relaying and plan.target is not None and plan.backbone_index is not None:
            specs = {link.index: ip6tnl.TunnelSpec(
                link.name, link.index, plan.backbone_index, link.outer_src,
                plan.target.address, plan.target.link_local, tuple(plan.target.ports),
                protocol) for link in plan.links}
        for index in sorted(set(self._tunnels) - set(specs)):
            await asyncio.to_thread(ip6tnl.remove, index)
            del self._tunnels[index]
        for index, spec in specs.items():
            if self._tunnels.get(index) != spec:
                await asyncio.to_thread(ip6tnl.apply, spec)
                self._tunnels[index] = spec
        desired = {i.name: i.index for i in interfaces}
        for name, saved in list(self._knobs.items()):
            if desired.get(name) != saved.ifindex:
                await self._restore_knobs(name)
        for name, index in desired.items():
            if name not in self._knobs:
                before = await asyncio.to_thread(ndp.read_knobs, name)
                self._knobs[name] = Saved(index, before)
                assert self._record is not None
                self._record.save(self._knobs)  # on disk before the first knob changes
            if name not in self._knobs_set:
                await asyncio.to_thread(ndp.write_knobs, name, ndp.PROXY_KNOBS)
                self._knobs_set.add(name)
        wanted = plan.proxies()
        for index, address in sorted(self._proxies - wanted):
            await asyncio.to_thread(ndp.del_proxy, index, address)
            self._proxies.discard((index, address))
        for index, address in sorted(wanted - self._proxies):
            await asyncio.to_thread(ndp.add_proxy, index, address)
            self._proxies.add((index, address))
        for address, index in sorted(self._addresses.items()):
            if address not in plan.addresses():
                await asyncio.to_thread(ndp.del_address, index, address)
                del self._addresses[address]

    async def _teardown_kernel(self) -> None:
        """Serve nothing on the tunnel path: proxy entries, tunnels, knobs, addresses."""
        await self._adopt()
        for index, address in sorted(self._proxies):
            await asyncio.to_thread(ndp.del_proxy, index, address)
        self._proxies.clear()
        for index in sorted(self._tunnels):
            await asyncio.to_thread(ip6tnl.remove, index)
        self._tunnels.clear()
        for name in list(self._knobs):
            await self._restore_knobs(name)
        for address, index in sorted(self._addresses.items()):
            await asyncio.to_thread(ndp.del_address, index, address)
        self._addresses.clear()

    async def _datapath(self) -> BpfDatapath:
        if self.ctx.datapath is None:
            raise KernelError("no BPF data plane in this context")
        return await self.ctx.datapath.get()

    def _load_knobs(self, path: Path) -> None:
        """First reconcile: the knobs an earlier (killed) run recorded are the operator's;
        those of links gone since are dropped. The path stays the same for the process."""
        if self._record is not None:
            return
        self._record = KnobRecord(path, self.ctx.log)
        recorded = self._record.load()
        for name, saved in recorded.items():
            if ipip_knobs.still_there(name, saved):
                self._knobs[name] = saved
                self.ctx.log.info("%s: sysctls from before an earlier run (%s) are restored "
                                  "when it is no longer served", name,
                                  ", ".join(f"{k}={v}" for k, v in sorted(saved.knobs.items())),
                                  extra={"INTERFACE": name, "MODE": self.name})
            else:
                self.ctx.log.info("%s", ipip_knobs.describe(name, saved, False),
                                  extra={"INTERFACE": name, "MODE": self.name})
        if recorded.keys() != self._knobs.keys():
            self._record.save(self._knobs)

    async def _adopt(self) -> None:
        """First pass: what a killed run left becomes ours, to keep or remove."""
        if self._adopted:
            return
        self._adopted = True
        self._proxies |= set(await asyncio.to_thread(ndp.proxies))
        for index, address, ours in await asyncio.to_thread(ndp.addresses):
            if ours:
                self._addresses[address] = index

    async def _apply(self, plan: Plan, protocol: int,
                     interfaces: Sequence[JoinInterface]) -> None:
        dp = await self._datapath()
        await self._adopt()
        joins = plan.joins(protocol)
        # The registrar failed away from may still have replies on the way: let them in
        # while another one is relayed to (with none, nothing is relayed, nothing let in).
        previous = self._previous_registrar
        allowed = frozenset({previous} if previous and plan.target is not None
                            and previous != plan.target.address else ())
        # 1. the return path: backbone addresses, the backbone program, the maps
        if plan.backbone_index is not None:
            for address in sorted(plan.addresses() - set(self._addresses)):
                if await asyncio.to_thread(ndp.add_address, plan.backbone_index, address):
                    self.ctx.log.info("backbone address %s added for IPIP",
                                      address, extra={"MODE": self.name})
                    self._addresses[address] = plan.backbone_index
                # else: configured by the operator, theirs to keep
            if self._backbone_tc != plan.backbone_index:
                await asyncio.to_thread(dp.attach_ipip_backbone, plan.backbone_index)
                if self._backbone_tc is not None:
                    await asyncio.to_thread(dp.detach_ipip_backbone, self._backbone_tc)
                self._backbone_tc = plan.backbone_index
        if (joins, allowed) != self._written:
            await asyncio.to_thread(dp.set_ipip, joins, allowed)
            self._written = (joins, allowed)
        # 2. the join side: the program on each link, the link's knobs, proxy NDP
        desired = {i.name: i.index for i in interfaces}
        for name, index in list(self._join_tc.items()):
            if desired.get(name) != index:
                await self._unserve(dp, name, index)
        for name, saved in list(self._knobs.items()):
            if desired.get(name) != saved.ifindex:  # recorded by an earlier run, not served
                await self._restore_knobs(name)
        for name, index in desired.items():
            if self._join_tc.get(name) != index:
                await asyncio.to_thread(dp.attach_ipip_join, index)
                self._join_tc[name] = index
            if name not in self._knobs:
                before = await asyncio.to_thread(ndp.read_knobs, name)
                self._knobs[name] = Saved(index, before)
                assert self._record is not None
                self._record.save(self._knobs)  # on disk before the first knob changes
            if name not in self._knobs_set:
                skipped = await asyncio.to_thread(ndp.write_knobs, name, ndp.PROXY_KNOBS)
                self._knobs_set.add(name)
                for why in skipped:
                    self.ctx.log.info("%s: %s; pledges' neighbour solicitations are answered "
                                      "after the kernel's proxy delay", name, why,
                                      extra={"INTERFACE": name, "MODE": self.name})
        wanted = plan.proxies()
        for index, address in sorted(self._proxies - wanted):
            await asyncio.to_thread(ndp.del_proxy, index, address)
            self._proxies.discard((index, address))
        for index, address in sorted(wanted - self._proxies):
            await asyncio.to_thread(ndp.add_proxy, index, address)
            self._proxies.add((index, address))
        # 3. addresses no longer used (their map entries are gone already)
        for address, index in sorted(self._addresses.items()):
            if address not in plan.addresses():
                await asyncio.to_thread(ndp.del_address, index, address)
                del self._addresses[address]
        if not plan.relaying and self._backbone_tc is not None and not self._join_tc:
            await asyncio.to_thread(dp.detach_ipip_backbone, self._backbone_tc)
            self._backbone_tc = None

    async def _reconcile_xdp(self, setting: str, plan: Plan) -> None:
        """The fast path on or off, decided afresh (ipip_xdp.py): the backbone may have
        changed, or what it can take."""
        serving = bool(plan.links) and plan.backbone_index is not None
        backbone_link = self.ctx.backbone()
        backbone = None
        if setting != "off" and serving and backbone_link is not None \
                and plan.backbone_index is not None:
            backbone = await ipip_xdp.probe(backbone_link.name, plan.backbone_index)
        decision = ipip_xdp.decide(setting, serving, backbone)
        self._xdp_backbone = backbone
        await self._write_xdp(decision.active)
        if decision != self.xdp:
            log = self.ctx.log.warning if decision.warn else self.ctx.log.info
            log("ipip: XDP fast path %s: %s", "on" if decision.active else "off",
                decision.why, extra={"MODE": self.name})
        self.xdp = decision

    async def xdp_outdated(self) -> bool:
        """Whether "auto" would now decide otherwise than what runs: the backbone's flags or
        its forwarding knob can change with no event the daemon reconciles on. One generic
        netlink query and one sysctl read; the daemon asks every XDP_RECHECK_SECONDS."""
        async with self._lock:
            plan, backbone_link = self.plan, self.ctx.backbone()
            if self.ctx.ipip().xdp != "auto" or not plan.links or backbone_link is None \
                    or plan.backbone_index is None or self._xdp_written is None:
                return False
            backbone = await ipip_xdp.probe(backbone_link.name, plan.backbone_index)
            return ipip_xdp.decide("auto", True, backbone).active != self._xdp_written

    async def _write_xdp(self, enabled: bool) -> None:
        # Always written once: a pinned program array adopted from a killed run may hold
        # the fast path (bpf.py keeps it on across the restart) whatever this run decides.
        if enabled != self._xdp_written:
            dp = await self._datapath()
            await asyncio.to_thread(dp.set_ipip_xdp, enabled)
            self._xdp_written = enabled

    def xdp_dispatch(self) -> list[str]:
        """The links whose XDP hook must hold jp_guard even with the guard off: the ones
        served while the fast path is on (see ipip_xdp.py)."""
        return [link.name for link in self.plan.links] if self._xdp_written else []

    async def _unserve(self, dp: BpfDatapath, name: str, index: int) -> None:
        """A link no longer served (or back with another ifindex): its proxy entry, program
        and knobs go; a link that is gone took them with it."""
        for entry in [p for p in self._proxies if p[0] == index]:
            await asyncio.to_thread(ndp.del_proxy, *entry)
            self._proxies.discard(entry)
        await asyncio.to_thread(dp.detach_ipip_join, index)
        del self._join_tc[name]
        if name in self._knobs:
            await self._restore_knobs(name)

    async def _restore_knobs(self, name: str) -> None:
        """Put the link's recorded sysctls back (unless the link is gone, taking them with
        it) and forget them; a failure keeps them, to be tried again."""
        saved = self._knobs[name]
        await asyncio.to_thread(ipip_knobs.restore, name, saved)
        del self._knobs[name]
        self._knobs_set.discard(name)
        if self._record is not None:
            self._record.save(self._knobs)

    async def _teardown(self) -> None:
        """Serve nothing: the reverse of _apply."""
        # A first reconcile that serves nothing still owns what a killed run left.
        await self._adopt()
        # Also when not known: an adopted program array may hold a killed run's fast path.
        opened = self.ctx.datapath is not None and self.ctx.datapath.opened
        if self._xdp_written or (self._xdp_written is None and opened):
            await self._write_xdp(False)
        self.xdp = ipip_xdp.Decision(False, "ipip serves no link")
        for index, address in sorted(self._proxies):
            await asyncio.to_thread(ndp.del_proxy, index, address)
        self._proxies.clear()
        if not (self._join_tc or self._backbone_tc is not None or self._written
                or self._addresses or self._knobs):
            return
        dp = await self._datapath()
        for name, index in list(self._join_tc.items()):
            await self._unserve(dp, name, index)
        # links whose program never got attached, and those an earlier run recorded
        for name in list(self._knobs):
            await self._restore_knobs(name)
        if self._written:
            await asyncio.to_thread(dp.set_ipip, {}, ())
            self._written = None
        if self._backbone_tc is not None:
            await asyncio.to_thread(dp.detach_ipip_backbone, self._backbone_tc)
            self._backbone_tc = None
        for address, index in sorted(self._addresses.items()):
            await asyncio.to_thread(ndp.del_address, index, address)
        self._addresses.clear()

    # -- logs and views ---------------------------------------------------------------------
    def _explain(self, plan: Plan, protocol: int) -> None:
        """Log, once per change, what the mode relays or why it does not."""
        served = ", ".join(link.name for link in plan.links) or "no link"
        if plan.target is not None:
            message = (f"ipip relays pledges on {served} to [{plan.target.link_local}]:"
                       f"{','.join(map(str, plan.target.ports))} through {plan.target.address} "
                       f"(protocol {protocol})")
        else:
            message = f"ipip relays nothing on {served}: {plan.refusal}"
        if message != self._logged and (plan.links or plan.errors):
            log = self.ctx.log.info if plan.target or self.registrar is None \
                else self.ctx.log.warning
            log("%s", message, extra={"MODE": self.name})
            self._logged = message

    def _set_error(self, message: str | None) -> None:
        if message is not None and message != self.error:
            self.ctx.log.error("ipip: %s", message, extra={"MODE": self.name})
        self.error = message

    def kernel_drops(self) -> dict[str, int]:
        if self.ctx.datapath is None or self.path == "kernel":
            return {}  # the tunnels count no reasons: their statistics are in status
        return self.ctx.datapath.kernel_drops(IPIP_PROGRAMS)

    def unserved(self) -> dict[str, str]:
        """With a registrar, a link is served only while the plan relays it and the kernel
        took it (status is true: not announced otherwise)."""
        plan = self.plan
        if self.registrar is None or not plan.window_open:
            return {}  # joining is closed: nothing is announced anyway
        relayed = {link.name for link in plan.links} if plan.relaying else set()
        out = {}
        for name in self._asked:
            why = plan.errors.get(name) or (None if name in relayed else plan.refusal)
            if why is None and self._apply_error is not None:
                why = self._apply_error  # the kernel refused what the plan asked
            if why is not None or name not in relayed:
                out[name] = f"ipip: {why or 'not relayed'}"
        return out

    def tunnel_names(self) -> list[str]:
        """The kernel tunnels this mode made, one per join link (datapath "kernel")."""
        return [spec.name for _, spec in sorted(self._tunnels.items())]

    def status(self) -> dict[str, Any]:
        plan, target = self.plan, self.plan.target
        return {
            "protocol": self.ctx.ipip().protocol,
            "relaying": plan.relaying,
            "window_open": plan.window_open,
            "registrar": None if target is None else {
                "link_local": target.link_local, "address": target.address,
                "protocols": list(target.protocols), "ports": list(target.ports)},
            "refusal": plan.refusal,
            "interfaces": [{"interface": link.name, "index": link.index,
                            "backbone_address": link.outer_src,
                            "proxy_ndp": target is not None
                            and (link.index, target.link_local) in self._proxies}
                           for link in plan.links],
            "backbone_addresses_added": sorted(self._addresses),
            "xdp": {"setting": self.ctx.ipip().xdp, "active": bool(self._xdp_written),
                    "why": self.xdp.why,
                    "backbone": None if self._xdp_backbone is None
                    else self._xdp_backbone.as_status()},
            "knobs_before": ipip_knobs.as_status(self._knobs),
            "knob_record": None if self._record is None else {
                "path": str(self._record.path), "error": self._record.error},
            "drops": self.kernel_drops(),
            "datapath": {"setting": self.ctx.ipip().datapath, "active": self.path,
                         "why": self.path_why,
                         "tunnels": ip6tnl.describe(list(self._tunnels.values())),
                         "tunnel_stats": self._tunnel_stats()},
            "error": self.error,
        }

    def _tunnel_stats(self) -> dict[str, int] | None:
        """The tunnels' own counters (relayed: tx, delivered: rx), on the tunnel path."""
        if not self._tunnels:
            return None
        return ip6tnl.stats(self._tunnels)
