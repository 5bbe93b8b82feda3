"""The traffic ends and the bare relays for the datagram benchmarks, one process each.

    _udpflow.py echo PORT                         registrar: answer every datagram with itself
                                                  (a DTLS ClientHello, the proxy's health
                                                  probe, with a HelloVerifyRequest)
    _udpflow.py relay LISTEN_ADDR PORT IFNAME TARGET TPORT
                                                  the bare asyncio UDP relay: per client
                                                  (address, port) a connected socket of its
                                                  own towards TARGET, payload untouched; no
                                                  limits, no expiry, no counters
    _udpflow.py load PROXY PORT SECONDS FLOWS WINDOW SIZE
                                                  FLOWS sockets, each keeping WINDOW datagrams
                                                  of SIZE bytes in flight; prints echoes/s
    _udpflow.py hold PROXY PORT FLOWS             FLOWS sockets, each sends one datagram until
                                                  it is answered, then holds (prints "held N",
                                                  then waits for stdin to close)

echo, relay, load and hold are bench/coaps_relay.py's; these two bench/_stateless_relay.py's
(jpy_relay.py, cojp_relay.py):

    _udpflow.py single-relay LISTEN_ADDR PORT IFNAME TARGET TPORT
                                                  the least any UDP relay can do for one
                                                  pledge: one socket each side, no table; what
                                                  comes back goes to the last sender
    _udpflow.py pingpong PROXY PORT SECONDS WINDOW SHAPE
                                                  one socket keeps WINDOW 64-byte datagrams in
                                                  flight, each answer sending the next; SHAPE
                                                  bytes (opaque) or cojp (a NON CoJP join
                                                  request); prints {"datagrams", "seconds"}
"""

import asyncio
import contextlib
import json
import resource
import select
import socket
import sys
import time


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# A DTLS 1.2 HelloVerifyRequest with a one-byte cookie: what the proxy's probe wants back.
_HVR_BODY = b"\xfe\xff\x01X"
_HVR = (b"\x03" + len(_HVR_BODY).to_bytes(3, "big") + bytes(5)
        + len(_HVR_BODY).to_bytes(3, "big") + _HVR_BODY)
HELLO_VERIFY_REQUEST = b"\x16\xfe\xfd" + bytes(8) + len(_HVR).to_bytes(2, "big") + _HVR


def echo(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("::", port))
    while True:
        data, addr = sock.recvfrom(65535)
        if data[:1] == b"\x16" and data[13:14] == b"\x01":
            data = HELLO_VERIFY_REQUEST  # the proxy relays only to a DTLS-healthy registrar
        with contextlib.suppress(OSError):
            sock.sendto(data, addr)


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, listener: asyncio.DatagramTransport, client: tuple) -> None:
        self.listener = listener
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.listener.sendto(data, self.client)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.flows: dict[tuple, asyncio.DatagramTransport | None] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # _SelectorDatagramTransport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        flow = self.flows.get(addr)
        if flow is not None:
            flow.sendto(data)
            return
        if addr in self.flows:
            return  # still being created
        self.flows[addr] = None
        task = asyncio.ensure_future(self._open(addr, data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _open(self, addr: tuple, data: bytes) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Upstream(self.transport, addr), remote_addr=self.target,
            family=socket.AF_INET6)
        self.flows[addr] = transport
        transport.sendto(data)


async def relay(listen: str, port: int, ifname: str, target: str, tport: int) -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind((listen, port, 0, socket.if_nametoindex(ifname)))
    await loop.create_datagram_endpoint(lambda: _Listener((target, tport)), sock=sock)
    print("relay ready", flush=True)
    await asyncio.Event().wait()


def load(proxy: str, port: int, seconds: float, flows: int, window: int, size: int) -> None:
    dest = (proxy, port, 0, socket.if_nametoindex("eth0"))
    socks = []
    for _ in range(flows):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(dest)
        socks.append(sock)
    payload = b"\x17" * size
    for sock in socks:
        for _ in range(window):
            sock.send(payload)
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    echoes = 0
    start = time.monotonic()
    last_seen = start
    deadline = start + seconds
    while (now := time.monotonic()) < deadline:
        events = poller.poll(0.2)
        if not events and now - last_seen > 0.2:
            # datagrams lost on the way (buffers): refill each window so the load goes on
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(payload)
        for fd, _ in events:
            sock = by_fd[fd]
            while True:
                try:
                    sock.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                echoes += 1
                last_seen = time.monotonic()
                with contextlib.suppress(OSError):
                    sock.send(payload)
    elapsed = time.monotonic() - start
    print(f"echoes {echoes} seconds {elapsed:.3f} rate {echoes / elapsed:.1f}", flush=True)


def hold(proxy: str, port: int, flows: int) -> None:
    raise_nofile()
    dest = (proxy, port, 0, socket.if_nametoindex("eth0"))
    waiting = {}
    for i in range(flows):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(dest)
        waiting[sock.fileno()] = sock
        if i % 200 == 199:
            time.sleep(0.01)  # pace the first datagrams a little: the proxy's buffer
    held = []
    poller = select.epoll()
    for fd in waiting:
        poller.register(fd, select.EPOLLIN)
    deadline = time.monotonic() + 60
    while waiting and time.monotonic() < deadline:
        for sock in list(waiting.values())[:2000]:
            with contextlib.suppress(OSError):
                sock.send(b"hold")
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for fd, _ in poller.poll(0.1):
                sock = waiting.pop(fd, None)
                if sock is None:
                    continue
                poller.unregister(fd)
                with contextlib.suppress(OSError):
                    sock.recv(65535)
                held.append(sock)
    print(f"held {len(held)}", flush=True)
    sys.stdin.read()


class _PledgeEnd(asyncio.DatagramProtocol):
    """The single relay's pledge side: remembers the last sender, sends on towards TARGET."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.pledge: tuple | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.down: _RegistrarEnd | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # _SelectorDatagramTransport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        # the least work per datagram: both ends are set up before the first one comes
        self.pledge = addr
        self.down.transport.sendto(data, self.target)  # type: ignore[union-attr]


class _RegistrarEnd(asyncio.DatagramProtocol):
    """The single relay's registrar side: what comes back goes to the last pledge."""

    def __init__(self, up: _PledgeEnd) -> None:
        self.up = up
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # _SelectorDatagramTransport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.up.pledge is not None:
            self.up.transport.sendto(data, self.up.pledge)  # type: ignore[union-attr]


async def single_relay(listen: str, port: int, ifname: str, target: str, tport: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind((listen, port, 0, socket.if_nametoindex(ifname)))
    _, up = await loop.create_datagram_endpoint(lambda: _PledgeEnd((target, tport)), sock=sock)
    _, up.down = await loop.create_datagram_endpoint(
        lambda: _RegistrarEnd(up), local_addr=("::", 0), family=socket.AF_INET6)
    print("ready", flush=True)
    await asyncio.Event().wait()


# A NON POST with a 1-byte token, Uri-Host 6tisch.arpa, an OSCORE option, Proxy-Scheme coap,
# then the payload marker: with 32 bytes of payload, 64 bytes (RFC 9031's join request shape).
_COJP_OPTIONS = (bytes([0x3B]) + b"6tisch.arpa" + bytes([0x63, 0x09, 0x00, 0x08])
                 + bytes([0xD4, 0x11]) + b"coap" + b"\xff")


def _datagram(shape: str, seq: int) -> bytes:
    if shape == "cojp":
        return (bytes([0x51, 0x02]) + (seq & 0xFFFF).to_bytes(2, "big") + b"\x01"
                + _COJP_OPTIONS + seq.to_bytes(8, "big") * 4)
    return seq.to_bytes(8, "big") * 8


def pingpong(proxy: str, port: int, seconds: float, window: int, shape: str) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.connect((proxy, port, 0, socket.if_nametoindex("eth0")))
    s.setblocking(False)
    seq = 0

    def send() -> None:
        nonlocal seq
        seq += 1
        s.send(_datagram(shape, seq))

    for _ in range(window):
        send()
    got, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        ready, _, _ = select.select([s], [], [], 0.2)
        if not ready:
            for _ in range(window):  # all lost (first packets, buffer overflow): refill
                send()
            continue
        while True:
            try:
                s.recv(2048)
            except BlockingIOError:
                break
            got += 1
            send()
    print(json.dumps({"datagrams": got, "seconds": time.monotonic() - start}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "echo":
        echo(int(args[0]))
    elif cmd == "relay":
        asyncio.run(relay(args[0], int(args[1]), args[2], args[3], int(args[4])))
    elif cmd == "single-relay":
        asyncio.run(single_relay(args[0], int(args[1]), args[2], args[3], int(args[4])))
    elif cmd == "load":
        load(args[0], int(args[1]), float(args[2]), int(args[3]), int(args[4]), int(args[5]))
    elif cmd == "pingpong":
        pingpong(args[0], int(args[1]), float(args[2]), int(args[3]), args[4])
    else:
        hold(args[0], int(args[1]), int(args[2]))
