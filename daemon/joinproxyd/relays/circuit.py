"""The TCP circuit proxy of RFC 8995 §4: one socket pair per pledge, bytes passed untouched.

The proxy listens on each join interface's link-local address (scoped to that interface), and
for every admitted pledge connection opens a connection to the active registrar and relays
both directions. It does not terminate TLS and assumes no TLS version. Flow control is
end to end: when one side's send buffer fills, reading from the other side pauses. A
half-close in one direction is passed on as a half-close. Circuits that stay silent longer
than the idle timeout, or live longer than the circuit lifetime, are closed and counted.

asyncio Protocols rather than streams: no per-chunk coroutine switches on the hot path.
With [circuit] splice (circuit_splice.py) a connected circuit's bytes move in the kernel
instead, and this module keeps only its accounting; a circuit the kernel refuses stays here.
"""

import asyncio
import errno
import itertools
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from ..aio import cancel_and_wait
from ..kernel import KernelError
from ..limits import Admission
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RelayContext, RelayMode
from .circuit_splice import Refused, SplicedCircuit, Splicer

READ_CHUNK = 65536
# A connect that fails with one of these failed because of the proxy, not the registrar.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LISTEN_BACKLOG = 1024


class _Side(asyncio.Protocol):
    """One end of a circuit; it hands what it reads to the other end's transport."""

    __slots__ = ("circuit", "eof", "transport", "upstream")  # memory per open circuit

    def __init__(self, circuit: "Circuit", upstream: bool) -> None:
        self.circuit = circuit
        self.upstream = upstream  # True for the pledge side: its bytes travel upstream
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def peer(self) -> "_Side":
        return self.circuit.registrar_side if self.upstream else self.circuit.pledge_side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        circuit = self.circuit
        circuit.last_activity = time.monotonic()
        if self.upstream:
            circuit.bytes_up += len(data)
        else:
            circuit.bytes_down += len(data)
        peer = self.peer().transport
        if peer is None or not circuit.connected:
            # Registrar side not ready: keep it, in order (reading is paused, so this is
            # at most what was in flight when the connection was accepted).
            circuit.pending.append(data)
        else:
            peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer()
        if peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            self.circuit.close()
        return True  # keep our sending direction open: the other side may still talk

    # Backpressure: our transport's buffer is full, so stop reading from the other side.
    def pause_writing(self) -> None:
        other = self.peer().transport
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.peer().transport
        if other is not None and not other.is_closing():
            other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.circuit.close()


class Circuit:
    __slots__ = ("active", "bytes_down", "bytes_up", "closed", "connect_task", "connected",
                 "flushed_down", "flushed_up", "id", "interface", "last_activity", "mode",
                 "pending", "pledge", "pledge_side", "registrar", "registrar_side", "spliced",
                 "started")  # memory per open circuit

    def __init__(self, mode: "CircuitMode", interface: str, pledge: str,
                 registrar: RegistrarEndpoint) -> None:
        self.mode = mode
        self.id = next(mode.ids)  # what `joinproxyctl circuits` lists and `drop` takes
        self.interface = interface
        self.pledge = pledge
        self.registrar = registrar
        self.started = self.last_activity = time.monotonic()
        self.bytes_up = self.bytes_down = 0
        self.flushed_up = self.flushed_down = 0
        self.pending: list[bytes] = []
        self.pledge_side = _Side(self, upstream=True)
        self.registrar_side = _Side(self, upstream=False)
        self.closed = False
        self.connected = False  # registrar side up and pending bytes flushed
        self.active = False  # counted in the active gauge once the registrar side is up
        self.connect_task: asyncio.Task[None] | None = None
        self.spliced: SplicedCircuit | None = None  # the kernel moves its bytes

    async def connect(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            # socket() inside the try: at the open-file limit it fails (EMFILE), and that must
            # refuse this circuit like any failed connect. Outside, the task died with an
            # unretrieved exception and left the pledge side paused, blind to its hang-up,
            # and counted against the limits until the idle timeout.
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setblocking(False)
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the connect in a Task of
            # its own, a measurable share of a circuit's set-up (bench/relay_throughput.py)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, self.registrar.sockaddr)
            if self.mode.splicer is not None and await self._splice(sock, timeout):
                self.connected = True
                self.mode.opened(self)
                return
            await loop.create_connection(lambda: self.registrar_side, sock=sock)
        except (OSError, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            ours = isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES
            self.mode.refused(self.interface,
                              DropReason.RESOURCES if ours else DropReason.REGISTRAR_UNREACHABLE,
                              f"registrar {self.registrar.key}: {exc or 'timed out'}",
                              self.pledge)
            self.close()
            return
        upstream = self.registrar_side.transport
        assert upstream is not None
        for chunk in self.pending:
            upstream.write(chunk)
        self.pending.clear()
        self.connected = True
        if self.pledge_side.eof and upstream.can_write_eof():
            upstream.write_eof()
        pledge = self.pledge_side.transport
        if pledge is not None and not pledge.is_closing():
            pledge.resume_reading()
        self.mode.opened(self)

    async def _splice(self, sock: socket.socket, timeout: float) -> bool:
        """Hand both sockets to the kernel; False (logged, counted) if it refuses, and the
        asyncio relay carries on with everything as it was."""
        splicer, transport = self.mode.splicer, self.pledge_side.transport
        assert splicer is not None
        if transport is None or transport.is_closing():
            return False
        # What the pledge sent before the registrar answered and asyncio already read goes
        # first, by hand; what is still in the receive queue is left to the program. A
        # failure here has cut the stream: the circuit ends (OSError/TimeoutError to connect).
        loop = asyncio.get_running_loop()
        for chunk in self.pending:
            await asyncio.wait_for(loop.sock_sendall(sock, chunk), timeout)
        self.pending.clear()
        # our own fd on the pledge's socket: asyncio's transport (paused) keeps its own
        pledge_sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        spliced = SplicedCircuit(splicer, self, pledge_sock, sock, self.bytes_up)
        try:
            await spliced.start(timeout)
        except Refused as exc:
            pledge_sock.close()
            self.mode.splice_refused(self, str(exc).splitlines()[0])
            return False
        except BaseException:
            spliced.close(abort=True)
            raise
        self.spliced = spliced
        self.mode.splice_counts["spliced"] += 1
        # asyncio's transport is of no more use: it goes (with its fd and buffers), our fd
        # keeps the socket; told nothing, so its going does not close the circuit.
        transport.set_protocol(_Detached())
        transport.close()
        self.pledge_side.transport = None
        return True

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def refresh(self) -> None:
        """A spliced circuit's byte counts from the program; moving bytes are activity."""
        if self.spliced is None or self.spliced.closed:
            return
        try:
            up, down = self.spliced.totals()
        except KernelError:
            return
        if (up, down) != (self.bytes_up, self.bytes_down):
            self.bytes_up, self.bytes_down = up, down
            self.touch()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.spliced is not None:
            self.refresh()
            self.spliced.close(abort)
        for side in (self.pledge_side, self.registrar_side):
            if side.transport is not None and not side.transport.is_closing():
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        self.mode.closed(self)

    def info(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "interface": self.interface, "pledge": self.pledge,
                "registrar": self.registrar.key, "seconds": round(now - self.started, 1),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "datapath": "splice" if self.spliced is not None else "asyncio"}


class _Listener:
    def __init__(self, iface: JoinInterface, server: asyncio.AbstractServer) -> None:
        self.iface = iface
        self.server = server


class CircuitMode(RelayMode):
    name = "circuit"

    def __init__(self, ctx: RelayContext) -> None:
        super().__init__(ctx)
        self.listeners: dict[str, _Listener] = {}
        self._wanted: dict[str, JoinInterface] = {}
        self.registrar: RegistrarEndpoint | None = None
        self.admission = Admission(ctx.limits())
        self.open: set[Circuit] = set()
        self.ids = itertools.count(1)
        self._sweeper: asyncio.Task[None] | None = None
        ctx.metrics.add_mode(self.name)
        # The mode's own series, looked up once: labels() costs a dict lookup under a lock
        # per call, several per circuit. These are never removed (forget_interface removes
        # only the interface-labelled ones, which are still looked up each time).
        self._opened_total = ctx.metrics.circuits.labels(self.name)
        self._bytes_up = ctx.metrics.relayed_bytes.labels(self.name, "upstream")
        self._bytes_down = ctx.metrics.relayed_bytes.labels(self.name, "downstream")
        # [circuit] splice: decided at the first reconcile; None runs every circuit here
        self.splicer: Splicer | None = None
        self.splice_problem: str | None = None
        self._splice_decided = False
        self.splice_counts = {"spliced": 0, "refused": 0}

    def _decide_splice(self) -> None:
        self._splice_decided = True
        setting = self.ctx.circuit().splice
        if setting == "off":
            self.splice_problem = "[circuit] splice = off"
            return
        try:
            self.splicer = Splicer(self.ctx.datapath.obj_dir if self.ctx.datapath else None)
        except KernelError as exc:
            self.splice_problem = str(exc).splitlines()[0]
            level = self.ctx.log.error if setting == "on" else self.ctx.log.info
            level("circuit relay runs in asyncio: the kernel cannot splice here (%s)",
                  self.splice_problem, extra={"MODE": self.name})
            return
        self.ctx.log.info("circuit relay splices circuits in the kernel (splice.bpf.o)",
                          extra={"MODE": self.name})

    def splice_refused(self, circuit: Circuit, why: str) -> None:
        self.splice_counts["refused"] += 1
        self.ctx.log.info("circuit %d %s -> %s runs in asyncio: the kernel refused to "
                          "splice it (%s)", circuit.id, circuit.pledge, circuit.registrar.key,
                          why, extra={"INTERFACE": circuit.interface, "MODE": self.name,
                                      "PLEDGE": circuit.pledge})

    # -- control plane ----------------------------------------------------------------------
    async def reconcile(self, interfaces: Sequence[JoinInterface],
                        registrar: RegistrarEndpoint | None) -> None:
        self.registrar = registrar
        if not self._splice_decided:
            self._decide_splice()
        desired = {iface.name: iface for iface in interfaces}
        self._wanted = desired
        self.forget_listener_failures(desired)
        for name, listener in list(self.listeners.items()):
            if desired.get(name) != listener.iface:
                await self._unlisten(name, gone=name not in desired
                                     or desired[name].index != listener.iface.index)
        for name, iface in desired.items():
            if name not in self.listeners:
                await self._listen(iface)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="circuit-sweeper")

    def limits_changed(self) -> None:
        self.admission.limits = self.ctx.limits()

    async def _listen(self, iface: JoinInterface) -> None:
        book = self.ctx.listener_book()
        where = f"[{iface.scoped_link_local}]:{iface.port}"
        if not book.due(iface.name, self.name, where):
            return  # failed lately: the retry timer brings the next attempt
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((iface.link_local, iface.port, 0, iface.index))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            server = await loop.create_server(lambda: self._accept(iface), sock=sock)
        except OSError as exc:
            sock.close()
            # Counted, logged once and retried with backoff; the control plane neither
            # announces this link for circuit nor calls it served meanwhile (unserved()).
            book.failed(iface.name, self.name, where, exc)
            return
        book.bound(iface.name, self.name)
        self.listeners[iface.name] = _Listener(iface, server)
        self.ctx.log.info("circuit proxy listening on [%s]:%d", iface.scoped_link_local,
                          iface.port, extra={"INTERFACE": iface.name, "MODE": self.name})

    async def _unlisten(self, name: str, gone: bool) -> None:
        listener = self.listeners.pop(name)
        listener.server.close()
        if gone:  # the link went away: its circuits cannot carry anything any more
            for circuit in [c for c in self.open if c.interface == name]:
                circuit.close(abort=True)
        self.ctx.log.info("circuit proxy stopped listening on %s", name,
                          extra={"INTERFACE": name, "MODE": self.name})

    def unserved(self) -> dict[str, str]:
        book = self.ctx.listener_book()
        return {name: book.describe(name, self.name) or "not listening"
                for name in self._wanted if name not in self.listeners}

    async def close(self, drain_seconds: float) -> None:
        book = self.ctx.listener_book()
        for name in self._wanted:
            book.forget(name, self.name)
        self._wanted = {}
        for name in list(self.listeners):
            await self._unlisten(name, gone=False)
        deadline = time.monotonic() + drain_seconds
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for circuit in list(self.open):
            self.ctx.metrics.drop(self.name, DropReason.SHUTDOWN)
            circuit.close(abort=True)
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None
        if self.splicer is not None:
            self.splicer.close()
            self.splicer = None
            self._splice_decided = False

    # -- data plane events ------------------------------------------------------------------
    def _accept(self, iface: JoinInterface) -> asyncio.Protocol:
        return _Admit(self, iface)

    def admit(self, iface: JoinInterface, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername") or ("?", 0)
        pledge = f"{peername[0].split('%')[0]}%{iface.name}"
        # The operator's window first: a closed one refuses whatever else would be true.
        reason: DropReason | PolicyDropReason | None = (
            PolicyDropReason.WINDOW_CLOSED if not self.ctx.join_window() else
            self.admission.admit(iface.name, pledge, time.monotonic(),
                                 self.registrar is not None))
        if reason is not None:
            self.refused(iface.name, reason, f"pledge {pledge}", pledge)
            transport.abort()
            return
        assert self.registrar is not None
        circuit = Circuit(self, iface.name, pledge, self.registrar)
        self.open.add(circuit)
        circuit.pledge_side.connection_made(transport)
        transport.set_protocol(circuit.pledge_side)
        # Hold the pledge's bytes until the registrar side is connected. Deferred one loop
        # turn: Python 3.11 re-adds the reader after connection_made, undoing an early pause.
        asyncio.get_running_loop().call_soon(_pause, transport)
        circuit.connect_task = asyncio.create_task(
            circuit.connect(self.ctx.limits().connect_timeout))

    def refused(self, interface: str, reason: DropReason | PolicyDropReason, detail: str,
                pledge: str | None = None) -> None:
        self.ctx.metrics.drop(self.name, reason)
        if pledge is not None:
            self.ctx.refusals.add(pledge, reason.value, interface, self.name)
        self.ctx.log.info("circuit refused (%s): %s", reason.value, detail,
                          extra={"INTERFACE": interface, "MODE": self.name,
                                 "REASON": reason.value})

    def drop(self, circuit: Circuit, who: str) -> None:
        """The operator ends an established circuit (`joinproxyctl drop`): counted as
        drop reason "operator", logged with who asked, both sides reset."""
        self.ctx.metrics.drop(self.name, PolicyDropReason.OPERATOR)
        self.ctx.refusals.add(circuit.pledge, PolicyDropReason.OPERATOR.value,
                              circuit.interface, self.name)
        self.ctx.log.warning("circuit %d %s -> %s dropped by %s", circuit.id, circuit.pledge,
                             circuit.registrar.key, who,
                             extra={"INTERFACE": circuit.interface, "MODE": self.name,
                                    "PLEDGE": circuit.pledge,
                                    "REASON": PolicyDropReason.OPERATOR.value})
        circuit.close(abort=True)

    def opened(self, circuit: Circuit) -> None:
        self._opened_total.inc()
        self.ctx.metrics.circuits_active.labels(circuit.interface, self.name).inc()
        circuit.active = True
        # A circuit's opening and closing are logged at debug: at info, the two lines were
        # the largest single cost of a short circuit (bench/relay_throughput.py's
        # breakdown); refusals, drops and errors stay at info and above.
        if self.ctx.log.isEnabledFor(logging.DEBUG):
            self.ctx.log.debug("circuit %s -> %s opened", circuit.pledge,
                               circuit.registrar.key,
                               extra={"INTERFACE": circuit.interface, "MODE": self.name,
                                      "REGISTRAR": circuit.registrar.key,
                                      "PLEDGE": circuit.pledge})

    def closed(self, circuit: Circuit) -> None:
        if circuit not in self.open:
            return
        self.open.discard(circuit)
        self.admission.release(circuit.interface, circuit.pledge)
        self._flush(circuit)
        if circuit.active:
            self.ctx.metrics.circuits_active.labels(circuit.interface, self.name).dec()
            if not self.ctx.log.isEnabledFor(logging.DEBUG):
                return
            self.ctx.log.debug(
                "circuit %s -> %s closed after %.1f s, %d bytes up, %d down", circuit.pledge,
                circuit.registrar.key, time.monotonic() - circuit.started, circuit.bytes_up,
                circuit.bytes_down,
                extra={"INTERFACE": circuit.interface, "MODE": self.name,
                       "REGISTRAR": circuit.registrar.key, "PLEDGE": circuit.pledge})

    def _flush(self, circuit: Circuit) -> None:
        if circuit.bytes_up > circuit.flushed_up:
            self._bytes_up.inc(circuit.bytes_up - circuit.flushed_up)
            circuit.flushed_up = circuit.bytes_up
        if circuit.bytes_down > circuit.flushed_down:
            self._bytes_down.inc(circuit.bytes_down - circuit.flushed_down)
            circuit.flushed_down = circuit.bytes_down

    async def _sweep(self) -> None:
        """Close idle and over-age circuits; move byte counts into the metrics."""
        while True:
            limits = self.ctx.limits()
            await asyncio.sleep(min(1.0, limits.idle_timeout / 4))
            now = time.monotonic()
            for circuit in list(self.open):
                circuit.refresh()
                self._flush(circuit)
                if now - circuit.last_activity > limits.idle_timeout:
                    self.refused(circuit.interface, DropReason.IDLE_TIMEOUT,
                                 f"pledge {circuit.pledge} silent for {limits.idle_timeout:g} s",
                                 circuit.pledge)
                    circuit.close(abort=True)
                elif now - circuit.started > limits.circuit_lifetime:
                    self.refused(circuit.interface, DropReason.LIFETIME,
                                 f"pledge {circuit.pledge} open for "
                                 f"{limits.circuit_lifetime:g} s", circuit.pledge)
                    circuit.close(abort=True)

    # -- views --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "listeners": [{"interface": name, "address": lst.iface.link_local,
                           "port": lst.iface.port}
                          for name, lst in sorted(self.listeners.items())],
            "registrar": self.registrar.key if self.registrar else None,
            "active": len(self.open),
            "splice": {"setting": self.ctx.circuit().splice,
                       "running": self.splicer is not None, "reason": self.splice_problem,
                       "spliced_now": sum(1 for c in self.open if c.spliced is not None),
                       **self.splice_counts},
        }

    def circuits(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [c.info(now) for c in sorted(self.open, key=lambda c: c.started)]


def _pause(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.pause_reading()


class _Detached(asyncio.Protocol):
    """The protocol of a spliced pledge's transport as it closes: hears nothing."""


class _Admit(asyncio.Protocol):
    """Placeholder protocol for a just-accepted connection: admission happens here, then the
    transport is handed to the circuit's pledge side."""

    def __init__(self, mode: CircuitMode, iface: JoinInterface) -> None:
        self.mode = mode
        self.iface = iface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.mode.admit(self.iface, transport)
