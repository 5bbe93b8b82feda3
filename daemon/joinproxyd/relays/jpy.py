"""The stateless constrained join proxy (draft-ietf-anima-constrained-join-proxy §4.4–4.5).

A UDP socket on each join link's link-local address and join port takes pledge datagrams;
each leaves, as the JPY message ``[header, datagram]``, from ONE fixed UDP socket towards the
registrar's JPY port. The header is brski.jpy's sealed header (the pledge's address, port and
interface under AES-SIV with a key only this process holds), so the proxy keeps no table of
pledges: a reply is decoded, its header opened, and its content sent to the pledge the header
names, out of the join link it names. The registrar echoes the header unchanged.

What is dropped, silently towards the network and counted by reason:

* jpy-forged: the header does not authenticate (random bytes, a flipped bit, wrong size).
* jpy-stale: the header's key id is neither the current nor the previous key (it was sealed
  before the last-but-one rotation, or by an earlier run of the daemon, or is made up).
* jpy-replayed: exactly these reply bytes were already relayed lately. The header is the same
  for every datagram of a pledge flow (the registrar keys its DTLS connection on it), so it
  cannot carry a sequence number; but a registrar never sends the same datagram twice (DTLS
  record sequence numbers differ even in a retransmitted flight), so an exact copy is a
  replay. A bounded set of digests (stateless.ReplayFilter: REPLAY_MEMORY, the last
  REPLAY_SECONDS) catches copies made within that window; older copies of a still-live header
  reach the pledge, whose DTLS replay window discards them. This is state about replies, not
  about pledges, and its size does not grow with them.
* too-big: a pledge datagram that no longer fits in the IPv6 minimum MTU once wrapped (the
  registrar's path is not known to be larger).
* malformed: a reply that is not a JPY message; unsolicited: not from the active registrar's
  JPY port, or for a join link no longer served; window-closed: the operator's join window is
  closed (stateless, the proxy cannot tell a new pledge from one half-way through, so every
  pledge datagram is refused while it is closed; replies still go through).

Every drop is counted (joinproxyd_drops_total{mode="jpy",reason}) and logged once per sender
and reason every few seconds (base.RefusalSayer): forged replies come at line rate, and the
counter says how many.

Where the work runs ([jpy] datapath, relays/jpy_kernel.py): with the kernel path the tc
programs of ebpf/jpy.bpf.c do all of the above per datagram (wrap, seal, unwrap, open, the
same drops, counted in a BPF map this module folds into the same metrics and logs once per
sender), under a two-block AES header (brski.jpy.BlockHeaderSealer) that this module also
uses for what the programs leave to its sockets; without it (no BPF crypto kfuncs, or
datapath = "user") this module does it all with the AES-SIV header.

Keys: a fresh random key at start; every ``[jpy] key_rotation`` seconds (default 24 h) a new
one, the previous still opening headers for one more period, so a header lives one to two
periods. A restart loses both, so replies in flight at that moment are dropped (jpy-stale,
or jpy-forged when the random key ids happen to match) and the pledges' DTLS
retransmissions, sealed anew, carry on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.jpy import (
    MAX_OVERHEAD,
    BlockHeaderSealer,
    FlowHeaderSealer,
    HeaderSealer,
    JpyMessage,
)

from ..aio import cancel_and_wait
from ..kernel import KernelError
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RelayContext
from .jpy_kernel import KernelPath
from .stateless import PledgeSide, StatelessDatagramMode, pledge_endpoint

# IPv6 minimum MTU less the IPv6 and UDP headers: what surely reaches the registrar.
MAX_WRAPPED = 1280 - 40 - 8
MAX_PLEDGE_DATAGRAM = MAX_WRAPPED - MAX_OVERHEAD


class JpyMode(StatelessDatagramMode):
    name = "jpy"
    # Given a registrar with a jpy_port (daemon.constrained_target), and its join links answer
    # CoRE join-port discovery.
    constrained = True
    registrar_port = "jpy_port"
    no_port = "has no JPY port"
    # Stateless: no flows to count; joinproxyd_relayed_datagrams_total and _bytes_total say
    # what it relayed.
    keeps_flows = False

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        # A random first key id: headers of an earlier run then name a key this run does not
        # have (jpy-stale), except when the ids happen to match (jpy-forged, 2 in 256).
        self.sealer: HeaderSealer = FlowHeaderSealer(os.urandom(32), os.urandom(1)[0])
        # [jpy] datapath: decided at the first reconcile (jpy_kernel.py); until then, and
        # for good where the kernel cannot, the user-space relay with its AES-SIV header.
        self.kernel = KernelPath(self)
        self._datapath_decided = False
        self._kernel_sync: asyncio.Task[None] | None = None

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        await super().reconcile(interfaces, registrar)
        if self._wanted and self.upstream is not None:
            await self._reconcile_kernel()

    async def _reconcile_kernel(self) -> None:
        """Decide once where the per-datagram work runs, then keep the kernel's maps and
        hooks in line with what is served (links, registrar, join window)."""
        setting = self.ctx.jpy().datapath
        if not self._datapath_decided:
            self._datapath_decided = True
            if setting == "user":
                self.kernel.problem = "[jpy] datapath = user"
            else:
                key, key_id = os.urandom(32), os.urandom(1)[0]
                if await self.kernel.start(key, key_id):
                    # the daemon's socket handles what the programs leave to it: same format
                    self.sealer = BlockHeaderSealer(key, key_id)
                    self.key_started = time.monotonic()
                    self._kernel_sync = asyncio.create_task(self._sync_kernel(),
                                                            name="jpy-kernel-counters")
                    self.ctx.log.info("jpy relay runs in the kernel (tc programs of "
                                      "jpy.bpf.o)", extra={"MODE": self.name})
                else:
                    level = self.ctx.log.error if setting == "kernel" else self.ctx.log.info
                    level("jpy relay runs in user space: the kernel path cannot run here "
                          "(%s)", self.kernel.problem, extra={"MODE": self.name})
        if self.kernel.running:
            try:
                await self.kernel.apply()
            except KernelError as exc:
                self.ctx.log.error("jpy kernel path: %s", exc, extra={"MODE": self.name})

    async def _sync_kernel(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.kernel.sync_counters()
            self.kernel.report()
            await self.kernel.recheck_xdp()

    @property
    def key_rotation(self) -> float:
        return self.ctx.jpy().key_rotation

    def rotate_key(self) -> None:
        key = os.urandom(32)
        self.sealer.rotate(key)
        self.key_started = time.monotonic()
        if self.kernel.running:
            asyncio.get_running_loop().create_task(
                self.kernel.rotate(key, self.sealer.key_id), name="jpy-kernel-key")
        self.ctx.log.info("jpy header key rotated (key id %d; the previous one opens for "
                          "%g s more)", self.sealer.key_id, self.key_rotation,
                          extra={"MODE": self.name})

    async def close(self, drain_seconds: float) -> None:
        await super().close(drain_seconds)
        if self._kernel_sync is not None:
            await cancel_and_wait(self._kernel_sync)
            self._kernel_sync = None
        await self.kernel.stop()

    # -- data plane -------------------------------------------------------------------------
    def from_pledge(self, side: PledgeSide, data: bytes, addr: tuple[Any, ...]) -> None:
        admitted = self._admit(side, addr, "no registrar with a JPY port")
        if admitted is None:
            return
        pledge, port = admitted
        iface = side.iface
        if len(data) > MAX_PLEDGE_DATAGRAM:
            self._refuse(PolicyDropReason.TOO_BIG, f"pledge {pledge}: {len(data)} bytes do not "
                         f"fit in {MAX_WRAPPED} once wrapped", iface.name, pledge)
            return
        try:
            header = self.sealer.seal(pledge_endpoint(iface, addr))
            wrapped = JpyMessage(header, data).encode()
        except (ValueError, UsageError, ValidationError) as exc:
            self._refuse(DropReason.MALFORMED, f"pledge {pledge}: {exc}", iface.name, pledge)
            return
        self._send_upstream(side, pledge, port, wrapped, len(data),
                            "datagram to the registrar not sent")

    def from_registrar(self, data: bytes, addr: tuple[Any, ...]) -> None:
        who = self._upstream_sender(addr, "reply from {who}, not the registrar's JPY port")
        if who is None:
            return
        try:
            message = JpyMessage.decode(data)
        except DecodeError as exc:
            self._refuse_upstream(DropReason.MALFORMED, f"reply from {who}: {exc}", who)
            return
        try:
            pledge = self.sealer.open(message.header)
        except (DecodeError, SignatureError) as exc:
            self._refuse_upstream(PolicyDropReason.JPY_FORGED,
                                  f"reply from {who}, header: {exc}", who)
            return
        except ValidationError as exc:
            self._refuse_upstream(PolicyDropReason.JPY_STALE, f"reply from {who}, header: "
                                  f"{exc} (older than the previous key, or from before a "
                                  "restart)", who)
            return
        if self.replays.seen(data, time.monotonic()):
            self._refuse_upstream(PolicyDropReason.JPY_REPLAYED,
                                  f"reply from {who} already relayed", who)
            return
        side = self._serving(pledge.ifindex, who,
                             "reply from {who} for interface {ifindex}, which is not served")
        if side is not None:
            self._send_down(side, pledge, message.content, "reply to pledge {to} not sent: {exc}")

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self.kernel.sync_counters()
        self.kernel.report()
        return {
            **super().status(),
            "registrar": self.peer(),
            "key_rotation_seconds": self.key_rotation,
            # where the per-datagram work runs, and why not in the kernel when it does not
            "datapath": "kernel" if self.kernel.running else "user",
            "datapath_reason": self.kernel.problem,
            "header": "aes-256 two blocks" if isinstance(self.sealer, BlockHeaderSealer)
            else "aes-siv",
            "kernel": self.kernel.status() if self.kernel.running else None,
        }
