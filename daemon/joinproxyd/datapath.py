"""The BPF data plane as the control plane sees it: opened on first use, closed at stop.

Only a configuration that runs something in BPF (the join-port guard, an ipip link) ever
loads an object, so a circuit-only proxy with the guard off needs neither BPF privileges nor
a bpffs. The objects and their maps belong to kernel/bpf.py (the only writer of maps); this
module decides *when*: open lazily, ``detach_stale()`` once after the first full reconcile (a
killed daemon's programs are replaced by then, and anything of ours left on other hooks is
removed), and ``close(detach=True, unpin=True)`` at stop. A start with nothing to run in BPF
still clears what a killed run left: its pin directory is the tell-tale.

The metrics thread reads counters from here at scrape time; before the data plane is open
(or after it is closed) there is nothing to read, and nothing is exported.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from .kernel import KernelError
from .kernel.bpf import BpfDatapath
from .kernel.bpf_layout import Program
from .kernel.bpf_object import DEFAULT_OBJ_DIR

OBJECTS = ("ipip", "guard")
OPTIONAL = ("jpy",)  # loaded where the kernel can (BPF crypto kfuncs); relays/jpy.py asks
T = TypeVar("T")


class Datapath:
    def __init__(self, pin_dir: Path, obj_dir: Path | None, log: logging.Logger,
                 qdisc_record: Path | None = None) -> None:
        self.pin_dir = pin_dir
        # where the clsact qdiscs we add are claimed, so a run after kill -9 removes them
        self.qdisc_record = qdisc_record
        self.obj_dir = obj_dir or DEFAULT_OBJ_DIR
        self.log = log
        self._dp: BpfDatapath | None = None
        self._open_lock = asyncio.Lock()
        self._guard = threading.Lock()  # _dp as the metrics thread sees it
        self._stale_done = False

    @property
    def opened(self) -> bool:
        return self._dp is not None

    async def get(self) -> BpfDatapath:
        """The open data plane, opening it now if need be (KernelError if it cannot be)."""
        async with self._open_lock:
            if self._dp is None:
                dp = await asyncio.to_thread(BpfDatapath.open, self.obj_dir, self.pin_dir,
                                             objects=OBJECTS, qdisc_record=self.qdisc_record,
                                             optional=OPTIONAL)
                with self._guard:
                    self._dp = dp
                self.log.info("BPF data plane loaded from %s, maps pinned in %s",
                              self.obj_dir, self.pin_dir)
            return self._dp

    async def detach_stale(self, clear_ipip: bool = False) -> None:
        """Once, after the first full reconcile: remove our programs from hooks this process
        did not attach (a killed daemon's), so each hook holds exactly one of ours. With
        clear_ipip (no ipip link configured), the IPIP maps adopted from a killed run that
        had some are emptied too, and the guard no longer hands packets to the XDP
        encapsulation, so no stale configuration waits in a pin."""
        if self._stale_done or self._dp is None:
            return
        self._stale_done = True
        try:
            if clear_ipip:
                await asyncio.to_thread(self._dp.set_ipip, {}, ())
                await asyncio.to_thread(self._dp.set_ipip_xdp, False)
            removed = await asyncio.to_thread(self._dp.detach_stale)
        except KernelError as exc:
            self.log.error("cannot remove BPF programs left by an earlier run: %s", exc)
            return
        if removed:
            self.log.info("removed %d BPF program(s) left by an earlier run", len(removed))

    async def clean_leftovers(self) -> None:
        """Nothing runs in BPF now, but a killed run may have left programs and pins:
        open what it pinned, detach every program of ours, and remove the pins."""
        if not self.pin_dir.is_dir() or self._dp is not None:
            return
        try:
            dp = await asyncio.to_thread(BpfDatapath.open, self.obj_dir, self.pin_dir,
                                         objects=OBJECTS, qdisc_record=self.qdisc_record,
                                         optional=OPTIONAL)
            removed = await asyncio.to_thread(dp.detach_stale)
            await asyncio.to_thread(dp.close, True, True)
        except KernelError as exc:
            self.log.error("cannot remove the BPF state an earlier run left in %s: %s",
                           self.pin_dir, exc)
            return
        self.log.info("removed the BPF state an earlier run left (%d program(s), pins in %s); "
                      "nothing runs in BPF now", len(removed), self.pin_dir)

    async def close(self) -> None:
        """Detach everything this process attached and remove the pins."""
        async with self._open_lock:
            dp = self._dp
            with self._guard:
                self._dp = None
            if dp is None:
                return
            try:
                await asyncio.to_thread(dp.close, True, True)
            except KernelError as exc:
                self.log.error("closing the BPF data plane: %s", exc)

    # -- read at scrape time, from any thread ---------------------------------------------
    def _read(self, what: str, default: T, fn: Callable[[BpfDatapath], T]) -> T:
        with self._guard:
            dp = self._dp
        if dp is None:
            return default
        try:
            return fn(dp)
        except KernelError as exc:  # a scrape must never fail on this
            self.log.debug("reading BPF %s: %s", what, exc)
            return default

    def counters(self) -> dict[tuple[str, str], int]:
        """(program, action) -> packets, every program and action (zeros included)."""
        return self._read("counters", {}, lambda dp: dp.counters())

    def kernel_drops(self, programs: Iterable[Program]) -> dict[str, int]:
        wanted = tuple(programs)
        return self._read("drops", {}, lambda dp: dp.kernel_drops(wanted))

    def status(self) -> dict[str, Any] | None:
        return self._read("status", None, lambda dp: {
            **dp.status(),
            "counters": {f"{program}/{action}": value
                         for (program, action), value in sorted(dp.counters().items())}})

    # -- read by `joinproxyctl trace` (trace.py) --------------------------------------------
    def drops_by_program(self) -> dict[tuple[str, str], int]:
        """(program, DropReason value) -> packets, every program loaded."""
        return self._read("drops", {}, lambda dp: dp.drops())

    def guard_drops_by_source(self) -> dict[tuple[str, int, int], int]:
        """(source, ifindex, proto) -> packets the guard dropped; empty while it is off."""
        return self._read("guard buckets", {}, lambda dp: dp.guard_drops_by_source())
