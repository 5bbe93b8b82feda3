"""The stateful constrained join proxy (draft-ietf-anima-constrained-join-proxy §4.3): UDP.

On each join link the proxy takes datagrams on its link-local address and the join port
(5684 by default). Each pledge (address, port, link) gets a flow: a UDP socket of its own,
connected to the registrar's CoAPS port, so the registrar sees one source port per pledge and
its replies on that socket go back to that pledge. Payloads pass untouched both ways (the
proxy neither terminates nor reads the DTLS). A flow ends flow_idle_timeout seconds after its
last datagram in either direction.

Admission: flows_per_pledge per pledge address and flows_per_interface per join link
([limits]); a datagram that would open one more is refused with ICMPv6 Destination
Unreachable code 1 (administratively prohibited) and counted (flow-limit). A closed join
window or no registrar refuses new flows silently (counted), as the circuit mode does.

ICMPv6 errors the registrar's side causes (port unreachable, no route, ...) reach the flow's
socket through IPV6_RECVERR with the datagram they concern; the proxy sends the pledge the
same error about the pledge's own datagram, from the join link address.

Plain non-blocking sockets under loop.add_reader, no transports: a flow is one socket, one
selector entry and a small object (bench/coaps_relay.py measures it).
"""

import asyncio
import errno
import itertools
import socket
import struct
import time
from collections.abc import Sequence
from ipaddress import IPv6Address
from typing import Any

from brski import icmpv6

from ..aio import cancel_and_wait
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RefusalSayer, RelayContext, RelayMode

MAX_DATAGRAM = 65535
BATCH = 64  # datagrams read per wake-up, so one busy socket cannot starve the others
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP6 = 3
ICMP6_FILTER = 1  # linux/icmpv6.h: which ICMPv6 types a raw socket receives
SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Flow ids in `joinproxyctl circuits` and `drop`: apart from the circuit mode's numbers.
COAPS_ID_PREFIX = "coaps-"


class Flow:
    __slots__ = ("bytes_down", "bytes_up", "datagrams_down", "datagrams_up", "id",
                 "interface", "last", "listener", "pledge", "registrar", "sock", "started")

    def __init__(self, flow_id: int, listener: "_Listener", pledge: tuple[str, int, int, int],
                 registrar: RegistrarEndpoint, sock: socket.socket, now: float) -> None:
        self.id = flow_id
        self.listener = listener
        self.interface = listener.iface.name
        self.pledge = pledge  # (address, port, 0, ifindex) as recvfrom gave it
        self.registrar = registrar
        self.sock = sock
        self.started = self.last = now
        self.bytes_up = self.bytes_down = self.datagrams_up = self.datagrams_down = 0

    @property
    def label(self) -> str:
        return f"{COAPS_ID_PREFIX}{self.id}"

    @property
    def pledge_address(self) -> str:
        return f"{self.pledge[0].split('%')[0]}%{self.interface}"

    def info(self, now: float) -> dict[str, Any]:
        return {"id": self.label, "interface": self.interface,
                "pledge": f"[{self.pledge_address}]:{self.pledge[1]}",
                "registrar": f"[{self.registrar.address}]:{self.registrar.coaps_port}",
                "local_port": self.sock.getsockname()[1],
                "seconds": round(now - self.started, 1),
                "idle": round(now - self.last, 1),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "datagrams_up": self.datagrams_up, "datagrams_down": self.datagrams_down}


class _Listener:
    __slots__ = ("address", "iface", "sock")

    def __init__(self, iface: JoinInterface, sock: socket.socket) -> None:
        self.iface = iface
        self.sock = sock
        self.address = IPv6Address(iface.link_local.split("%")[0])


class CoapsMode(RelayMode):
    name = "coaps"
    # Given a registrar with a coaps_port (daemon.constrained_target), and its join links answer
    # CoRE join-port discovery.
    constrained = True
    registrar_port = "coaps_port"

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        self.listeners: dict[str, _Listener] = {}
        self._wanted: dict[str, JoinInterface] = {}
        self.registrar: RegistrarEndpoint | None = None
        # (interface, pledge address, pledge port) -> flow
        self.flows: dict[tuple[str, str, int], Flow] = {}
        self.per_pledge: dict[str, int] = {}
        self.per_interface: dict[str, int] = {}
        self.ids = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None
        self._icmp: socket.socket | None = None
        self._sayer = RefusalSayer(ctx.log, self.name)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Counted in place and moved into the metrics by the sweeper: the hot path only adds.
        self._pending = [0, 0, 0, 0]  # datagrams up, down, bytes up, down
        ctx.metrics.add_mode(self.name)
        for direction in ("upstream", "downstream"):
            ctx.metrics.relayed_datagrams.labels(self.name, direction)

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        self._loop = asyncio.get_running_loop()
        self.registrar = registrar
        desired = {iface.name: iface for iface in interfaces}
        self._wanted = desired
        self.forget_listener_failures(desired)
        for name, listener in list(self.listeners.items()):
            if desired.get(name) != listener.iface:
                self._unlisten(name, gone=name not in desired
                               or desired[name].index != listener.iface.index)
        for name, iface in desired.items():
            if name not in self.listeners:
                self._listen(iface)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="coaps-sweeper")

    def _listen(self, iface: JoinInterface) -> None:
        book = self.ctx.listener_book()
        where = f"udp [{iface.scoped_link_local}]:{iface.port}"
        if not book.due(iface.name, self.name, where):
            return
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((iface.link_local.split("%")[0], iface.port, 0, iface.index))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            book.failed(iface.name, self.name, where, exc)
            return
        listener = _Listener(iface, sock)
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._upstream, listener)
        book.bound(iface.name, self.name)
        self.listeners[iface.name] = listener
        self.ctx.log.info("coaps relay listening on udp [%s]:%d", iface.scoped_link_local,
                          iface.port, extra={"INTERFACE": iface.name, "MODE": self.name})

    def _unlisten(self, name: str, gone: bool) -> None:
        listener = self.listeners.pop(name)
        if self._loop is not None:
            self._loop.remove_reader(listener.sock.fileno())
        listener.sock.close()
        # Without the listener a flow can no longer answer its pledge: they all end.
        for flow in [f for f in self.flows.values() if f.listener is listener]:
            self._close_flow(flow, "listener closed" if not gone else "link gone")
        self.ctx.log.info("coaps relay stopped listening on %s", name,
                          extra={"INTERFACE": name, "MODE": self.name})

    def unserved(self) -> dict[str, str]:
        book = self.ctx.listener_book()
        out = {name: book.describe(name, self.name) or "not listening"
               for name in self._wanted if name not in self.listeners}
        registrar = self.registrar
        if registrar is not None and registrar.coaps_port is None:
            # Announcing a UDP join port that leads nowhere would be a lie.
            why = f"registrar {registrar.key} has no CoAPS port"
            out.update({name: why for name in self._wanted if name not in out})
        return out

    async def close(self, drain_seconds: float) -> None:
        book = self.ctx.listener_book()
        for name in self._wanted:
            book.forget(name, self.name)
        self._wanted = {}
        # Datagram flows carry no stream to finish: nothing to drain, they end now.
        for flow in list(self.flows.values()):
            self.ctx.metrics.drop(self.name, DropReason.SHUTDOWN)
            self._close_flow(flow, "shutdown")
        for name in list(self.listeners):
            self._unlisten(name, gone=False)
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None
        self._flush()
        if self._icmp is not None:
            self._icmp.close()
            self._icmp = None

    # -- data plane ---------------------------------------------------------------------------
    def _upstream(self, listener: _Listener) -> None:
        """Datagrams from pledges on one join link."""
        sock = listener.sock
        pending = self._pending
        for _ in range(BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error queued on the listener (ICMP about a reply): nothing to do
            key = (listener.iface.name, addr[0], addr[1])
            flow = self.flows.get(key)
            if flow is None:
                flow = self._admit(listener, addr, data)
                if flow is None:
                    continue
            try:
                flow.sock.send(data)
            except OSError as exc:
                # Not sent (counted): a full queue, no route to the registrar any more, or an
                # earlier ICMPv6 error from the registrar's side that the kernel reports here;
                # that one is also reflected to the pledge.
                self.ctx.metrics.drop(self.name, DropReason.SEND_ERROR)
                self._say(flow.pledge_address, "send-error", flow.interface,
                          f"datagram of flow {flow.id} to the registrar not sent: "
                          f"{exc.strerror or exc}")
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    self._errors(flow)
                continue
            flow.last = time.monotonic()
            flow.datagrams_up += 1
            flow.bytes_up += len(data)
            pending[0] += 1
            pending[2] += len(data)

    def _downstream(self, flow: Flow) -> None:
        """Datagrams (and ICMPv6 errors) from the registrar on one flow's socket."""
        sock = flow.sock
        out = flow.listener.sock
        pending = self._pending
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                if sock.fileno() < 0:
                    return
                self._errors(flow)
                continue
            if sock.fileno() < 0:
                return
            try:
                out.sendto(data, flow.pledge)
            except OSError as exc:
                self.ctx.metrics.drop(self.name, DropReason.SEND_ERROR)
                self._say(flow.pledge_address, "send-error", flow.interface,
                          f"reply to pledge not sent: {exc.strerror or exc}")
                continue
            flow.last = time.monotonic()
            flow.datagrams_down += 1
            flow.bytes_down += len(data)
            pending[1] += 1
            pending[3] += len(data)

    def _admit(self, listener: _Listener, addr: tuple[str, int, int, int],
               data: bytes) -> Flow | None:
        name = listener.iface.name
        pledge = f"{addr[0].split('%')[0]}%{name}"
        limits = self.ctx.limits()
        registrar = self.registrar
        reason: DropReason | PolicyDropReason | None = None
        if not self.ctx.join_window():
            reason = PolicyDropReason.WINDOW_CLOSED
        elif registrar is None or registrar.coaps_port is None:
            reason = DropReason.NO_REGISTRAR
        elif (self.per_pledge.get(pledge, 0) >= limits.flows_per_pledge
              or self.per_interface.get(name, 0) >= limits.flows_per_interface):
            reason = PolicyDropReason.FLOW_LIMIT
        if reason is not None:
            self._refuse(name, pledge, reason)
            if reason is PolicyDropReason.FLOW_LIMIT:
                self._send_icmp(listener, addr, icmpv6.admin_prohibited(
                    self._invoking(listener, addr, data)))
            return None
        assert registrar is not None and registrar.coaps_sockaddr is not None
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError as exc:
            self._refuse(name, pledge, DropReason.RESOURCES, str(exc))
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            sock.connect(registrar.coaps_sockaddr)  # a fresh ephemeral source port
        except OSError as exc:
            sock.close()
            ours = exc.errno in OUT_OF_RESOURCES
            self._refuse(name, pledge, DropReason.RESOURCES if ours
                         else DropReason.REGISTRAR_UNREACHABLE, str(exc))
            return None
        flow = Flow(next(self.ids), listener, addr, registrar, sock, time.monotonic())
        self.flows[(name, addr[0], addr[1])] = flow
        self.per_pledge[pledge] = self.per_pledge.get(pledge, 0) + 1
        self.per_interface[name] = self.per_interface.get(name, 0) + 1
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._downstream, flow)
        metrics = self.ctx.metrics
        metrics.circuits.labels(self.name).inc()
        metrics.circuits_active.labels(name, self.name).inc()
        self.ctx.log.info("coaps flow %d [%s]:%d -> [%s]:%d opened (local port %d)", flow.id,
                          pledge, addr[1], registrar.address, registrar.coaps_port,
                          sock.getsockname()[1],
                          extra={"INTERFACE": name, "MODE": self.name, "PLEDGE": pledge,
                                 "REGISTRAR": registrar.key})
        return flow

    def _close_flow(self, flow: Flow, why: str) -> None:
        key = (flow.interface, flow.pledge[0], flow.pledge[1])
        if self.flows.get(key) is not flow:
            return
        del self.flows[key]
        pledge = flow.pledge_address
        for table, name in ((self.per_pledge, pledge), (self.per_interface, flow.interface)):
            left = table[name] - 1
            if left:
                table[name] = left
            else:
                del table[name]
        if self._loop is not None:
            self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self.ctx.metrics.circuits_active.labels(flow.interface, self.name).dec()
        self.ctx.log.info("coaps flow %d [%s]:%d closed (%s) after %.1f s, %d/%d datagrams "
                          "and %d/%d bytes up/down", flow.id, pledge, flow.pledge[1], why,
                          time.monotonic() - flow.started, flow.datagrams_up,
                          flow.datagrams_down, flow.bytes_up, flow.bytes_down,
                          extra={"INTERFACE": flow.interface, "MODE": self.name,
                                 "PLEDGE": pledge})

    def drop(self, flow: Flow, who: str) -> None:
        """The operator ends a flow (`joinproxyctl drop coaps-N` or the pledge's address):
        counted as drop reason "operator", logged with who asked. The pledge's next datagram
        opens a new flow if the limits allow."""
        self.ctx.metrics.drop(self.name, PolicyDropReason.OPERATOR)
        self.ctx.refusals.add(flow.pledge_address, PolicyDropReason.OPERATOR.value,
                              flow.interface, self.name)
        self.ctx.log.warning("coaps flow %s dropped by %s", flow.label, who,
                             extra={"INTERFACE": flow.interface, "MODE": self.name,
                                    "PLEDGE": flow.pledge_address,
                                    "REASON": PolicyDropReason.OPERATOR.value})
        self._close_flow(flow, f"dropped by {who}")

    # -- ICMPv6 -------------------------------------------------------------------------------
    def _errors(self, flow: Flow) -> None:
        """Drain the flow socket's error queue; reflect each ICMPv6 error to the pledge."""
        sock = flow.sock
        for _ in range(BATCH):
            try:
                payload, ancdata, _flags, _addr = sock.recvmsg(
                    icmpv6.MAX_INVOKING, 512, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            for level, kind, blob in ancdata:
                if level != socket.IPPROTO_IPV6 or kind != IPV6_RECVERR \
                        or len(blob) < SOCK_EXTENDED_ERR.size:
                    continue
                _errno, origin, icmp_type, code, _pad, info, _data = \
                    SOCK_EXTENDED_ERR.unpack_from(blob)
                if origin != SO_EE_ORIGIN_ICMP6 or icmp_type not in icmpv6.ERROR_TYPES:
                    continue
                self.ctx.metrics.drop(self.name, DropReason.REGISTRAR_UNREACHABLE)
                self._say(flow.pledge_address, "registrar-icmp", flow.interface,
                          f"ICMPv6 type {icmp_type} code {code} from the registrar side of "
                          f"flow {flow.id}: reflected to the pledge")
                parameter = info if icmp_type in (icmpv6.PACKET_TOO_BIG,
                                                  icmpv6.PARAMETER_PROBLEM) else 0
                self._send_icmp(flow.listener, flow.pledge, icmpv6.error_message(
                    icmp_type, code, self._invoking(flow.listener, flow.pledge, payload),
                    parameter))

    def _invoking(self, listener: _Listener, addr: tuple[str, int, int, int],
                  payload: bytes) -> bytes:
        return icmpv6.udp_packet(IPv6Address(addr[0].split("%")[0]), listener.address,
                                 addr[1], listener.iface.port,
                                 payload[:icmpv6.MAX_INVOKING])

    def _send_icmp(self, listener: _Listener, addr: tuple[str, int, int, int],
                   message: bytes) -> None:
        try:
            if self._icmp is None:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                sock.setblocking(False)
                # Send only: block every ICMPv6 type so the kernel queues nothing for us.
                sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, b"\xff" * 32)
                self._icmp = sock
            pktinfo = listener.address.packed + struct.pack("@I", listener.iface.index)
            self._icmp.sendmsg([message], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                                             pktinfo)], 0,
                               (addr[0].split("%")[0], 0, 0, listener.iface.index))
        except OSError as exc:  # no CAP_NET_RAW, link gone: the refusal stands, counted
            self.ctx.metrics.drop(self.name, DropReason.SEND_ERROR)
            self._say(addr[0], "icmp-send", listener.iface.name,
                      f"ICMPv6 error not sent: {exc.strerror or exc}")

    # -- bookkeeping ----------------------------------------------------------------------------
    def _refuse(self, interface: str, pledge: str, reason: DropReason | PolicyDropReason,
                detail: str = "") -> None:
        self.ctx.metrics.drop(self.name, reason)
        self.ctx.refusals.add(pledge, reason.value, interface, self.name)
        self._say(pledge, reason.value, interface,
                  f"coaps flow from {pledge} refused ({reason.value})"
                  + (f": {detail}" if detail else ""))

    def _say(self, pledge: str, reason: str, interface: str, text: str) -> None:
        """Log a refusal once per pledge and reason per REFUSAL_LOG_SECONDS (base.py)."""
        self._sayer(pledge, reason, interface, text)

    def _flush(self) -> None:
        pending = self._pending
        if not any(pending):
            return
        metrics = self.ctx.metrics
        metrics.relayed_datagrams.labels(self.name, "upstream").inc(pending[0])
        metrics.relayed_datagrams.labels(self.name, "downstream").inc(pending[1])
        metrics.relayed_bytes.labels(self.name, "upstream").inc(pending[2])
        metrics.relayed_bytes.labels(self.name, "downstream").inc(pending[3])
        self._pending = [0, 0, 0, 0]

    async def _sweep(self) -> None:
        """End flows idle longer than flow_idle_timeout; move counts into the metrics."""
        while True:
            timeout = self.ctx.limits().flow_idle_timeout
            await asyncio.sleep(min(1.0, timeout / 4))
            self._flush()
            now = time.monotonic()
            for flow in [f for f in self.flows.values() if now - f.last > timeout]:
                self._close_flow(flow, f"idle {timeout:g} s")

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        registrar = self.registrar
        return {
            "listeners": [{"interface": name, "address": lst.iface.link_local,
                           "port": lst.iface.port, "protocol": "udp"}
                          for name, lst in sorted(self.listeners.items())],
            "registrar": (f"[{registrar.address}]:{registrar.coaps_port}"
                          if registrar is not None and registrar.coaps_port else None),
            "active": len(self.flows),
        }

    def sync_counters(self) -> None:
        self._flush()

    def circuits(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [f.info(now) for f in sorted(self.flows.values(), key=lambda f: f.started)]
