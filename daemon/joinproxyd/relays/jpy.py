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
  replay. A bounded set of digests (REPLAY_MEMORY, the last REPLAY_SECONDS) catches copies
  made within that window; older copies of a still-live header reach the pledge, whose DTLS
  replay window discards them. This is state about replies, not about pledges, and its size
  does not grow with them.
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
import hashlib
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from ipaddress import IPv6Address
from typing import Any

from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.jpy import (
    MAX_OVERHEAD,
    BlockHeaderSealer,
    FlowHeaderSealer,
    HeaderSealer,
    JpyMessage,
    PledgeEndpoint,
)

from ..aio import cancel_and_wait
from ..kernel import KernelError
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RefusalSayer, RelayContext, RelayMode
from .jpy_kernel import KernelPath

# IPv6 minimum MTU less the IPv6 and UDP headers: what surely reaches the registrar.
MAX_WRAPPED = 1280 - 40 - 8
MAX_PLEDGE_DATAGRAM = MAX_WRAPPED - MAX_OVERHEAD
REPLAY_SECONDS = 120.0
REPLAY_MEMORY = 16384
RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not name it


class _PledgeSide(asyncio.DatagramProtocol):
    def __init__(self, mode: JpyMode, iface: JoinInterface, sock: socket.socket) -> None:
        self.mode = mode
        self.iface = iface
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None

    def send(self, data: bytes, addr: tuple[str, int, int, int]) -> None:
        """Send one datagram to a pledge. asyncio's sendto silently sends nothing for b"", so
        an empty reply goes through the socket itself, as the kernel path sends it."""
        if self.transport is None:
            raise OSError("the join socket is closed")
        if data:
            self.transport.sendto(data, addr)
        else:
            self.sock.sendto(data, addr)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.mode.from_pledge(self.iface, data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMPv6 error for a reply sent to a pledge (it left, its port closed): that reply
        # was lost, counted as a send error.
        name = self.iface.name
        self.mode._refuse(DropReason.SEND_ERROR, f"reply to a pledge on {name} not "
                          f"delivered: {exc}", name, who=f"a pledge on {name}")


class _RegistrarSide(asyncio.DatagramProtocol):
    def __init__(self, mode: JpyMode) -> None:
        self.mode = mode

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.mode.from_registrar(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMPv6 error for an earlier send: the registrar's port is closed or unreachable.
        registrar = self.mode.registrar
        who = "registrar" if registrar is None or registrar.jpy_port is None \
            else f"[{registrar.address}]:{registrar.jpy_port}"
        self.mode._refuse(DropReason.REGISTRAR_UNREACHABLE, f"a pledge datagram sent to "
                          f"{who} was refused: {exc}", who=who, who_field="REGISTRAR")


def _grow_receive_buffer(sock: socket.socket) -> None:
    """All replies from every pledge's registrar come to one socket: give it room for bursts
    (the default ~200 KiB holds a few hundred small datagrams). Beyond the sysctl limit only
    with CAP_NET_ADMIN; without it the kernel's limit stands."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


class ReplayFilter:
    """Digests of reply datagrams relayed in the last ``seconds``, at most ``size`` of them."""

    def __init__(self, seconds: float = REPLAY_SECONDS, size: int = REPLAY_MEMORY) -> None:
        self.seconds = seconds
        self.size = size
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def seen(self, data: bytes, now: float) -> bool:
        """True if ``data`` was recorded within the window; records it otherwise."""
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at <= self.seconds and len(self._seen) < self.size:
                break
            del self._seen[oldest]
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in self._seen:
            return True
        self._seen[digest] = now
        return False

    def __len__(self) -> int:
        return len(self._seen)


class JpyMode(RelayMode):
    name = "jpy"
    # Given a registrar with a jpy_port (daemon.constrained_target), and its join links answer
    # CoRE join-port discovery.
    constrained = True
    registrar_port = "jpy_port"
    # Pledges find a jpy link by CoRE discovery (brski-jp, UDP), not by the GRASP/mDNS
    # announcements of a TCP port: announcing it there would lure them to nothing.
    serves_link_local = False
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
        self.key_started = time.monotonic()
        self.replays = ReplayFilter()
        self.joins: dict[str, _PledgeSide] = {}
        self.by_index: dict[int, _PledgeSide] = {}
        self._wanted: dict[str, JoinInterface] = {}
        self.registrar: RegistrarEndpoint | None = None
        self.upstream: asyncio.DatagramTransport | None = None
        self._rotator: asyncio.Task[None] | None = None
        self.datagrams = {"upstream": 0, "downstream": 0}
        self._say = RefusalSayer(ctx.log, self.name)
        ctx.metrics.add_mode(self.name, flows=self.keeps_flows)
        # Per-datagram work is the cost of this mode: look the counters up once.
        self._bytes_up = ctx.metrics.relayed_bytes.labels(self.name, "upstream")
        self._bytes_down = ctx.metrics.relayed_bytes.labels(self.name, "downstream")
        self._datagrams_up = ctx.metrics.relayed_datagrams.labels(self.name, "upstream")
        self._datagrams_down = ctx.metrics.relayed_datagrams.labels(self.name, "downstream")
        self._registrar_source: tuple[str, int] | None = None

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        self.registrar = registrar
        # Replies are accepted from this (address, port), in recvfrom's canonical spelling.
        self._registrar_source = None if registrar is None or registrar.jpy_port is None \
            else (str(IPv6Address(registrar.address.split("%")[0])), registrar.jpy_port)
        desired = {iface.name: iface for iface in interfaces}
        self._wanted = desired
        self.forget_listener_failures(desired)
        for name, side in list(self.joins.items()):
            if desired.get(name) != side.iface:
                self._unlisten(name)
        if desired and self.upstream is None:
            await self._open_upstream()
        for name, iface in desired.items():
            if name not in self.joins:
                await self._listen(iface)
        if self._rotator is None:
            self._rotator = asyncio.create_task(self._rotate(), name="jpy-key-rotation")
        if desired and self.upstream is not None:
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

    def source_port(self) -> int | None:
        """The registrar-side socket's port: wrapped datagrams leave from it."""
        if self.upstream is None:
            return None
        return int(self.upstream.get_extra_info("sockname")[1])

    async def _open_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _grow_receive_buffer(sock)
            sock.bind(("::", 0))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RegistrarSide(self), sock=sock)
        except OSError as exc:
            sock.close()
            self.ctx.log.warning("jpy: cannot open the registrar-side socket: %s", exc,
                                 extra={"MODE": self.name})
            return
        self.upstream = transport
        self.ctx.log.info("jpy proxy sends to registrars from [::]:%d",
                          sock.getsockname()[1], extra={"MODE": self.name})

    async def _listen(self, iface: JoinInterface) -> None:
        book = self.ctx.listener_book()
        where = f"udp [{iface.scoped_link_local}]:{iface.port}"
        if not book.due(iface.name, self.name, where):
            return
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((iface.link_local, iface.port, 0, iface.index))
            sock.setblocking(False)
            _, protocol = await loop.create_datagram_endpoint(
                lambda: _PledgeSide(self, iface, sock), sock=sock)
        except OSError as exc:
            sock.close()
            book.failed(iface.name, self.name, where, exc)
            return
        book.bound(iface.name, self.name)
        self.joins[iface.name] = protocol
        self.by_index[iface.index] = protocol
        self.ctx.log.info("jpy proxy listening on udp [%s]:%d", iface.scoped_link_local,
                          iface.port, extra={"INTERFACE": iface.name, "MODE": self.name})

    def _unlisten(self, name: str) -> None:
        side = self.joins.pop(name)
        if self.by_index.get(side.iface.index) is side:
            del self.by_index[side.iface.index]
        if side.transport is not None:
            side.transport.close()
        self.ctx.log.info("jpy proxy stopped listening on %s", name,
                          extra={"INTERFACE": name, "MODE": self.name})

    def unserved(self) -> dict[str, str]:
        book = self.ctx.listener_book()
        if self.upstream is None and self._wanted:
            return {name: "no registrar-side socket" for name in self._wanted}
        registrar = self.registrar
        if registrar is not None and registrar.jpy_port is None:
            # Status is true: a link whose datagrams would all be refused is not served.
            return {name: f"registrar {registrar.key} has no JPY port"
                    for name in self._wanted}
        return {name: book.describe(name, self.name) or "not listening"
                for name in self._wanted if name not in self.joins}

    @property
    def key_rotation(self) -> float:
        return self.ctx.jpy().key_rotation

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.key_started + self.key_rotation
                                    - time.monotonic()))
            self.rotate_key()

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

    def limits_changed(self) -> None:
        # A reload may change [jpy] key_rotation: the rotator sleeps anew under the new
        # period, counted from the current key's start (a key already older rotates now).
        if self._rotator is not None:
            self._rotator.cancel()
            self._rotator = asyncio.create_task(self._rotate(), name="jpy-key-rotation")

    async def close(self, drain_seconds: float) -> None:
        book = self.ctx.listener_book()
        for name in self._wanted:
            book.forget(name, self.name)
        self._wanted = {}
        for name in list(self.joins):
            self._unlisten(name)
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self._rotator is not None:
            await cancel_and_wait(self._rotator)
            self._rotator = None
        if self._kernel_sync is not None:
            await cancel_and_wait(self._kernel_sync)
            self._kernel_sync = None
        await self.kernel.stop()

    # -- data plane -------------------------------------------------------------------------
    def _refuse(self, reason: DropReason | PolicyDropReason, detail: str,
                interface: str | None = None, pledge: str | None = None,
                who: str | None = None, who_field: str = "PLEDGE") -> None:
        """Count, keep a pledge's refusal for `joinproxyctl refusals`, and log once per
        sender (the pledge, or the backbone peer a reply came from) and reason."""
        self.ctx.metrics.drop(self.name, reason)
        if pledge is not None and interface is not None:
            self.ctx.refusals.add(pledge, reason.value, interface, self.name)
        self._say(who or pledge or "?", reason.value, interface,
                  f"jpy dropped ({reason.value}): {detail}", who_field)

    def from_pledge(self, iface: JoinInterface, data: bytes, addr: tuple[Any, ...]) -> None:
        pledge = f"{str(addr[0]).split('%')[0]}%{iface.name}"
        if not self.ctx.join_window():
            self._refuse(PolicyDropReason.WINDOW_CLOSED, f"pledge {pledge}", iface.name, pledge)
            return
        registrar = self.registrar
        if registrar is None or registrar.jpy_port is None or self.upstream is None:
            self._refuse(DropReason.NO_REGISTRAR, f"pledge {pledge}: no registrar with a "
                         "JPY port", iface.name, pledge)
            return
        if len(data) > MAX_PLEDGE_DATAGRAM:
            self._refuse(PolicyDropReason.TOO_BIG, f"pledge {pledge}: {len(data)} bytes do not "
                         f"fit in {MAX_WRAPPED} once wrapped", iface.name, pledge)
            return
        try:
            packed = socket.inet_pton(socket.AF_INET6, str(addr[0]).split("%")[0])
            endpoint = PledgeEndpoint(IPv6Address(packed), addr[1], iface.index)
            header = self.sealer.seal(endpoint)
            wrapped = JpyMessage(header, data).encode()
        except (ValueError, UsageError, ValidationError) as exc:
            self._refuse(DropReason.MALFORMED, f"pledge {pledge}: {exc}", iface.name, pledge)
            return
        try:
            self.upstream.sendto(wrapped, (registrar.address, registrar.jpy_port, 0,
                                           registrar.scope_id))
        except OSError as exc:
            self._refuse(DropReason.SEND_ERROR, f"pledge {pledge}: datagram to the registrar "
                         f"not sent: {exc}", iface.name, who=pledge)
            return
        self.datagrams["upstream"] += 1
        self._datagrams_up.inc()
        self._bytes_up.inc(len(data))

    def from_registrar(self, data: bytes, addr: tuple[Any, ...]) -> None:
        expected = self._registrar_source
        source = str(addr[0]).split("%")[0]
        who = f"[{source}]:{addr[1]}"
        if expected is None or (source, addr[1]) != expected:
            self._refuse(DropReason.UNSOLICITED, f"reply from {who}, not the registrar's JPY "
                         "port", who=who, who_field="REGISTRAR")
            return
        try:
            message = JpyMessage.decode(data)
        except DecodeError as exc:
            self._refuse(DropReason.MALFORMED, f"reply from {who}: {exc}", who=who,
                         who_field="REGISTRAR")
            return
        try:
            pledge = self.sealer.open(message.header)
        except (DecodeError, SignatureError) as exc:
            self._refuse(PolicyDropReason.JPY_FORGED, f"reply from {who}, header: {exc}",
                         who=who, who_field="REGISTRAR")
            return
        except ValidationError as exc:
            self._refuse(PolicyDropReason.JPY_STALE, f"reply from {who}, header: {exc} "
                         "(older than the previous key, or from before a restart)",
                         who=who, who_field="REGISTRAR")
            return
        if self.replays.seen(data, time.monotonic()):
            self._refuse(PolicyDropReason.JPY_REPLAYED, f"reply from {who} already relayed",
                         who=who, who_field="REGISTRAR")
            return
        side = self.by_index.get(pledge.ifindex)
        if side is None or side.transport is None:
            self._refuse(DropReason.UNSOLICITED, f"reply from {who} for interface "
                         f"{pledge.ifindex}, which is not served", who=who,
                         who_field="REGISTRAR")
            return
        host = socket.inet_ntop(socket.AF_INET6, pledge.address.packed)
        try:
            side.send(message.content, (host, pledge.port, 0, pledge.ifindex))
        except OSError as exc:
            self._refuse(DropReason.SEND_ERROR, f"reply to pledge [{host}]:{pledge.port} not "
                         f"sent: {exc}", side.iface.name, who=f"{host}%{side.iface.name}")
            return
        self.datagrams["downstream"] += 1
        self._datagrams_down.inc()
        self._bytes_down.inc(len(message.content))

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        self.kernel.sync_counters()
        self.kernel.report()
        registrar = self.registrar
        port = None
        if self.upstream is not None:
            port = self.upstream.get_extra_info("sockname")[1]
        return {
            "listeners": [{"interface": name, "address": side.iface.link_local,
                           "port": side.iface.port, "protocol": "udp"}
                          for name, side in sorted(self.joins.items())],
            "registrar": (f"[{registrar.address}]:{registrar.jpy_port}"
                          if registrar is not None and registrar.jpy_port else None),
            "source_port": port,
            "key_id": self.sealer.key_id,
            "key_age_seconds": round(time.monotonic() - self.key_started),
            "key_rotation_seconds": self.key_rotation,
            "datagrams": dict(self.datagrams),
            "replay_filter": len(self.replays),
            # where the per-datagram work runs, and why not in the kernel when it does not
            "datapath": "kernel" if self.kernel.running else "user",
            "datapath_reason": self.kernel.problem,
            "header": "aes-256 two blocks" if isinstance(self.sealer, BlockHeaderSealer)
            else "aes-siv",
            "kernel": self.kernel.status() if self.kernel.running else None,
        }
