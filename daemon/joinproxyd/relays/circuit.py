"""The TCP circuit proxy of RFC 8995 §4: one socket pair per pledge, bytes passed untouched.

The proxy listens on each join interface's link-local address (scoped to that interface), and
for every admitted pledge connection opens a connection to the active registrar and relays
both directions. It does not terminate TLS and assumes no TLS version. Flow control is
end to end: when one side's send buffer fills, reading from the other side pauses. A
half-close in one direction is passed on as a half-close. Circuits that stay silent longer
than the idle timeout, or live longer than the circuit lifetime, are closed and counted.

Raw non-blocking sockets driven by the loop's add_reader/add_writer, not asyncio transports,
protocols, tasks or futures: a circuit is two sockets and two small records, and setting one
up takes no extra loop turns (bench/relay_throughput.py's breakdown shows where the time
went before). The pledge's socket is not read before the registrar's side has connected, so
what the pledge sends first waits in its receive queue. With [circuit] splice
(circuit_splice.py) a connected circuit's bytes move in the kernel instead, and this module
keeps only its accounting; a circuit the kernel refuses stays here.
"""

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from ..aio import cancel_and_wait
from ..kernel import KernelError
from ..limits import Admission
from ..model import DropReason, JoinInterface, PolicyDropReason, RegistrarEndpoint
from .base import RelayContext, RelayMode
from .circuit_splice import Refused, SplicedCircuit, Splicer

# One read buffer for every circuit (the loop runs one callback at a time): recv_into it
# and send from it allocates nothing per read. As large as asyncio's transports read.
READ_CHUNK = 256 * 1024
_READ_BUFFER = bytearray(READ_CHUNK)
_READ_VIEW = memoryview(_READ_BUFFER)
# A connect that fails with one of these failed because of the proxy, not the registrar.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LISTEN_BACKLOG = 1024
ACCEPT_BATCH = 128  # accepts per readable event of a listener: a storm costs one wake-up each
ACCEPT_RETRY_SECONDS = 1.0  # out of fds: stop accepting this long (as asyncio's servers do)
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER 0: close() sends a reset


class _Side:
    """One socket of a circuit: what could not be sent yet, and which events are watched."""

    __slots__ = ("buffer", "closing", "eof", "fd", "reading", "shut_pending", "sock",
                 "writing")  # memory per open circuit

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer: bytearray | None = None  # unsent bytes (reading the peer is paused)
        self.eof = False  # its peer half-closed toward us
        self.shut_pending = False  # half-close it once the buffer is sent
        self.closing = False  # closed by the circuit, the buffer still being sent
        self.reading = self.writing = False

    def read(self, loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
        if not self.reading:
            self.reading = True
            loop.add_reader(self.fd, callback, *args)

    def unread(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.reading:
            self.reading = False
            loop.remove_reader(self.fd)

    def write(self, loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
        if not self.writing:
            self.writing = True
            loop.add_writer(self.fd, callback, *args)

    def unwrite(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.writing:
            self.writing = False
            loop.remove_writer(self.fd)

    def close(self, loop: asyncio.AbstractEventLoop, abort: bool) -> None:
        """Stop watching it and close it: at once with a reset if abort; else once what is
        buffered has been sent (the peer's last bytes are not cut off)."""
        self.unread(loop)
        if self.buffer and not abort:
            self.closing = True
            self.write(loop, self._flush_then_close, loop)
            return
        self.unwrite(loop)
        if abort:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.sock.close()

    def _flush_then_close(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sent = self.sock.send(self.buffer or b"")
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.buffer or b"")
        if self.buffer is not None:
            del self.buffer[:sent]
        if not self.buffer:
            self.buffer = None
            self.close(loop, abort=False)


class Circuit:
    __slots__ = ("active", "bytes_down", "bytes_up", "closed", "connected", "flushed_down",
                 "flushed_up", "id", "interface", "last_activity", "loop", "mode", "pledge",
                 "pledge_side", "registrar", "registrar_side", "spliced", "started",
                 "timer")  # memory per open circuit

    def __init__(self, mode: "CircuitMode", interface: str, pledge: str,
                 registrar: RegistrarEndpoint, pledge_sock: socket.socket) -> None:
        self.mode = mode
        self.loop = asyncio.get_running_loop()
        self.id = next(mode.ids)  # what `joinproxyctl circuits` lists and `drop` takes
        self.interface = interface
        self.pledge = pledge
        self.registrar = registrar
        self.started = self.last_activity = time.monotonic()
        self.bytes_up = self.bytes_down = 0
        self.flushed_up = self.flushed_down = 0
        self.pledge_side: _Side | None = _Side(pledge_sock)
        self.registrar_side: _Side | None = None
        self.closed = False
        self.connected = False  # registrar side up: bytes move
        self.active = False  # counted in the active gauge once the registrar side is up
        self.timer: asyncio.TimerHandle | None = None  # the connect timeout
        self.spliced: SplicedCircuit | None = None  # the kernel moves its bytes

    # -- set-up ---------------------------------------------------------------------------
    def connect(self, timeout: float) -> None:
        """Start the registrar side's connect; the rest happens in _connect_done."""
        try:
            # socket() inside the try: at the open-file limit it fails (EMFILE), and that
            # must refuse this circuit like any failed connect.
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as exc:
            self._refuse(exc)
            return
        side = self.registrar_side = _Side(sock)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        code = sock.connect_ex(self.registrar.sockaddr)
        if code == 0:
            self._connected()
        elif code in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
            side.write(self.loop, self._connect_done)
            self.timer = self.loop.call_later(timeout, self._connect_timeout)
        else:
            self._refuse(OSError(code, os.strerror(code)))

    def _connect_done(self) -> None:
        side = self.registrar_side
        assert side is not None
        side.unwrite(self.loop)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        code = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._refuse(OSError(code, os.strerror(code)))
        else:
            self._connected()

    def _connect_timeout(self) -> None:
        self.timer = None
        self._refuse(TimeoutError())

    def _refuse(self, exc: OSError) -> None:
        ours = exc.errno in OUT_OF_RESOURCES
        self.mode.refused(self.interface,
                          DropReason.RESOURCES if ours else DropReason.REGISTRAR_UNREACHABLE,
                          f"registrar {self.registrar.key}: {exc or 'timed out'}",
                          self.pledge)
        self.close()

    def _connected(self) -> None:
        if self.closed:
            return
        self.connected = True
        if self.mode.splicer is not None and self._splice():
            self.mode.opened(self)
            return
        pledge, registrar = self.pledge_side, self.registrar_side
        assert pledge is not None and registrar is not None
        pledge.read(self.loop, self._readable, pledge, registrar, True)
        registrar.read(self.loop, self._readable, registrar, pledge, False)
        self.mode.opened(self)

    def _splice(self) -> bool:
        """Hand both sockets to the kernel; False (logged, counted) if it refuses, and the
        relay here carries on with everything as it was."""
        splicer, pledge, registrar = self.mode.splicer, self.pledge_side, self.registrar_side
        assert splicer is not None and pledge is not None and registrar is not None
        spliced = SplicedCircuit(splicer, self, pledge.sock, registrar.sock)
        try:
            spliced.start(self.mode.ctx.limits().connect_timeout)
        except Refused as exc:
            self.mode.splice_refused(self, str(exc).splitlines()[0])
            return False
        self.spliced = spliced
        self.mode.splice_counts["spliced"] += 1
        self.pledge_side = self.registrar_side = None  # the spliced circuit has the sockets
        return True

    # -- the relay --------------------------------------------------------------------------
    def _readable(self, side: _Side, peer: _Side, upstream: bool) -> None:
        try:
            size = side.sock.recv_into(_READ_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(abort=True)  # reset: the other side is reset too
            return
        if not size:
            self._eof(side, peer)
            return
        self.last_activity = time.monotonic()
        if upstream:
            self.bytes_up += size
        else:
            self.bytes_down += size
        data = _READ_VIEW[:size]
        if peer.buffer:  # not expected: reading pauses while the peer has a backlog
            peer.buffer += data
            return
        try:
            sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(abort=True)
            return
        if sent < size:
            # The peer's send buffer is full: keep the rest (a copy: the read buffer is
            # shared), stop reading this side until it has gone (end-to-end flow control).
            peer.buffer = bytearray(data[sent:])
            side.unread(self.loop)
            peer.write(self.loop, self._writable, peer, side)

    def _writable(self, side: _Side, source: _Side) -> None:
        buffer = side.buffer
        if buffer:
            try:
                sent = side.sock.send(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close(abort=True)
                return
            del buffer[:sent]
            if buffer:
                return
        side.buffer = None
        side.unwrite(self.loop)
        if side.shut_pending:
            self._shut(side)
        elif not source.eof and not self.closed:
            source.read(self.loop, self._readable, source, side, source is self.pledge_side)

    def _eof(self, side: _Side, peer: _Side) -> None:
        """side's peer half-closed: pass it on to the other end once its bytes are sent."""
        side.unread(self.loop)
        side.eof = True
        if peer.buffer:
            peer.shut_pending = True
        else:
            self._shut(peer)
        if peer.eof and not self.closed:
            self.close()

    def _shut(self, side: _Side) -> None:
        side.shut_pending = False
        try:
            side.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(abort=True)

    # -- both kinds ---------------------------------------------------------------------------
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
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.spliced is not None:
            self.refresh()
            self.spliced.close(abort)
        for side in (self.pledge_side, self.registrar_side):
            if side is not None:
                side.close(self.loop, abort)
        self.mode.closed(self)

    def info(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "interface": self.interface, "pledge": self.pledge,
                "registrar": self.registrar.key, "seconds": round(now - self.started, 1),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "datapath": "splice" if self.spliced is not None else "asyncio"}


class _Listener:
    def __init__(self, iface: JoinInterface, sock: socket.socket) -> None:
        self.iface = iface
        self.sock = sock
        self.retry: asyncio.TimerHandle | None = None  # accepting again after EMFILE


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
        if setting == "auto":
            # auto prefers the asyncio relay: measured here, a spliced circuit costs more
            # CPU to set up, and a pledge's MSS-sized segments cost the kernel's sockmap
            # path more per byte than this relay's 256 KiB reads (README, Benchmarks).
            self.splice_problem = ("[circuit] splice = auto: the asyncio relay is faster "
                                   "for short circuits and small segments")
            return
        try:
            self.splicer = Splicer(self.ctx.datapath.obj_dir if self.ctx.datapath else None)
        except KernelError as exc:
            self.splice_problem = str(exc).splitlines()[0]
            self.ctx.log.error("circuit relay runs in asyncio: the kernel cannot splice here "
                               "(%s)", self.splice_problem, extra={"MODE": self.name})
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
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((iface.link_local, iface.port, 0, iface.index))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            # Counted, logged once and retried with backoff; the control plane neither
            # announces this link for circuit nor calls it served meanwhile (unserved()).
            book.failed(iface.name, self.name, where, exc)
            return
        book.bound(iface.name, self.name)
        listener = self.listeners[iface.name] = _Listener(iface, sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, listener)
        self.ctx.log.info("circuit proxy listening on [%s]:%d", iface.scoped_link_local,
                          iface.port, extra={"INTERFACE": iface.name, "MODE": self.name})

    async def _unlisten(self, name: str, gone: bool) -> None:
        listener = self.listeners.pop(name)
        self._stop_listener(listener)
        if gone:  # the link went away: its circuits cannot carry anything any more
            for circuit in [c for c in self.open if c.interface == name]:
                circuit.close(abort=True)
        self.ctx.log.info("circuit proxy stopped listening on %s", name,
                          extra={"INTERFACE": name, "MODE": self.name})

    @staticmethod
    def _stop_listener(listener: _Listener) -> None:
        if listener.retry is not None:
            listener.retry.cancel()
        else:
            asyncio.get_running_loop().remove_reader(listener.sock.fileno())
        listener.sock.close()

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
    def _accept(self, listener: _Listener) -> None:
        """Accept what is queued, up to a batch, and admit each."""
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peername = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the pledge gave up while queued
            except OSError as exc:
                # Out of fds or memory (or worse): the queued pledges wait (the backlog
                # holds them) rather than the loop spinning on a listener it cannot serve.
                if exc.errno in OUT_OF_RESOURCES:
                    self.ctx.metrics.drop(self.name, DropReason.RESOURCES)
                self.ctx.log.error("circuit proxy cannot accept on %s, pausing %g s: %s",
                                   listener.iface.name, ACCEPT_RETRY_SECONDS, exc,
                                   extra={"INTERFACE": listener.iface.name, "MODE": self.name})
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.sock.fileno())
                listener.retry = loop.call_later(ACCEPT_RETRY_SECONDS, self._resume, listener)
                return
            sock.setblocking(False)
            self.admit(listener.iface, sock, peername)

    def _resume(self, listener: _Listener) -> None:
        listener.retry = None
        if self.listeners.get(listener.iface.name) is listener:
            asyncio.get_running_loop().add_reader(listener.sock.fileno(), self._accept,
                                                  listener)

    def admit(self, iface: JoinInterface, sock: socket.socket, peername: Any) -> None:
        pledge = f"{peername[0].split('%')[0]}%{iface.name}"
        # The operator's window first: a closed one refuses whatever else would be true.
        reason: DropReason | PolicyDropReason | None = (
            PolicyDropReason.WINDOW_CLOSED if not self.ctx.join_window() else
            self.admission.admit(iface.name, pledge, time.monotonic(),
                                 self.registrar is not None))
        if reason is not None:
            self.refused(iface.name, reason, f"pledge {pledge}", pledge)
            sock.close()
            return
        assert self.registrar is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        circuit = Circuit(self, iface.name, pledge, self.registrar, sock)
        self.open.add(circuit)
        circuit.connect(self.ctx.limits().connect_timeout)

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
        # The opening is logged at debug, the closing at info (one line per circuit, with
        # everything: pledge, registrar, time, bytes): two info lines were the largest
        # single cost of a short circuit (bench/relay_throughput.py's breakdown).
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
            self.ctx.log.info(
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
