"""The circuit relay's kernel splice (ebpf/splice.bpf.o): the control plane of a sockhash.

After a circuit's registrar side connects, both sockets go into jp_splice_socks with an
sk_skb stream verdict program that sends whatever one side receives out of the other side
(bpf_sk_redirect_hash), so no payload crosses into Python. What stays here:

- the rows of jp_splice_sides (each socket's peer, by socket cookie), written before the
  sockets are inserted and removed when the circuit closes;
- bytes already in a receive queue when the sockets are inserted (the pledge's first flight:
  the relay does not read the pledge before the registrar side connects), which the program
  would only see once more arrive, are pushed through it right after (SO_RCVLOWAT makes TCP
  call data_ready, SplicedCircuit.start);
- half-close: a FIN is not payload, the kernel wakes the socket's reader and recv() says end
  of file; the other side is half-closed once everything counted for that direction has
  reached its send queue (its TCP_INFO bytes acked plus SIOCOUTQ), so no byte still in the
  redirect's backlog is cut off;
- the byte counters (the program's, per side) for metrics and the idle timeout.

The kernel refuses some sockets (one not ESTABLISHED any more, e.g. a pledge that already
half-closed; a full map; no sockmap support): such a circuit stays on the asyncio relay, and
`joinproxyctl status` / `circuits` say which runs where.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import Protocol

from ..kernel import KernelError
from ..kernel.bpf import Splicer

SO_COOKIE = 57
SO_SNDBUFFORCE = 32  # SO_SNDBUF past net.core.wmem_max (CAP_NET_ADMIN, which the daemon has)
# The send buffer of a spliced socket: the redirect's worker stops at a full send buffer
# and waits for room. 4 MiB (the default tcp_wmem maximum) took a bare splice from 0.72 to
# 0.89 of direct TCP up and 0.96 to 1.30 down in one run of bench/relay_throughput.py
# --variants (32 KiB skbs), changed nothing in another; it only caps what may queue.
SPLICE_SNDBUF = 4 << 20
_TCP_INFO_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked), stable UAPI


def cookie_of(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def handed_to_tcp(sock: socket.socket) -> int:
    """Payload bytes this socket's TCP has taken to send: acknowledged plus still queued."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    acked = struct.unpack_from("<Q", info, _TCP_INFO_BYTES_ACKED)[0]
    queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return acked + queued


class Refused(Exception):
    """The kernel would not splice this circuit; str() says why (logged, counted)."""


class Owner(Protocol):
    """What a spliced circuit tells its circuit (relays/circuit.py Circuit)."""

    def close(self, abort: bool = False) -> None: ...
    def touch(self) -> None: ...


class _End:
    """One socket of a spliced circuit (slots: a spliced circuit should cost the daemon
    little memory; the ints are small and shared)."""

    __slots__ = ("base", "by_hand", "cookie", "eof", "reading", "shut", "sock")

    def __init__(self, sock: socket.socket, cookie: int) -> None:
        self.sock = sock
        self.cookie = cookie
        self.base = 0  # what its TCP had taken to send when it was spliced (handed_to_tcp)
        self.by_hand = 0  # bytes it received that the daemon read and wrote on itself
        self.eof = False  # its peer half-closed toward us
        self.shut = False  # we half-closed it (its peer's FIN passed on)
        self.reading = False


class SplicedCircuit:
    """The kernel's half of one circuit: its two sockets, their rows, and the events the
    daemon still handles (end of file, errors, stray bytes)."""

    __slots__ = ("_tasks", "closed", "owner", "pledge", "registrar", "splicer", "timeout")

    def __init__(self, splicer: Splicer, owner: Owner, pledge: socket.socket,
                 registrar: socket.socket) -> None:
        self.splicer = splicer
        self.owner = owner
        self.pledge = _End(pledge, cookie_of(pledge))
        self.registrar = _End(registrar, cookie_of(registrar))
        self._tasks: set[asyncio.Task[None]] | None = None  # half-closes under way
        self.closed = False
        self.timeout = 5.0

    def peer(self, end: _End) -> _End:
        return self.registrar if end is self.pledge else self.pledge

    def start(self, timeout: float) -> None:
        """Write the rows, insert both sockets, push what waits in their receive queues
        through the program, watch both for end of file. Raises Refused (and undoes
        everything) if the kernel will not take a socket."""
        sp, p, r = self.splicer, self.pledge, self.registrar
        # What each TCP has taken to send that is not of this circuit's payload (the SYN):
        # the drain check before a half-close starts there.
        r.base = handed_to_tcp(r.sock)
        p.base = handed_to_tcp(p.sock)
        for end in (p, r):
            try:
                end.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SPLICE_SNDBUF)
            except PermissionError:  # without CAP_NET_ADMIN: as far as wmem_max allows
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SPLICE_SNDBUF)
        try:
            sp.add_side(p.cookie, r.cookie)
            sp.add_side(r.cookie, p.cookie)
            for end in (r, p):  # the registrar first: the pledge's bytes find their peer
                sp.insert(end.sock, end.cookie)
        except KernelError as exc:
            for end in (p, r):
                sp.remove(end.cookie)
            raise Refused(str(exc)) from exc
        self.timeout = timeout
        loop = asyncio.get_running_loop()
        for end in (p, r):
            # Bytes already in the receive queue are invisible to the program until more
            # arrive (and a pledge waiting for an answer sends no more): setting SO_RCVLOWAT
            # makes TCP call the socket's data_ready, i.e. run the program over them, now.
            end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            loop.add_reader(end.sock.fileno(), self._readable, end)
            end.reading = True

    async def _drained(self, end: _End) -> bool:
        """Wait until every byte of end's direction has reached the peer's TCP; False if
        the circuit closed or the wait outlived the timeout."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        while not self.closed:
            if self._drained_now(end):
                return True
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.002)
        return False

    def _drained_now(self, end: _End) -> bool:
        peer = self.peer(end)
        return handed_to_tcp(peer.sock) - peer.base >= end.by_hand + self.counted(end)

    def counted(self, end: _End) -> int:
        row = self.splicer.side(end.cookie)
        return row.bytes if row is not None else 0

    def totals(self) -> tuple[int, int]:
        """Bytes up (pledge to registrar) and down so far: by hand plus the program's."""
        return (self.pledge.by_hand + self.counted(self.pledge),
                self.registrar.by_hand + self.counted(self.registrar))

    def _stop_reading(self, end: _End) -> None:
        if end.reading:
            end.reading = False
            asyncio.get_running_loop().remove_reader(end.sock.fileno())

    def _readable(self, end: _End) -> None:
        try:
            data = end.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.owner.close(abort=True)  # reset: the other side is reset too
            return
        if data:
            # Not expected (the program takes every byte); written on by hand, in order.
            end.by_hand += len(data)
            self.owner.touch()
            try:
                self.peer(end).sock.sendall(data)
            except OSError:
                self.owner.close(abort=True)
            return
        self._stop_reading(end)
        end.eof = True
        self.owner.touch()
        try:
            drained = self._drained_now(end)  # mostly so: then no task is needed
        except OSError:
            drained = False
        if drained:
            self._shut_peer(end)
            return
        task = asyncio.get_running_loop().create_task(self._pass_fin(end))
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pass_fin(self, end: _End) -> None:
        """Half-close the peer once every byte of this direction has reached its TCP."""
        try:
            drained = await self._drained(end)
        except OSError:
            drained = False
        if self.closed:
            return
        if not drained:
            self.owner.close(abort=True)
            return
        self._shut_peer(end)

    def _shut_peer(self, end: _End) -> None:
        peer = self.peer(end)
        try:
            peer.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.owner.close(abort=True)
            return
        peer.shut = True
        if self.pledge.shut and self.registrar.shut:
            self.owner.close(abort=False)

    def close(self, abort: bool) -> None:
        """Remove the rows and close both sockets (reset them if abort)."""
        if self.closed:
            return
        self.closed = True
        for end in (self.pledge, self.registrar):
            self._stop_reading(end)
            # its row only: closing the socket takes it out of the sockhash (the kernel's
            # own unlink), one map syscall per socket fewer
            self.splicer.forget(end.cookie)
            if abort:
                end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
            end.sock.close()
        for task in list(self._tasks or ()):
            task.cancel()
