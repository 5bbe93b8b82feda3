"""Attaching our programs to hooks over netlink (pyroute2): XDP on a link, tc on a link's
clsact ingress, and the clsact qdiscs added for them; scanning a namespace for our programs.

Attaching replaces whatever joinproxyd program sits on that hook, ours or left by a killed
daemon, so each hook holds exactly one of ours; a foreign program on an XDP hook is refused
(EBUSY), never replaced. Ours means: a program this process loaded, one a previous daemon
pinned (bpf_object.py; the daemon's unit has no CAP_SYS_ADMIN, without which the kernel names
no program by id), or, when the kernel does answer, one named like ours; tc filters carry the
name "<program>:<id>". Closing detaches only what this process attached; ``detach_stale()``
removes our programs from hooks this process did not attach (a killed daemon's leftovers).
A clsact qdisc is added where a tc program needs one and none is there, claimed first in
``qdisc_record`` (qdisc_record.py) so that a run after kill -9 knows it for ours; ours are
removed once no filter of anyone's is left on them, a clsact that was there before never.

Netlink runs on one private worker thread, because pyroute2's synchronous IPRoute cannot run
inside a running asyncio loop; the calls block for a few milliseconds, so the daemon may call
them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import KernelError, describe_errno
from .bpf_layout import OUR_PROGRAM_NAMES, XDP_PROGRAMS, Program
from .libbpf import libbpf, prog_id_of_fd, prog_name_by_id, prog_name_of_fd
from .qdisc_record import QdiscRecord

log = logging.getLogger(__name__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4
TC_H_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress, ffff:fff2
TC_H_EGRESS_PARENT = 0xFFFFFFF3
ETH_P_ALL = 0x0003
# One fixed tc preference per program, so "replace" is atomic and two of our programs on
# one link (a link both join and backbone, in a lab) do not fight over a slot.
TC_PREF = {Program.TC_JOIN: 0x4A01, Program.TC_BACKBONE: 0x4A02,
           Program.JPY_JOIN: 0x4A03, Program.JPY_BACKBONE: 0x4A04, Program.BARE_TC: 0x4A05}
TC_HANDLE = 1

T = TypeVar("T")


@dataclass(frozen=True)
class Hook:
    """Where one of our programs is attached: kind "xdp" (one program per link) or
    "tc-ingress" (one per program and link: a lab link may be join and backbone at once)."""

    kind: str
    ifindex: int
    program: str


@dataclass
class Attached:
    program: Program
    mode: str  # "native" | "generic" for XDP, "ingress" for tc


def nl_error(exc: Exception, what: str) -> KernelError:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return KernelError(f"{what}: {describe_errno(code)}", errno=code)
    return KernelError(f"{what}: {exc}")


class NetlinkWorker:
    """pyroute2 on one worker thread (IPRoute cannot run inside a running asyncio loop)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jp-bpf-netlink")
        self._ipr: Any = None

    def run(self, fn: Callable[[Any], T]) -> T:
        def call() -> T:
            from pyroute2 import IPRoute  # imported lazily: only attach needs it
            from pyroute2.netlink.exceptions import NetlinkError

            if self._ipr is None:
                self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
            try:
                return fn(self._ipr)
            except (NetlinkError, KernelError):
                raise  # the kernel said no; the socket is fine
            except Exception:
                # pyroute2 keeps a failed socket failed: start afresh next time
                with contextlib.suppress(Exception):
                    self._ipr.close()
                self._ipr = None
                raise

        return self._pool.submit(call).result()

    def close(self) -> None:
        def shut() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        self._pool.submit(shut).result()
        self._pool.shutdown(wait=True)


def _xdp_ids(ipr: Any, ifindex: int) -> dict[str, int]:
    """{"native": id, "generic": id} of the XDP programs on a link."""
    link = ipr.link("get", index=ifindex)[0]
    xdp = link.get_attr("IFLA_XDP")
    ids = {}
    if xdp is not None:
        for attr, mode in (("IFLA_XDP_DRV_PROG_ID", "native"),
                           ("IFLA_XDP_SKB_PROG_ID", "generic")):
            value = xdp.get_attr(attr)
            if value:
                ids[mode] = value
    return ids


def _set_xdp(ipr: Any, ifindex: int, fd: int, mode: str, expected_fd: int | None) -> None:
    flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
    attrs: list[tuple[str, int]] = [("IFLA_XDP_FD", fd)]
    if expected_fd is not None:
        # Replace (or remove) only the program we looked at, never one attached meanwhile.
        attrs.append(("IFLA_XDP_EXPECTED_FD", expected_fd))
        flags |= XDP_FLAGS_REPLACE
    attrs.append(("IFLA_XDP_FLAGS", flags))
    ipr.link("set", index=ifindex, xdp={"attrs": attrs})


def _tc_filters(ipr: Any, ifindex: int, parent: int) -> list[tuple[int, int, str]]:
    """(pref, handle, name) of the bpf filters on a clsact hook; [] without clsact."""
    try:
        msgs = ipr.get_filters(index=ifindex, parent=parent)
    except Exception as exc:  # EINVAL without a clsact qdisc
        if getattr(exc, "code", None) in (errno.EINVAL, errno.ENOENT):
            return []
        raise
    out = []
    for msg in msgs:
        opts = msg.get_attr("TCA_OPTIONS")
        if msg.get_attr("TCA_KIND") != "bpf" or opts is None:
            continue  # the chain header entry
        out.append(((msg["info"] >> 16) & 0xFFFF, msg["handle"], opts.get_attr("TCA_BPF_NAME")))
    return out


def _has_filters(ipr: Any, ifindex: int) -> bool:
    """Does the link's clsact hold any filter at all, ours or anyone's, either direction?"""
    for parent in (TC_H_INGRESS_PARENT, TC_H_EGRESS_PARENT):
        try:
            msgs = ipr.get_filters(index=ifindex, parent=parent)
        except Exception as exc:  # EINVAL without a clsact qdisc
            if getattr(exc, "code", None) in (errno.EINVAL, errno.ENOENT):
                continue
            raise
        if any(msg.get_attr("TCA_KIND") for msg in msgs):
            return True
    return False


def _base(filter_name: str | None) -> str:
    """Our tc filter names are "<program>:<prog id>"; anything else is not ours."""
    return (filter_name or "").split(":")[0]


def _del_filter(ipr: Any, ifindex: int, pref: int, handle: int) -> None:
    ipr.tc("del-filter", "bpf", index=ifindex, parent=TC_H_INGRESS_PARENT, prio=pref,
           handle=handle, protocol=ETH_P_ALL)


# ------------------------------------------------------------------ the hooks -------------
class Attachments:
    """The hooks of one network namespace that hold our programs: attach and detach over
    netlink, with the record of what this process attached and which clsact qdiscs are ours.
    Shares its owner's lock; prog_fd and own_ids come from the owner's loaded objects."""

    def __init__(self, netns: str | None, qdisc_record: Path | None, lock: threading.RLock,
                 prog_fd: Callable[[Program], int],
                 own_ids: Callable[[], dict[int, int]]) -> None:
        self.netns = netns
        self._nl = NetlinkWorker(netns)
        self._attached: dict[Hook, Attached] = {}
        # clsact qdiscs we created: this process, or a killed one that wrote them down
        # (qdisc_record.py); only these are ever removed
        self._qdiscs: set[int] = set()
        self._record = QdiscRecord(qdisc_record) if qdisc_record is not None else None
        self._lock = lock
        self._prog_fd = prog_fd
        self._own_ids = own_ids

    def adopt_qdiscs(self) -> None:
        """The clsact qdiscs a killed run of ours claimed, on links that are still the same
        links, are ours to remove when they are empty."""
        if self._record is None or not self._record.load():
            return

        def names(ipr: Any) -> dict[int, str]:
            return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")}

        self._record.keep_only(self._nl.run(names))
        self._qdiscs |= set(self._record.claims)

    def close(self, detach: bool) -> list[str]:
        """Detach what this process attached (detach=False leaves the programs running, to
        be adopted by the next start), remove our empty clsact qdiscs and stop the netlink
        worker. Returns what failed, one line each."""
        errors: list[str] = []
        if detach:
            for hook in list(self._attached):
                try:
                    if hook.kind == "xdp":
                        self._detach_xdp(hook.ifindex, Program(hook.program), own=True)
                    else:
                        self._detach_tc(hook.ifindex, Program(hook.program), own=True)
                except KernelError as exc:
                    errors.append(str(exc))
            try:  # a killed run's, on links this one did not use
                self._remove_empty_qdiscs()
            except KernelError as exc:
                errors.append(str(exc))
        self._nl.close()
        return errors

    def describe(self) -> list[dict[str, Any]]:
        """The hooks this process attached, JSON-ready, for status."""
        with self._lock:
            return [{"hook": h.kind, "ifindex": h.ifindex, "program": h.program,
                     "mode": a.mode}
                    for h, a in sorted(self._attached.items(),
                                       key=lambda kv: (kv[0].ifindex, kv[0].kind))]

    def _ours(self, prog_id: int) -> bool:
        """Is the program with this id joinproxyd's? Known ids first; the kernel's name only
        when this process may ask for it (root)."""
        return prog_id in self._own_ids() or prog_name_by_id(prog_id) in OUR_PROGRAM_NAMES

    def name_of(self, prog_id: int) -> str:
        """Name of one of our programs by id: from an fd we hold (no privilege needed), else
        from the kernel (root only)."""
        fd = self._own_ids().get(prog_id)
        if fd is not None:
            return prog_name_of_fd(fd)
        return prog_name_by_id(prog_id) or "?"

    def _xdp_swap(self, ipr: Any, ifindex: int, fd: int, mode: str,
                  old_id: int | None) -> None:
        """Attach fd (-1: detach) in mode; if old_id is given, replace exactly that program
        when we can hold an fd on it (the kernel then refuses if another one came meanwhile)."""
        expected, close_after = None, False
        if old_id:
            expected = self._own_ids().get(old_id)
            if expected is None:
                by_id = libbpf().bpf_prog_get_fd_by_id(old_id)  # root only
                if by_id >= 0:
                    expected, close_after = by_id, True
        try:
            _set_xdp(ipr, ifindex, fd, mode, expected)
        finally:
            if close_after and expected is not None:
                os.close(expected)

    def ifindex(self, iface: int | str) -> int:
        if isinstance(iface, int):
            return iface

        def lookup(ipr: Any) -> int:
            found = ipr.link_lookup(ifname=iface)
            if not found:
                raise KernelError(f"{iface}: no such interface", errno=errno.ENODEV)
            return int(found[0])

        return self._nl.run(lookup)

    # -- attach / detach ------------------------------------------------------------------
    # Ours is recognised by program name: the kernel's name of an XDP program, and for tc the
    # filter name we give, "<program>:<prog id>" (the id tells this process's instance from a
    # previous one's). Explicit detach_* remove any instance of ours; close() only its own.

    def attach_xdp(self, iface: int | str, program: Program | str) -> str:
        """Put program on the link's XDP hook, natively or else generically (logged),
        replacing any joinproxyd program there. Returns the mode used."""
        program = Program(program)
        if program not in XDP_PROGRAMS:
            raise ValueError(f"{program} is not an XDP program")
        fd = self._prog_fd(program)
        ifindex = self.ifindex(iface)

        def attach(ipr: Any) -> str:
            ours: dict[str, int] = {}
            for mode, prog_id in _xdp_ids(ipr, ifindex).items():
                if not self._ours(prog_id):
                    name = prog_name_by_id(prog_id) or "name unknown without CAP_SYS_ADMIN"
                    raise KernelError(f"{iface}: XDP hook holds another program ({name}, id "
                                      f"{prog_id}); not replacing it", errno=errno.EBUSY)
                ours[mode] = prog_id
            if "generic" in ours:
                # A link cannot have native and generic programs at once: a previous run
                # fell back to generic; take it off before trying native again.
                self._xdp_swap(ipr, ifindex, -1, "generic", ours.pop("generic"))
            try:
                self._xdp_swap(ipr, ifindex, fd, "native", ours.get("native"))
                return "native"
            except Exception as exc:
                if "native" in ours:
                    raise nl_error(exc, f"{iface}: replace XDP program") from exc
                log.info("%s: native XDP refused (%s); attaching %s in generic mode",
                         iface, nl_error(exc, "attach"), program)
            try:
                self._xdp_swap(ipr, ifindex, fd, "generic", None)
            except Exception as exc:
                raise nl_error(exc, f"{iface}: attach XDP program {program}") from exc
            return "generic"

        with self._lock:
            mode = self._nl.run(attach)
            for hook in [h for h in self._attached if h.kind == "xdp" and h.ifindex == ifindex]:
                del self._attached[hook]  # replaced on the hook
            self._attached[Hook("xdp", ifindex, program.value)] = Attached(program, mode)
            log.debug("%s: %s attached (XDP %s)", iface, program, mode)
            return mode

    def detach_xdp(self, iface: int | str, program: Program | str | None = None) -> None:
        """Remove our program (any of ours if program is None) from the link's XDP hook,
        whichever process attached it; a foreign program or none is left alone."""
        ifindex = self.ifindex(iface)
        with self._lock:
            self._detach_xdp(ifindex, Program(program) if program is not None else None)

    def _tc_name(self, program: Program) -> str:
        return f"{program.value}:{prog_id_of_fd(self._prog_fd(program))}"

    def attach_tc(self, iface: int | str, program: Program | str) -> None:
        """Put program on the link's clsact ingress hook (direct action), replacing any
        instance of it (ours or a previous run's) at any preference."""
        program = Program(program)
        if program not in TC_PREF:
            raise ValueError(f"{program} is not a tc program")
        fd = self._prog_fd(program)
        ifindex = self.ifindex(iface)
        pref, name = TC_PREF[program], self._tc_name(program)

        def attach(ipr: Any) -> bool:
            created = True
            claimed = ifindex not in self._qdiscs and self._record is not None
            if claimed and self._record is not None:  # written down before it exists
                link = ipr.link("get", index=ifindex)[0]
                self._record.claim(ifindex, link.get_attr("IFLA_IFNAME"))
            try:
                ipr.tc("add", "clsact", index=ifindex)
            except Exception as exc:
                if claimed and self._record is not None:
                    self._record.withdraw(ifindex)
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise nl_error(exc, f"{iface}: add clsact qdisc") from exc
                # already there: normal; ours only if we (or a killed run) added it
                created = False
            try:
                # replace is atomic: no packet sees the hook empty
                ipr.tc("replace-filter", "bpf", index=ifindex, parent=TC_H_INGRESS_PARENT,
                       prio=pref, handle=TC_HANDLE, protocol=ETH_P_ALL, fd=fd, name=name,
                       direct_action=True)
                for other_pref, handle, other in _tc_filters(ipr, ifindex, TC_H_INGRESS_PARENT):
                    if _base(other) == program and (other_pref, handle) != (pref, TC_HANDLE):
                        _del_filter(ipr, ifindex, other_pref, handle)
            except Exception as exc:
                raise nl_error(exc, f"{iface}: attach tc program {program}") from exc
            return created

        with self._lock:
            if self._nl.run(attach):
                self._qdiscs.add(ifindex)
            self._attached[Hook("tc-ingress", ifindex, program.value)] = \
                Attached(program, "ingress")
            log.debug("%s: %s attached (tc ingress)", iface, program)

    def detach_tc(self, iface: int | str, program: Program | str) -> None:
        """Remove every instance of our program from the link's clsact ingress hook, and the
        clsact qdisc if this process created it and nothing is left on it."""
        ifindex = self.ifindex(iface)
        with self._lock:
            self._detach_tc(ifindex, Program(program))

    def _detach_xdp(self, ifindex: int, program: Program | None, own: bool = False) -> None:
        """Take our program (that program only, if given) off the link's XDP hook; with own,
        only this process's instance (atomically: the kernel checks it is still there)."""
        own_fd = self._prog_fd(program) if own and program is not None else None

        def remove(ipr: Any) -> None:
            for mode, prog_id in _xdp_ids(ipr, ifindex).items():
                if not self._ours(prog_id):
                    continue
                name = self.name_of(prog_id)
                if program is not None and name != program:
                    continue
                if own_fd is None:
                    self._xdp_swap(ipr, ifindex, -1, mode, prog_id)
                    continue
                try:
                    _set_xdp(ipr, ifindex, -1, mode, own_fd)
                except Exception as exc:
                    if getattr(exc, "code", None) != errno.EEXIST:
                        raise
                    log.info("ifindex %d: XDP %s was replaced by another instance; left",
                             ifindex, name)

        self._netlink_tolerant(remove, f"ifindex {ifindex}: detach XDP")
        for hook in [h for h in self._attached if h.kind == "xdp" and h.ifindex == ifindex]:
            del self._attached[hook]

    def _detach_tc(self, ifindex: int, program: Program, own: bool = False) -> None:
        created = ifindex in self._qdiscs
        own_name = self._tc_name(program) if own else None

        def remove(ipr: Any) -> None:
            for pref, handle, name in _tc_filters(ipr, ifindex, TC_H_INGRESS_PARENT):
                if _base(name) == program and own_name in (None, name):
                    _del_filter(ipr, ifindex, pref, handle)
            if created and not _has_filters(ipr, ifindex):
                self._del_qdisc(ipr, ifindex)

        self._netlink_tolerant(remove, f"ifindex {ifindex}: detach {program}")
        self._attached.pop(Hook("tc-ingress", ifindex, program.value), None)

    def _del_qdisc(self, ipr: Any, ifindex: int) -> None:
        try:
            ipr.tc("del", "clsact", index=ifindex)
        except Exception as exc:  # gone already (with its link, or removed by hand)
            if getattr(exc, "code", None) not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                raise
        self._qdiscs.discard(ifindex)
        if self._record is not None:
            self._record.withdraw(ifindex)

    def _remove_empty_qdiscs(self) -> list[int]:
        """Remove the clsact qdiscs of ours (this run's or a killed run's) that hold no
        filter of anyone's and carry no program this process attached."""
        busy = {h.ifindex for h in self._attached if h.kind == "tc-ingress"}
        removed = []
        for ifindex in sorted(self._qdiscs - busy):

            def remove(ipr: Any, ifindex: int = ifindex) -> bool:
                if _has_filters(ipr, ifindex):
                    return False
                self._del_qdisc(ipr, ifindex)
                return True

            try:
                done = self._nl.run(remove)
            except Exception as exc:
                if getattr(exc, "code", None) == errno.ENODEV:  # the link is gone
                    self._qdiscs.discard(ifindex)
                    if self._record is not None:
                        self._record.withdraw(ifindex)
                    continue
                raise nl_error(exc, f"ifindex {ifindex}: remove clsact qdisc") from exc
            if done:
                removed.append(ifindex)
                log.info("removed the clsact qdisc an earlier run added on ifindex %d",
                         ifindex)
        return removed

    def _netlink_tolerant(self, fn: Callable[[Any], None], what: str) -> None:
        """Run a removal; a link that is gone meanwhile has nothing left to remove."""
        try:
            self._nl.run(fn)
        except KernelError:
            raise
        except Exception as exc:
            if getattr(exc, "code", None) != errno.ENODEV:
                raise nl_error(exc, what) from exc

    def hooks(self) -> list[Hook]:
        """Every hook in this namespace holding one of our programs, whoever attached it
        (this process or a previous one)."""

        def scan(ipr: Any) -> list[Hook]:
            found: list[Hook] = []
            for link in ipr.link("dump"):
                ifindex = link["index"]
                for prog_id in _xdp_ids(ipr, ifindex).values():
                    if self._ours(prog_id):
                        found.append(Hook("xdp", ifindex, self.name_of(prog_id)))
                for _, _, name in _tc_filters(ipr, ifindex, TC_H_INGRESS_PARENT):
                    if _base(name) in OUR_PROGRAM_NAMES:
                        found.append(Hook("tc-ingress", ifindex, _base(name)))
            return found

        return self._nl.run(scan)

    def attached(self) -> list[Hook]:
        """The hooks this process attached (and has not detached)."""
        with self._lock:
            return list(self._attached)

    def detach_stale(self) -> list[Hook]:
        """Remove our programs from every hook this process did not attach (left by a killed
        daemon). Call once the control plane has attached everything it wants."""
        removed = []
        with self._lock:
            for hook in self.hooks():
                if hook in self._attached:
                    continue
                if hook.kind == "xdp":
                    self._detach_xdp(hook.ifindex, None)
                else:
                    self._detach_tc(hook.ifindex, Program(hook.program))
                removed.append(hook)
                log.info("removed a stale %s from ifindex %d (%s)", hook.program, hook.ifindex,
                         hook.kind)
            self._remove_empty_qdiscs()
        return removed
