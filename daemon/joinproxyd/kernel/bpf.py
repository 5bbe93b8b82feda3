"""The BPF data plane's one owner: loads the objects, attaches the programs, writes every map
that userspace writes and reads every counter (habits 7 and 10). Its parts, each in its own
module (Katran keeps its loader, map layouts and control API apart in the same way):

    bpf_layout.py  enums, constants and struct mirrors shared with ebpf/joinproxy.h, the maps
                   and programs of each object; where to look to change a map layout
    libbpf.py      the ctypes binding of libbpf.so.1: errno, object info, map elements,
                   BPF_PROG_TEST_RUN
    bpf_object.py  finding, loading and pinning the objects (bpffs, pinned maps adopted)
    bpf_attach.py  XDP and tc attachment over netlink, clsact qdiscs, scanning for ours
    bpf.py         this module: BpfDatapath, the API the control plane calls

Objects (built by ``make -C ebpf``, never compiled here; shared structs in ebpf/joinproxy.h):

    ipip.bpf.o           jp_tc_join      tc ingress of a join link: IPv6-in-IPv6 encapsulation
                         jp_tc_backbone  tc ingress of the backbone: decapsulation
                         jp_xdp_join     XDP encapsulation (fast path, falls back to tc)
    guard.bpf.o          jp_guard        XDP join-port guard (per-source token bucket)
    bare_redirect.bpf.o  jp_bare_redir   benchmark baseline / counting sink
                         jp_bare_push    benchmark floor: 40 bytes pushed, then redirected

Use from the control plane::

    dp = BpfDatapath.open()                     # objects from ebpf/, maps pinned in
                                                # /sys/fs/bpf/joinproxyd (bpffs mounted if need be)
    dp.set_guard(rate_pps=20, burst=40, ports=[443, 5684])
    dp.attach_guard("join0")                    # every join link, whatever its modes
    dp.set_ipip({join0_index: IpipJoin(registrar_ll="fe80::1234", outer_src="fd4a:5044::1:1",
                                       registrar="fd4a:5044::100", backbone_ifindex=bb_index,
                                       ports=(443,))})
    dp.attach_ipip_join("join0"); dp.attach_ipip_backbone("bb0")
    dp.set_ipip_xdp(True)                       # optional XDP fast path behind the guard
    dp.detach_stale()                           # once, after the first full reconcile
    dp.counters(); dp.drops(); dp.kernel_drops(IPIP_PROGRAMS)   # at scrape time, thread-safe
    dp.close(detach=True, unpin=True)           # SIGTERM; close(detach=False) leaves it running

Lifecycle (habit 10): open every object, check every expected map and program by name (a
missing one fails with its name), adopt or replace pinned maps, load (a verifier failure
carries libbpf's log), pin the programs (bpf_object.py), then attach when asked
(bpf_attach.py: each hook holds exactly one of ours, a foreign XDP program is never
replaced, and only the clsact qdiscs we added are removed). close() detaches only what this
process attached; ``detach_stale()`` removes our programs from hooks this process did not
attach (a killed daemon's leftovers). Maps are pinned under ``pin_dir`` so a restarted daemon
adopts them (configuration, guard buckets and counters survive, and programs left attached
keep working until replaced).

Privileges: CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (the unit's set) load, pin, attach and
read everything; ``pin_dir`` must exist and be the daemon user's, and its parent must let that
user pass (bpffs is usually mounted 0700 root). Mounting bpffs on /sys/fs/bpf when nothing did
needs CAP_SYS_ADMIN and the mount syscalls.

Threads: map access is plain syscalls, safe from any thread (counters() is called from the
metrics thread). Netlink runs on one private worker thread (bpf_attach.py); the attach/detach
calls block for a few milliseconds, so the daemon may call them through ``asyncio.to_thread``.

``test_run`` and ``bench_run`` use BPF_PROG_TEST_RUN (tests, bench/ipip_pps.py); an
``ifindex`` given to them is looked up in the calling thread's network namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model import DropReason
from . import KernelError, describe_errno
from .bpf_attach import Attachments, Hook
from .bpf_layout import (
    IPIP_PROGRAMS,
    JP_ENCAP_ETH,
    JP_ENCAP_SLOTS,
    JP_GUARD_MAX_PORTS,
    JP_MAX_JOIN_LINKS,
    JP_TOKEN_ONE,
    OBJECTS,
    XDP_PROGRAMS,
    Action,
    AddrC,
    BareCfgC,
    BbAddrC,
    CountersC,
    EncapC,
    GuardBucketC,
    GuardCfgC,
    GuardKeyC,
    IpipGenC,
    IpipJoin,
    JoinCfgC,
    JpyCfgC,
    JpyCount,
    JpyKeyArgsC,
    JpyLinkC,
    JpyStatsC,
    JpyWhoC,
    Program,
    RegistrarC,
    addr_key,
    u32,
    unicast_ipv6,
)
from .bpf_object import DEFAULT_OBJ_DIR, DEFAULT_PIN_DIR, LoadedObject, ensure_pin_dir
from .libbpf import (
    check,
    delete_elem,
    errno_now,
    libbpf,
    lookup_elem,
    map_keys,
    obj_info,
    prog_id_of_fd,
    prog_test_run,
    syscall_run,
    update_elem,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the owner -------------
@dataclass
class _State:
    guard: GuardCfgC | None = None
    ipip: dict[int, IpipJoin] = field(default_factory=dict)
    registrars: frozenset[str] = frozenset()
    ipip_xdp: bool = False
    jpy_xdp: bool = False


class BpfDatapath:
    """Owner of joinproxyd's BPF objects, maps and attachments (see the module docstring)."""

    def __init__(self, objects: dict[str, LoadedObject], pin_dir: Path | None,
                 netns: str | None, qdisc_record: Path | None = None) -> None:
        self._objects = objects
        self.pin_dir = pin_dir
        self.netns = netns
        self._lock = threading.RLock()
        self._hooks = Attachments(netns, qdisc_record, self._lock, self.prog_fd,
                                  self._own_ids)
        # jp_ipip_gen starts at random, so an adopted jp_encap_cache entry written for a
        # previous process's configuration cannot carry the same number
        self._generation = int.from_bytes(os.urandom(4), "little")
        self._state = _State()
        self._closed = False
        self.unavailable: dict[str, str] = {}  # optional object -> why it did not load

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def open(cls, obj_dir: str | Path = DEFAULT_OBJ_DIR,
             pin_dir: str | Path | None = DEFAULT_PIN_DIR, *, netns: str | None = None,
             objects: Iterable[str] = ("ipip", "guard"),
             qdisc_record: Path | None = None,
             optional: Iterable[str] = ()) -> BpfDatapath:
        """Load the named objects from obj_dir. With pin_dir (on bpffs), maps are pinned
        there and adopted from a previous run; None keeps them private to this process
        (tests, benchmarks). netns names the namespace whose links attach_* works on.
        qdisc_record is the file where the clsact qdiscs we add are claimed (and a killed
        run's claims are adopted from)."""
        obj_dir, pins = Path(obj_dir), Path(pin_dir) if pin_dir is not None else None
        if pins is not None:
            ensure_pin_dir(pins)
        loaded: dict[str, LoadedObject] = {}
        try:
            for name in objects:
                if name not in OBJECTS:
                    raise ValueError(f"unknown BPF object {name!r} (one of {sorted(OBJECTS)})")
                spec = OBJECTS[name]
                loaded[name] = LoadedObject(name, spec, obj_dir / spec.file, pins)
        except BaseException:
            for obj in loaded.values():
                obj.close()
            raise
        # Optional objects need what not every kernel has (jpy: the BPF crypto kfuncs); one
        # that does not load is recorded with the reason and costs the others nothing.
        unavailable: dict[str, str] = {}
        for name in optional:
            spec = OBJECTS[name]
            try:
                loaded[name] = LoadedObject(name, spec, obj_dir / spec.file, pins)
            except KernelError as exc:
                unavailable[name] = str(exc).splitlines()[0]
                log.info("BPF object %s not loaded: %s", spec.file, exc)
        dp = cls(loaded, pins, netns, qdisc_record)
        dp.unavailable = unavailable
        dp._adopt_next_slot()
        try:
            dp._hooks.adopt_qdiscs()
        except Exception as exc:  # the data plane works without; only a leftover may stay
            log.error("cannot check the clsact qdiscs an earlier run added: %s", exc)
        return dp

    def _adopt_next_slot(self) -> None:
        """A pinned jp_guard_next may still point at a killed daemon's jp_xdp_join (or
        jp_jpy_xdp_join): point it at ours, keeping that fast path on across the restart."""
        if "guard" not in self._objects:
            return
        fd = self._objects["guard"].maps["jp_guard_next"]
        old = u32()
        if not lookup_elem(fd, u32(0), old):
            return
        # Named from the fd our pin adoption holds on the predecessor's program: asking the
        # kernel by id needs CAP_SYS_ADMIN, which the unit does not grant.
        if self._hooks.name_of(old.value) == Program.JPY_XDP_JOIN.value \
                and "jpy" in self._objects:
            self._state.jpy_xdp = True
            self._write_next_slot()
        elif "ipip" in self._objects:
            self._state.ipip_xdp = True
            self._write_next_slot()
        else:  # no encapsulation of ours loaded to hand over to: stop the old one
            delete_elem(fd, u32(0), "jp_guard_next")

    def close(self, detach: bool = True, unpin: bool = False) -> None:
        """Detach what this process attached (detach=False leaves the programs running, to
        be adopted by the next start), remove the pins if unpin, and free everything."""
        with self._lock:
            if self._closed:
                return
            errors = self._hooks.close(detach)
            pins = [p for obj in self._objects.values() for p in obj.pins]
            for obj in self._objects.values():
                obj.close()
            self._closed = True
            if unpin:
                for pin in dict.fromkeys(pins):
                    try:
                        os.unlink(pin)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        errors.append(f"unlink {pin}: {describe_errno(exc.errno or 0)}")
                if self.pin_dir is not None:
                    with contextlib.suppress(OSError):  # not empty: others' pins stay
                        self.pin_dir.rmdir()
            if errors:
                raise KernelError("closing the BPF data plane: " + "; ".join(errors))

    def __enter__(self) -> BpfDatapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------
    def _obj(self, name: str) -> LoadedObject:
        if self._closed:
            raise KernelError("the BPF data plane is closed", errno=errno.EBADF)
        try:
            return self._objects[name]
        except KeyError:
            raise KernelError(f"BPF object {name!r} not loaded", errno=errno.ENOENT) from None

    def _map(self, obj: str, name: str) -> int:
        return self._obj(obj).maps[name]

    def prog_fd(self, program: Program | str) -> int:
        program = Program(program)
        for obj in self._objects.values():
            if program in obj.progs:
                return obj.progs[program]
        raise KernelError(f"program {program} not loaded", errno=errno.ENOENT)

    def prog_id(self, program: Program | str) -> int:
        return prog_id_of_fd(self.prog_fd(program))

    def _own_ids(self) -> dict[int, int]:
        """prog id -> fd, for every program of ours this process can name: its own, and the
        ones a previous daemon pinned."""
        ids = {prog_id_of_fd(fd): fd for obj in self._objects.values()
               for fd in obj.progs.values()}
        for obj in self._objects.values():
            ids.update(obj.previous)
        return ids

    def map_id(self, obj: str, name: str) -> int:
        return int.from_bytes(obj_info(self._map(obj, name))[4:8], "little")

    def ifindex(self, iface: int | str) -> int:
        return self._hooks.ifindex(iface)

    # -- guard ------------------------------------------------------------------------------
    def set_guard(self, rate_pps: int, burst: int, ports: Iterable[int],
                  syn_rate_pps: int | None = None, syn_burst: int | None = None) -> None:
        """UDP rate (datagrams/s per source and interface; 0 turns the whole guard off) and
        burst, the join ports it watches (TCP and UDP), and the TCP SYN rate and burst (new
        connections; by default the UDP ones; other TCP segments are never limited). Takes
        effect at the next packet."""
        ports = sorted(set(ports))
        syn_rate_pps = rate_pps if syn_rate_pps is None else syn_rate_pps
        syn_burst = burst if syn_burst is None else syn_burst
        for name, rate in (("rate_pps", rate_pps), ("syn_rate_pps", syn_rate_pps)):
            if not 0 <= rate <= 10_000_000:
                raise ValueError(f"{name}: between 0 and 10000000 (got {rate})")
        for name, depth in (("burst", burst), ("syn_burst", syn_burst)):
            if not 1 <= depth <= 1_000_000:
                raise ValueError(f"{name}: between 1 and 1000000 (got {depth})")
        if len(ports) > JP_GUARD_MAX_PORTS or any(not 1 <= p <= 65535 for p in ports):
            raise ValueError(f"ports: up to {JP_GUARD_MAX_PORTS} ports in 1..65535 (got {ports})")
        cfg = GuardCfgC(rate_pps=rate_pps, burst=burst, syn_rate_pps=syn_rate_pps,
                        syn_burst=syn_burst)
        for i, port in enumerate(ports):
            cfg.ports[i] = port
        with self._lock:
            update_elem(self._map("guard", "jp_guard_cfg"), u32(0), cfg, "jp_guard_cfg")
            self._state.guard = cfg

    def guard_bucket(self, source: str, ifindex: int,
                     proto: int = 17) -> tuple[float, int, int] | None:
        """(tokens, last refill ns, packets dropped) of one bucket (proto 17: UDP; 6: TCP
        SYNs), for status and tests."""
        key = GuardKeyC(ifindex=ifindex, proto=proto)
        addr = ipaddress.ip_address(source.split("%")[0])
        if isinstance(addr, ipaddress.IPv4Address):
            addr = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
        key.addr[:] = addr.packed
        value = GuardBucketC()
        with self._lock:
            if not lookup_elem(self._map("guard", "jp_guard_bkt"), key, value):
                return None
        return value.tokens / JP_TOKEN_ONE, value.last_ns, value.drops

    def guard_drops_by_source(self) -> dict[tuple[str, int, int], int]:
        """(source, ifindex, proto) -> packets the guard dropped, for every bucket that
        dropped any (one map walk: up to 65536 lookups)."""
        out: dict[tuple[str, int, int], int] = {}
        value = GuardBucketC()
        with self._lock:
            fd = self._map("guard", "jp_guard_bkt")
            for key in map_keys(fd, GuardKeyC):
                if lookup_elem(fd, key, value) and value.drops:
                    addr = ipaddress.IPv6Address(bytes(key.addr))
                    source = addr.ipv4_mapped or addr
                    out[(str(source), key.ifindex, key.proto)] = value.drops
        return out

    def attach_guard(self, iface: int | str) -> str:
        """The guard on a join link's XDP hook; returns "native" or "generic"."""
        return self.attach_xdp(iface, Program.GUARD)

    def detach_guard(self, iface: int | str) -> None:
        self.detach_xdp(iface, Program.GUARD)

    # -- ipip -------------------------------------------------------------------------------
    def set_ipip(self, joins: Mapping[int, IpipJoin], registrars: Iterable[str] = ()) -> None:
        """The whole IPIP configuration: join ifindex -> IpipJoin. Registrars allowed to send
        IPIP are every join's registrar plus `registrars` (e.g. the one being failed away
        from). Idempotent; entries not in the arguments are removed."""
        by_src: dict[bytes, int] = {}
        for ifindex, join in joins.items():
            src = unicast_ipv6(join.outer_src, "outer_src").packed
            if src in by_src:
                raise ValueError(f"outer_src {join.outer_src} is used by join links "
                                 f"{by_src[src]} and {ifindex}: one backbone address per link")
            by_src[src] = ifindex
        if len(joins) > JP_MAX_JOIN_LINKS:
            raise ValueError(f"at most {JP_MAX_JOIN_LINKS} join links (got {len(joins)})")
        allowed = frozenset({j.registrar for j in joins.values()} | set(registrars))
        for r in allowed:
            unicast_ipv6(r, "registrar")
        with self._lock:
            cfg_fd = self._map("ipip", "jp_join_cfg")
            bb_fd = self._map("ipip", "jp_bb_addrs")
            reg_fd = self._map("ipip", "jp_registrars")
            # Return path first (registrars, backbone addresses), then the join side, so no
            # packet is sent whose reply would be refused; removal goes the other way.
            want_regs = {bytes(addr_key(r).addr) for r in allowed}
            for r in allowed:
                update_elem(reg_fd, addr_key(r), RegistrarC(), "jp_registrars")
            want_bb = {}
            for ifindex, join in joins.items():
                key = addr_key(join.outer_src)
                want_bb[bytes(key.addr)] = ifindex
                update_elem(bb_fd, key, BbAddrC(join_ifindex=ifindex), "jp_bb_addrs")
            for ifindex, join in joins.items():
                update_elem(cfg_fd, u32(ifindex), join.to_c(), "jp_join_cfg")
            for key in map_keys(cfg_fd, u32):
                if key.value not in joins:
                    delete_elem(cfg_fd, key, "jp_join_cfg")
            # After the entries: a program that sees the new generation rebuilds its cached
            # copy from the new configuration.
            self._generation = (self._generation + 1) & 0xFFFFFFFF
            update_elem(self._map("ipip", "jp_ipip_gen"), u32(0), IpipGenC(self._generation),
                        "jp_ipip_gen")
            for key in map_keys(bb_fd, AddrC):
                if bytes(key.addr) not in want_bb:
                    delete_elem(bb_fd, key, "jp_bb_addrs")
            for key in map_keys(reg_fd, AddrC):
                if bytes(key.addr) not in want_regs:
                    delete_elem(reg_fd, key, "jp_registrars")
            self._state.ipip = dict(joins)
            self._state.registrars = allowed

    def set_ipip_xdp(self, enabled: bool) -> None:
        """Run jp_xdp_join after the guard on every guarded link (it ignores links without an
        IPIP entry). The tc programs stay attached as the slow path: packets whose next hop
        the XDP program cannot resolve, and packets too big for the backbone (tc answers
        them with a Packet Too Big), are passed to them."""
        with self._lock:
            self._state.ipip_xdp = enabled
            self._write_next_slot()

    def _write_next_slot(self) -> None:
        """The guard's one slot: ipip's fast path first, else jpy's, else none. Each program
        passes packets of links it does not serve, so the slot never loses a packet."""
        fd = self._map("guard", "jp_guard_next")
        program = Program.XDP_JOIN if self._state.ipip_xdp else \
            Program.JPY_XDP_JOIN if self._state.jpy_xdp and "jpy" in self._objects else None
        if program is not None:
            update_elem(fd, u32(0), ctypes.c_int(self.prog_fd(program)), "jp_guard_next")
        else:
            delete_elem(fd, u32(0), "jp_guard_next")

    def attach_ipip_join(self, iface: int | str) -> None:
        self.attach_tc(iface, Program.TC_JOIN)

    def detach_ipip_join(self, iface: int | str) -> None:
        self.detach_tc(iface, Program.TC_JOIN)

    def attach_ipip_backbone(self, iface: int | str) -> None:
        self.attach_tc(iface, Program.TC_BACKBONE)

    def detach_ipip_backbone(self, iface: int | str) -> None:
        self.detach_tc(iface, Program.TC_BACKBONE)

    # -- bare redirect (benchmarks) --------------------------------------------------------
    def set_bare_target(self, ifindex: int) -> None:
        """Where jp_bare_redir sends frames; 0 makes it a counting sink."""
        with self._lock:
            update_elem(self._map("bare", "jp_bare_cfg"), u32(0), BareCfgC(ifindex=ifindex),
                        "jp_bare_cfg")

    # -- attach / detach (bpf_attach.py) -----------------------------------------------
    def attach_xdp(self, iface: int | str, program: Program | str) -> str:
        """Put program on the link's XDP hook, natively or else generically (logged),
        replacing any joinproxyd program there. Returns the mode used."""
        return self._hooks.attach_xdp(iface, program)

    def detach_xdp(self, iface: int | str, program: Program | str | None = None) -> None:
        """Remove our program (any of ours if program is None) from the link's XDP hook,
        whichever process attached it; a foreign program or none is left alone."""
        self._hooks.detach_xdp(iface, program)

    def attach_tc(self, iface: int | str, program: Program | str) -> None:
        """Put program on the link's clsact ingress hook (direct action), replacing any
        instance of it (ours or a previous run's) at any preference."""
        self._hooks.attach_tc(iface, program)

    def detach_tc(self, iface: int | str, program: Program | str) -> None:
        """Remove every instance of our program from the link's clsact ingress hook, and the
        clsact qdisc if this process created it and nothing is left on it."""
        self._hooks.detach_tc(iface, program)

    def hooks(self) -> list[Hook]:
        """Every hook in this namespace holding one of our programs, whoever attached it
        (this process or a previous one)."""
        return self._hooks.hooks()

    def attached(self) -> list[Hook]:
        """The hooks this process attached (and has not detached)."""
        return self._hooks.attached()

    def detach_stale(self) -> list[Hook]:
        """Remove our programs from every hook this process did not attach (left by a killed
        daemon). Call once the control plane has attached everything it wants."""
        return self._hooks.detach_stale()

    # -- counters -----------------------------------------------------------------------
    def _rows(self) -> dict[Program, CountersC]:
        lib = libbpf()
        rows: dict[Program, CountersC] = {}
        with self._lock:
            if self._closed:
                return rows
            for obj in self._objects.values():
                fd = obj.maps["jp_counters"]
                per_cpu = (CountersC * lib.ncpus)()
                for program in obj.spec.programs:
                    key = u32(list(Program).index(program))
                    check(lib.bpf_map_lookup_elem(fd, ctypes.byref(key),
                                                  ctypes.byref(per_cpu)),
                          "read jp_counters")
                    total = CountersC()
                    for cpu in per_cpu:
                        for i in range(len(Action)):
                            total.action[i] += cpu.action[i]
                        for i in range(len(DropReason)):
                            total.drop[i] += cpu.drop[i]
                    rows[program] = total
        return rows

    def counters(self) -> dict[tuple[str, str], int]:
        """(program name, action) -> packets, summed over CPUs; every pair, zeros included."""
        return {(program.value, action.value): row.action[i]
                for program, row in self._rows().items() for i, action in enumerate(Action)}

    def drops(self) -> dict[tuple[str, str], int]:
        """(program name, DropReason value) -> packets, summed over CPUs."""
        return {(program.value, reason.value): row.drop[i]
                for program, row in self._rows().items() for i, reason in enumerate(DropReason)}

    def nexthops(self) -> dict[int, dict[str, Any]]:
        """Join ifindex -> the backbone next hop the IPIP programs use without a route lookup
        ({"ifindex", "dmac", "smac", "mtu"}), for links where some CPU has one cached."""
        lib = libbpf()
        out: dict[int, dict[str, Any]] = {}
        with self._lock:
            if self._closed or "ipip" not in self._objects:
                return out
            fd = self._map("ipip", "jp_encap_cache")
            for ifindex in self._state.ipip:
                per_cpu = (EncapC * lib.ncpus)()
                check(lib.bpf_map_lookup_elem(fd, ctypes.byref(u32(ifindex % JP_ENCAP_SLOTS)),
                                              ctypes.byref(per_cpu)), "read jp_encap_cache")
                known = [e for e in per_cpu if e.ifindex == ifindex and e.egress
                         and e.generation == self._generation]
                if known:
                    e = max(known, key=lambda n: n.expires)
                    macs = bytes(e.hdr[JP_ENCAP_ETH:JP_ENCAP_ETH + 12])
                    out[ifindex] = {"ifindex": e.egress, "mtu": e.mtu,
                                    "dmac": ":".join(f"{b:02x}" for b in macs[:6]),
                                    "smac": ":".join(f"{b:02x}" for b in macs[6:])}
        return out

    def ipip_maps(self) -> dict[str, Any]:
        """What the IPIP maps hold, read back from the kernel (not this process's record):
        {"join": {ifindex: {...}}, "backbone_addresses": {address: ifindex},
        "registrars": [address]}. Every entry is per join link or per registrar, never per
        pledge: tests and operators can check the proxy stays stateless."""
        def text(raw: Any) -> str:
            return str(ipaddress.IPv6Address(bytes(raw)))

        out: dict[str, Any] = {"join": {}, "backbone_addresses": {}, "registrars": []}
        with self._lock:
            if self._closed or "ipip" not in self._objects:
                return out
            cfg_fd = self._map("ipip", "jp_join_cfg")
            for key in map_keys(cfg_fd, u32):
                cfg = JoinCfgC()
                if lookup_elem(cfg_fd, key, cfg):
                    out["join"][key.value] = {
                        "registrar_ll": text(cfg.registrar_ll), "outer_src": text(cfg.outer_src),
                        "registrar": text(cfg.outer_dst), "backbone_ifindex": cfg.backbone_ifindex,
                        "ports": [p for p in cfg.ports if p], "proto": cfg.proto}
            bb_fd = self._map("ipip", "jp_bb_addrs")
            for addr in map_keys(bb_fd, AddrC):
                bb = BbAddrC()
                if lookup_elem(bb_fd, addr, bb):
                    out["backbone_addresses"][text(addr.addr)] = bb.join_ifindex
            reg_fd = self._map("ipip", "jp_registrars")
            out["registrars"] = sorted(text(a.addr) for a in map_keys(reg_fd, AddrC))
        return out

    def kernel_drops(self, programs: Iterable[Program] = IPIP_PROGRAMS) -> dict[str, int]:
        """Drops by DropReason value over the given programs, for RelayMode.kernel_drops."""
        wanted = {Program(p).value for p in programs}
        out: dict[str, int] = {}
        for (program, reason), value in self.drops().items():
            if program in wanted and value:
                out[reason] = out.get(reason, 0) + value
        return out

    def status(self) -> dict[str, Any]:
        """A JSON-ready view for joinproxyctl."""
        with self._lock:
            guard = self._state.guard
            return {
                "pin_dir": str(self.pin_dir) if self.pin_dir else None,
                "attached": self._hooks.describe(),
                "guard": None if guard is None else {
                    "rate_pps": guard.rate_pps, "burst": guard.burst,
                    "ports": [p for p in guard.ports if p],
                    "syn_rate_pps": guard.syn_rate_pps, "syn_burst": guard.syn_burst},
                "ipip": {str(i): {"registrar_ll": j.registrar_ll, "outer_src": j.outer_src,
                                  "registrar": j.registrar, "proto": j.proto,
                                  "ports": list(j.ports)} for i, j in self._state.ipip.items()},
                "ipip_xdp": self._state.ipip_xdp,
                "jpy_xdp": self.jpy_xdp_runs,
                "nexthops": {str(i): nh for i, nh in self.nexthops().items()},
            }

    # -- the JPY relay (jpy.bpf.o; relays/jpy.py decides) --------------------------------
    @property
    def has_jpy(self) -> bool:
        return "jpy" in self._objects and not self._closed

    def set_jpy_key(self, slot: int, key_id: int, key: bytes | None) -> None:
        """Create slot's AES-256 context from key (32 bytes) sealing under key_id, through
        jp_jpy_setkey (contexts can only be made by a syscall program); key None retires the
        slot (headers of its id stop opening)."""
        args = JpyKeyArgsC(slot=slot, key_id=key_id)
        fd = self._map("jpy", "jp_jpy_keys")
        if key is None:
            # A slot with live=0 never opens; its context is freed with the map or on reuse.
            raw = (ctypes.c_uint8 * 16)()
            update_elem(fd, u32(slot), raw, "jp_jpy_keys")
            return
        if len(key) != 32:
            raise ValueError("a JPY kernel key is 32 bytes (AES-256)")
        args.key[:] = key
        with self._lock:
            syscall_run(self.prog_fd(Program.JPY_SETKEY), args, "jp_jpy_setkey")
        if args.result != 0:
            raise KernelError(f"bpf_crypto_ctx_create(ecb(aes)): {describe_errno(-args.result)}",
                              errno=-args.result)

    def set_jpy(self, cfg: JpyCfgC | None, links: Mapping[int, JpyLinkC]) -> None:
        """Write the JPY relay's configuration (None: relay nothing in the kernel) and its
        join links (ifindex -> link), removing links no longer given."""
        with self._lock:
            cfg_fd = self._map("jpy", "jp_jpy_cfg")
            update_elem(cfg_fd, u32(0), cfg if cfg is not None else JpyCfgC(), "jp_jpy_cfg")
            links_fd = self._map("jpy", "jp_jpy_links")
            for index, link in links.items():
                update_elem(links_fd, u32(index), link, "jp_jpy_links")
            for key in map_keys(links_fd, u32):
                if key.value not in links:
                    delete_elem(links_fd, key, "jp_jpy_links")

    def set_jpy_xdp(self, enabled: bool) -> bool:
        """Run jp_jpy_xdp_join after the guard on every guarded link (it passes links and
        packets it does not handle on to jp_jpy_join in tc), unless ipip's fast path holds
        the guard's slot. True when it runs."""
        with self._lock:
            if "guard" not in self._objects:
                return False
            self._state.jpy_xdp = enabled
            self._write_next_slot()
            return self.jpy_xdp_runs

    @property
    def jpy_xdp_runs(self) -> bool:
        """The guard's slot holds jp_jpy_xdp_join."""
        return self._state.jpy_xdp and not self._state.ipip_xdp and "guard" in self._objects \
            and "jpy" in self._objects

    def jpy_stats(self) -> dict[str, int]:
        """What the JPY programs did, summed over CPUs: JpyCount values, plus bytes_up and
        bytes_down."""
        lib = libbpf()
        with self._lock:
            if self._closed or "jpy" not in self._objects:
                return {}
            per_cpu = (JpyStatsC * lib.ncpus)()
            check(lib.bpf_map_lookup_elem(self._map("jpy", "jp_jpy_stats"),
                                          ctypes.byref(u32(0)), ctypes.byref(per_cpu)),
                  "read jp_jpy_stats")
        out = {c.value: sum(cpu.n[i] for cpu in per_cpu) for i, c in enumerate(JpyCount)}
        out["bytes_up"] = sum(cpu.bytes_up for cpu in per_cpu)
        out["bytes_down"] = sum(cpu.bytes_down for cpu in per_cpu)
        out["xdp_up"] = sum(cpu.xdp_up for cpu in per_cpu)
        return out

    def jpy_last(self) -> dict[str, tuple[str, int, int]]:
        """For each kind of JPY drop: (source address, ifindex, source port) of the latest
        one on any CPU."""
        lib = libbpf()
        out: dict[str, tuple[str, int, int]] = {}
        with self._lock:
            if self._closed or "jpy" not in self._objects:
                return out
            fd = self._map("jpy", "jp_jpy_last")
            for i, kind in enumerate(JpyCount):
                per_cpu = (JpyWhoC * lib.ncpus)()
                check(lib.bpf_map_lookup_elem(fd, ctypes.byref(u32(i)), ctypes.byref(per_cpu)),
                      "read jp_jpy_last")
                seen = [w for w in per_cpu if w.seq]
                if seen:
                    w = max(seen, key=lambda w: w.seq)
                    out[kind.value] = (str(ipaddress.IPv6Address(bytes(w.addr))), w.ifindex,
                                       w.port)
        return out

    # -- BPF_PROG_TEST_RUN --------------------------------------------------------------
    def _run(self, program: Program, packet: bytes, repeat: int, live: bool, ifindex: int,
             batch_size: int = 0) -> tuple[int, bytes, int]:
        return prog_test_run(self.prog_fd(program), packet, repeat, xdp=program in XDP_PROGRAMS,
                             live=live, ifindex=ifindex, batch_size=batch_size,
                             what=f"test run of {program}")

    def test_run(self, program: Program | str, packet: bytes, repeat: int = 1,
                 live: bool = False, ifindex: int = 0) -> tuple[int, bytes]:
        """Run program on packet (BPF_PROG_TEST_RUN): (return code, packet after the run).
        live=True (XDP only) sends the resulting frames for real and returns no bytes.
        ifindex is the ingress device (in this thread's namespace); 0 means loopback."""
        program = Program(program)
        if live and program not in XDP_PROGRAMS:
            raise ValueError("live frames exist for XDP programs only")
        retval, out, _ = self._run(program, packet, repeat, live, ifindex)
        return retval, out

    def bench_run(self, program: Program | str, packet: bytes, repeat: int,
                  live: bool = False, ifindex: int = 0, batch_size: int = 0) -> int:
        """Average nanoseconds per run over `repeat` runs (the kernel's measurement)."""
        program = Program(program)
        if live and program not in XDP_PROGRAMS:
            raise ValueError("live frames exist for XDP programs only")
        return self._run(program, packet, repeat, live, ifindex, batch_size)[2]


# -- the drop tracer's device set (kernel/drop_trace.py loads that object; its one map the
# -- control plane writes is written here, with every other map write) ---------------------
def set_watched_devices(fd: int, key_type: type[Any], wanted: set[tuple[int, int]]) -> None:
    """Make the jp_trace_ifs map at fd hold exactly the (netns inode, ifindex) pairs."""
    have = {(key.netns, key.ifindex) for key in map_keys(fd, key_type)}
    for netns, ifindex in have - wanted:
        delete_elem(fd, key_type(netns, ifindex), "jp_trace_ifs")
    for netns, ifindex in wanted - have:
        update_elem(fd, key_type(netns, ifindex), ctypes.c_uint8(1), "jp_trace_ifs")

# --- the circuit splice's object ---------------------------------------------------------

SPLICE_OBJECT = "splice.bpf.o"
PROGRAM = b"jp_splice_verdict"
SOCKS, SIDES = b"jp_splice_socks", b"jp_splice_sides"
BPF_SK_SKB_STREAM_VERDICT = 5  # enum bpf_attach_type
BPF_SK_SKB_VERDICT = 38  # the same program without the stream wrapper (5.13+)
BPF_NOEXIST = 1


class SideC(ctypes.Structure):
    """struct jp_splice_side (ebpf/splice.bpf.c)."""

    _fields_ = [("peer", ctypes.c_uint64), ("bytes", ctypes.c_uint64),
                ("segments", ctypes.c_uint64), ("dropped", ctypes.c_uint64)]


class Splicer:
    """The circuit splice (relays/circuit_splice.py): splice.bpf.o loaded on its own (its
    maps are never pinned: spliced sockets die with the daemon), one program attached to one
    sockhash, and the sides' rows."""

    def __init__(self, obj_dir: Path | None = None,
                 attach: int = BPF_SK_SKB_STREAM_VERDICT) -> None:
        lib = libbpf()
        path = Path(obj_dir or DEFAULT_OBJ_DIR) / SPLICE_OBJECT
        self._obj = lib.bpf_object__open_file(str(path).encode(), None)
        if not self._obj:
            code = errno_now()
            raise KernelError(f"open {path}: {describe_errno(code)} (run 'make -C ebpf')",
                              errno=code)
        try:
            seen = lib.lines_logged
            rc = lib.bpf_object__load(self._obj)
            if rc < 0:
                raise KernelError(f"load {path.name}: {describe_errno(-rc)}\n"
                                  f"{lib.said_since(seen)}", errno=-rc)
            prog = lib.bpf_object__find_program_by_name(self._obj, PROGRAM)
            socks = lib.bpf_object__find_map_by_name(self._obj, SOCKS)
            sides = lib.bpf_object__find_map_by_name(self._obj, SIDES)
            if not (prog and socks and sides):
                raise KernelError(f"{path.name}: program or maps missing", errno=errno.ENOENT)
            self.prog_fd = check(lib.bpf_program__fd(prog), "fd of jp_splice_verdict")
            self.socks_fd = check(lib.bpf_map__fd(socks), "fd of jp_splice_socks")
            self.sides_fd = check(lib.bpf_map__fd(sides), "fd of jp_splice_sides")
            attach_type, attach = attach, lib.lib.bpf_prog_attach
            attach.restype = ctypes.c_int
            attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
            check(attach(self.prog_fd, self.socks_fd, attach_type, 0),
                  "attach jp_splice_verdict to jp_splice_socks")
        except BaseException:
            self.close()
            raise

    def add_side(self, cookie: int, peer: int) -> None:
        update_elem(self.sides_fd, ctypes.c_uint64(cookie), SideC(peer=peer),
                    "jp_splice_sides")

    def insert(self, sock: socket.socket, cookie: int) -> None:
        """Put an established socket into the sockhash; the kernel may refuse (KernelError
        with its errno)."""
        update_elem(self.socks_fd, ctypes.c_uint64(cookie), ctypes.c_uint32(sock.fileno()),
                    "jp_splice_socks", BPF_NOEXIST)

    def side(self, cookie: int) -> SideC | None:
        row = SideC()
        return row if lookup_elem(self.sides_fd, ctypes.c_uint64(cookie), row) else None

    def remove_sock(self, cookie: int) -> None:
        with contextlib.suppress(KernelError):
            delete_elem(self.socks_fd, ctypes.c_uint64(cookie), "jp_splice_socks")

    def forget(self, cookie: int) -> None:
        """Remove a side's row only (its socket leaves the sockhash as it closes)."""
        with contextlib.suppress(KernelError):
            delete_elem(self.sides_fd, ctypes.c_uint64(cookie), "jp_splice_sides")

    def remove(self, cookie: int) -> None:
        for fd, what in ((self.socks_fd, "jp_splice_socks"), (self.sides_fd, "jp_splice_sides")):
            with contextlib.suppress(KernelError):  # already gone with its socket
                delete_elem(fd, ctypes.c_uint64(cookie), what)

    def close(self) -> None:
        if self._obj:
            libbpf().bpf_object__close(self._obj)
            self._obj = None
