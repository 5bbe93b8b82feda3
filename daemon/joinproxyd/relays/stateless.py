"""What the two stateless datagram join proxies share: jpy (jpy.py) and cojp (cojp.py).

Both take pledge datagrams on one UDP socket per join link (its link-local address and the
join port) and send each, in their own format with the pledge's whereabouts sealed inside,
from ONE socket towards the registrar (cojp's JRC); what comes back goes to the pledge the
sealed part names, out of the join link it names. So neither keeps a table of pledges.

Here: those sockets and their protocols, listening per join link (with the control plane's
listener book), unserved(), the key-rotation timer, the replay filter, the refusal counting
and logging, the relayed counters and the parts of status() they have in common. The modes
keep their wire formats, their checks, their keys and the texts that name their peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from ipaddress import IPv6Address
from typing import Any, ClassVar, Protocol

from brski.jpy import PledgeEndpoint

from ..aio import cancel_and_wait
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RefusalSayer, RelayContext, RelayMode

REPLAY_SECONDS = 120.0
REPLAY_MEMORY = 16384
RECEIVE_BUFFER = 4 << 20
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; Python's socket module does not name it


class KeyedSealer(Protocol):
    """What this module needs of a mode's sealer (brski.jpy's, brski.cojp_token's)."""

    @property
    def key_id(self) -> int: ...

    def rotate(self, key: bytes, key_id: int | None = None) -> None: ...


class PledgeSide(asyncio.DatagramProtocol):
    """A join link's socket: pledge datagrams in, replies out."""

    def __init__(self, mode: StatelessDatagramMode, iface: JoinInterface,
                 sock: socket.socket) -> None:
        self.mode = mode
        self.iface = iface
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None

    def send(self, data: bytes, addr: tuple[str, int, int, int]) -> None:
        """Send one datagram to a pledge. asyncio's sendto silently sends nothing for b"", so
        an empty reply goes through the socket itself, as the jpy kernel path sends it."""
        if self.transport is None:
            raise OSError("the join socket is closed")
        if data:
            self.transport.sendto(data, addr)
        else:
            self.sock.sendto(data, addr)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.mode.from_pledge(self, data, addr)

    def error_received(self, exc: Exception) -> None:
        self.mode.pledge_socket_error(self.iface, exc)


class RegistrarSide(asyncio.DatagramProtocol):
    """The one socket towards the registrar (cojp: the JRC)."""

    def __init__(self, mode: StatelessDatagramMode) -> None:
        self.mode = mode

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.mode.from_registrar(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.mode.registrar_socket_error(exc)


def grow_receive_buffer(sock: socket.socket) -> None:
    """All replies from every pledge's registrar come to one socket: give it room for bursts
    (the default ~200 KiB holds a few hundred small datagrams). Beyond the sysctl limit only
    with CAP_NET_ADMIN; without it the kernel's limit stands."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)


def pledge_endpoint(iface: JoinInterface, addr: tuple[Any, ...]) -> PledgeEndpoint:
    """What is sealed of a pledge datagram's sender on this join link (ValueError,
    ValidationError when it cannot be)."""
    packed = socket.inet_pton(socket.AF_INET6, str(addr[0]).split("%")[0])
    return PledgeEndpoint(IPv6Address(packed), addr[1], iface.index)


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


class StatelessDatagramMode(RelayMode):
    """A stateless datagram relay mode; subclasses name their peer and do the datagrams."""

    # Pledges find these modes by CoRE discovery or 6TiSCH means, not by GRASP/mDNS
    # announcements of a TCP port: announcing one there would lure them to nothing.
    serves_link_local = False
    # How log lines and unserved() name the upstream socket and its peer.
    upstream_side: ClassVar[str] = "registrar-side"
    upstream_peer: ClassVar[str] = "registrars"
    # unserved() of a link whose registrar lacks this mode's port: "registrar K <no_port>"
    no_port: ClassVar[str]
    side_class: ClassVar[type[PledgeSide]] = PledgeSide
    sealer: KeyedSealer

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        self.key_started = time.monotonic()
        self.replays = ReplayFilter()
        self.joins: dict[str, PledgeSide] = {}
        self.by_index: dict[int, PledgeSide] = {}
        self._wanted: dict[str, JoinInterface] = {}
        self.registrar: RegistrarEndpoint | None = None
        # Replies are accepted from this (address, port), in recvfrom's canonical spelling.
        self._registrar_source: tuple[str, int] | None = None
        self.upstream: asyncio.DatagramTransport | None = None
        self._rotator: asyncio.Task[None] | None = None
        self.datagrams = {"upstream": 0, "downstream": 0}
        self._say = RefusalSayer(ctx.log, self.name)
        ctx.metrics.add_mode(self.name, flows=self.keeps_flows)
        # Per-datagram work is the cost of these modes: look the counters up once.
        self._bytes_up = ctx.metrics.relayed_bytes.labels(self.name, "upstream")
        self._bytes_down = ctx.metrics.relayed_bytes.labels(self.name, "downstream")
        self._datagrams_up = ctx.metrics.relayed_datagrams.labels(self.name, "upstream")
        self._datagrams_down = ctx.metrics.relayed_datagrams.labels(self.name, "downstream")

    # -- what a mode does -------------------------------------------------------------------
    @abstractmethod
    def from_pledge(self, side: PledgeSide, data: bytes, addr: tuple[Any, ...]) -> None:
        """A datagram from a pledge on side's join link."""

    @abstractmethod
    def from_registrar(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """A datagram on the upstream socket."""

    @abstractmethod
    def rotate_key(self) -> None:
        """Start sealing under a fresh key (the previous one still opens)."""

    @property
    @abstractmethod
    def key_rotation(self) -> float:
        """Seconds between key rotations."""

    def pledge_socket_error(self, iface: JoinInterface, exc: Exception) -> None:
        """An ICMPv6 error on a join link's socket: a reply sent to a pledge (it left, its
        port closed) was lost, counted and logged as a send error."""
        name = iface.name
        self._refuse(DropReason.SEND_ERROR, f"reply to a pledge on {name} not "
                     f"delivered: {exc}", name, who=f"a pledge on {name}")

    def registrar_socket_error(self, exc: Exception) -> None:
        """An ICMPv6 error on the upstream socket for an earlier send: the registrar's (the
        JRC's) port is closed or unreachable."""
        port = self.registrar_port_of(self.registrar)
        who = ("registrar" if port is None or self.registrar is None
               else f"[{self.registrar.address}]:{port}")
        self._refuse_upstream(DropReason.REGISTRAR_UNREACHABLE, f"a pledge datagram sent to "
                              f"{who} was refused: {exc}", who)

    def new_socket(self) -> socket.socket:
        """An IPv6-only UDP socket; a mode that marks its traffic sets that here."""
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        except OSError:
            sock.close()
            raise
        return sock

    def prepare_join_socket(self, sock: socket.socket) -> None:
        """Set what a join link's socket needs before it binds."""

    # -- control plane ----------------------------------------------------------------------
    def registrar_port_of(self, registrar: RegistrarEndpoint | None) -> int | None:
        """The registrar's port for this mode (jpy_port, cojp_port), None without one."""
        return None if registrar is None else getattr(registrar, self.registrar_port)

    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        self.registrar = registrar
        port = self.registrar_port_of(registrar)
        self._registrar_source = None if registrar is None or port is None \
            else (str(IPv6Address(registrar.address.split("%")[0])), port)
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
            self._start_rotator()

    def source_port(self) -> int | None:
        """The upstream socket's port: what the modes send towards the registrar leaves
        from it."""
        if self.upstream is None:
            return None
        return int(self.upstream.get_extra_info("sockname")[1])

    async def _open_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = self.new_socket()
        except OSError as exc:
            self._upstream_failed(exc)
            return
        try:
            grow_receive_buffer(sock)
            sock.bind(("::", 0))
            sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: RegistrarSide(self), sock=sock)
        except OSError as exc:
            sock.close()
            self._upstream_failed(exc)
            return
        self.upstream = transport
        self.ctx.log.info("%s proxy sends to %s from [::]:%d", self.name, self.upstream_peer,
                          sock.getsockname()[1], extra={"MODE": self.name})

    def _upstream_failed(self, exc: OSError) -> None:
        self.ctx.log.warning("%s: cannot open the %s socket: %s", self.name,
                             self.upstream_side, exc, extra={"MODE": self.name})

    async def _listen(self, iface: JoinInterface) -> None:
        book = self.ctx.listener_book()
        where = f"udp [{iface.scoped_link_local}]:{iface.port}"
        if not book.due(iface.name, self.name, where):
            return
        loop = asyncio.get_running_loop()
        try:
            sock = self.new_socket()
        except OSError as exc:
            book.failed(iface.name, self.name, where, exc)
            return
        try:
            self.prepare_join_socket(sock)
            sock.bind((iface.link_local, iface.port, 0, iface.index))
            sock.setblocking(False)
            _, protocol = await loop.create_datagram_endpoint(
                lambda: self.side_class(self, iface, sock), sock=sock)
        except OSError as exc:
            sock.close()
            book.failed(iface.name, self.name, where, exc)
            return
        book.bound(iface.name, self.name)
        self.joins[iface.name] = protocol
        self.by_index[iface.index] = protocol
        self.ctx.log.info("%s proxy listening on udp [%s]:%d", self.name,
                          iface.scoped_link_local, iface.port,
                          extra={"INTERFACE": iface.name, "MODE": self.name})

    def _unlisten(self, name: str) -> None:
        side = self.joins.pop(name)
        if self.by_index.get(side.iface.index) is side:
            del self.by_index[side.iface.index]
        if side.transport is not None:
            side.transport.close()
        self.ctx.log.info("%s proxy stopped listening on %s", self.name, name,
                          extra={"INTERFACE": name, "MODE": self.name})

    def unserved(self) -> dict[str, str]:
        book = self.ctx.listener_book()
        if self.upstream is None and self._wanted:
            return {name: f"no {self.upstream_side} socket" for name in self._wanted}
        registrar = self.registrar
        if registrar is not None and self.registrar_port_of(registrar) is None:
            # Status is true: a link whose datagrams would all be refused is not served.
            return {name: f"registrar {registrar.key} {self.no_port}" for name in self._wanted}
        return {name: book.describe(name, self.name) or "not listening"
                for name in self._wanted if name not in self.joins}

    def _start_rotator(self) -> None:
        self._rotator = asyncio.create_task(self._rotate(), name=f"{self.name}-key-rotation")

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.key_started + self.key_rotation
                                    - time.monotonic()))
            self.rotate_key()

    def limits_changed(self) -> None:
        # A reload may change the rotation period: the rotator sleeps anew under it, counted
        # from the current key's start (a key already older rotates now).
        if self._rotator is not None:
            self._rotator.cancel()
            self._start_rotator()

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

    # -- data plane -------------------------------------------------------------------------
    def _refuse(self, reason: DropReason | PolicyDropReason, detail: str,
                interface: str | None = None, pledge: str | None = None,
                who: str | None = None, who_field: str = "PLEDGE") -> None:
        """Count, keep a pledge's refusal for `joinproxyctl refusals`, and log once per
        sender (the pledge, or the backbone peer a reply came from) and reason: forged
        datagrams come at line rate, and the counter says how many."""
        self.ctx.metrics.drop(self.name, reason)
        if pledge is not None and interface is not None:
            self.ctx.refusals.add(pledge, reason.value, interface, self.name)
        self._say(who or pledge or "?", reason.value, interface,
                  f"{self.name} dropped ({reason.value}): {detail}", who_field)

    def _refuse_upstream(self, reason: DropReason | PolicyDropReason, detail: str,
                         who: str) -> None:
        """A refusal of what came to the upstream socket, from ``who`` ("[addr]:port")."""
        self._refuse(reason, detail, who=who, who_field="REGISTRAR")

    def _admit(self, side: PledgeSide, addr: tuple[Any, ...], no_registrar: str
               ) -> tuple[str, int] | None:
        """The pledge ("addr%link") and the registrar's port if a pledge datagram may go on
        (join window open, a registrar with this mode's port, the upstream socket open);
        None, refused, if not."""
        iface = side.iface
        pledge = f"{str(addr[0]).split('%')[0]}%{iface.name}"
        if not self.ctx.join_window():
            self._refuse(PolicyDropReason.WINDOW_CLOSED, f"pledge {pledge}", iface.name, pledge)
            return None
        registrar = self.registrar  # registrar_port_of, inline: this runs per datagram
        port = None if registrar is None else getattr(registrar, self.registrar_port)
        if port is None or self.upstream is None:
            self._refuse(DropReason.NO_REGISTRAR, f"pledge {pledge}: {no_registrar}",
                         iface.name, pledge)
            return None
        return pledge, port

    def _send_upstream(self, side: PledgeSide, pledge: str, port: int, data: bytes,
                       size: int, failed: str) -> None:
        """Send to the registrar and count ``size`` bytes up; a failure is refused with
        "pledge P: <failed>: <error>"."""
        registrar = self.registrar
        assert registrar is not None and self.upstream is not None  # _admit checked
        try:
            self.upstream.sendto(data, (registrar.address, port, 0, registrar.scope_id))
        except OSError as exc:
            self._refuse(DropReason.SEND_ERROR, f"pledge {pledge}: {failed}: {exc}",
                         side.iface.name, who=pledge)
            return
        self.datagrams["upstream"] += 1
        self._datagrams_up.inc()
        self._bytes_up.inc(size)

    def _upstream_sender(self, addr: tuple[Any, ...], not_ours: str) -> str | None:
        """Who sent this datagram to the upstream socket ("[addr]:port"), or None, refused as
        unsolicited (``not_ours`` formatted with who=), when it is not the registrar's port."""
        source = str(addr[0]).split("%")[0]
        who = f"[{source}]:{addr[1]}"
        expected = self._registrar_source
        if expected is None or (source, addr[1]) != expected:
            self._refuse_upstream(DropReason.UNSOLICITED, not_ours.format(who=who), who)
            return None
        return who

    def _serving(self, ifindex: int, who: str, unserved: str) -> PledgeSide | None:
        """The join link with this index, or None, refused as unsolicited (``unserved``
        formatted with who= and ifindex=), when it is not served."""
        side = self.by_index.get(ifindex)
        if side is None or side.transport is None:
            self._refuse_upstream(DropReason.UNSOLICITED,
                                  unserved.format(who=who, ifindex=ifindex), who)
            return None
        return side

    def _send_down(self, side: PledgeSide, pledge: PledgeEndpoint, data: bytes,
                   unsent: str) -> None:
        """Send to the pledge and count it; a failure is refused with the text ``unsent``
        formatted with to= "[addr]:port" and exc=."""
        host = socket.inet_ntop(socket.AF_INET6, pledge.address.packed)
        try:
            side.send(data, (host, pledge.port, 0, pledge.ifindex))
        except OSError as exc:
            self._refuse(DropReason.SEND_ERROR, unsent.format(to=f"[{host}]:{pledge.port}",
                                                              exc=exc),
                         side.iface.name, who=f"{host}%{side.iface.name}")
            return
        self.datagrams["downstream"] += 1
        self._datagrams_down.inc()
        self._bytes_down.inc(len(data))

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What both modes show; each adds its own (the peer under its own key, too)."""
        return {
            "listeners": [{"interface": name, "address": side.iface.link_local,
                           "port": side.iface.port, "protocol": "udp"}
                          for name, side in sorted(self.joins.items())],
            "source_port": self.source_port(),
            "key_id": self.sealer.key_id,
            "key_age_seconds": round(time.monotonic() - self.key_started),
            "datagrams": dict(self.datagrams),
            "replay_filter": len(self.replays),
        }

    def peer(self) -> str | None:
        """The registrar as "[address]:port" (this mode's port), None without one."""
        port = self.registrar_port_of(self.registrar)
        if not port or self.registrar is None:
            return None
        return f"[{self.registrar.address}]:{port}"


__all__ = ["PledgeSide", "RegistrarSide", "ReplayFilter", "StatelessDatagramMode",
           "grow_receive_buffer", "pledge_endpoint"]
