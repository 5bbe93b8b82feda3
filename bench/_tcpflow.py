"""Traffic ends for bench/relay_throughput.py: a registrar-side server and pledge-side clients.

Run by file path inside a lab namespace (``ip netns exec NS python bench/_tcpflow.py ...``);
it imports nothing from the project, so it starts fast and measures only sockets.

    server --listen ADDR --port P     one asyncio server for every test; the first line a
                                      client sends picks what the connection does:
        sink\\n          read and discard until EOF, then close
        source S\\n      send for S seconds, then close
        echo\\n          echo every byte back until EOF
        hold\\n          answer "ok\\n" and stay open until EOF
      (a connection that closes before a full line, such as joinproxyd's health probe, is
      just closed)
    send  ADDR PORT --seconds S       one stream up: JSON {bytes, seconds} once the sink has
                                      closed, so every byte counted has reached it
    recv  ADDR PORT --seconds S       one stream down, timed from the first byte to EOF
    rate  ADDR PORT --seconds S --concurrency C
                                      connect, send 16 bytes, read the echo, close; in C
                                      threads; JSON {connections, errors, seconds}
    hold  ADDR PORT --count N         open N connections, wait for every "ok", print
                                      "ready N", close them all when stdin closes

Clients use blocking sockets and reused 64 KiB buffers (sendall of a memoryview, recv_into)
so the Python cost per byte is a few calls per 64 KiB: the relay under test is the bottleneck,
not this tool; relay_throughput.py checks that with a relay-less baseline. ADDR may carry a
zone (fe80::1%eth0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import threading
import time

CHUNK = 65536
PAYLOAD = b"0123456789abcdef"  # the "few bytes" of a connection-rate round trip
HEADER_MAX = 64


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: holding N circuits takes N sockets here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def sockaddr(addr: str, port: int) -> tuple[str, int, int, int]:
    host, _, zone = addr.partition("%")
    return (host, port, 0, socket.if_nametoindex(zone) if zone else 0)


def connect(addr: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sockaddr(addr, port))
    return sock


# -- server ---------------------------------------------------------------------------------
class _Conn(asyncio.BufferedProtocol):
    """BufferedProtocol: the kernel writes into one reused buffer (recv_into), so a sink
    costs no allocation per read."""

    def __init__(self) -> None:
        self.buffer = bytearray(256 * 1024)
        self.view = memoryview(self.buffer)
        self.transport: asyncio.Transport | None = None
        self.mode = ""
        self.header = b""
        self.paused = False
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        if self.mode == "sink":
            return
        if self.mode == "echo":
            self.transport.write(self.buffer[:nbytes])
            return
        if self.mode:
            return  # hold/source: whatever else the client sends is ignored
        self.header += self.buffer[:nbytes]
        line, newline, rest = self.header.partition(b"\n")
        if not newline:
            if len(self.header) > HEADER_MAX:
                self.transport.abort()
            return
        words = line.decode(errors="replace").split()
        self.mode = words[0] if words else "?"
        if self.mode == "echo" and rest:
            self.transport.write(rest)
        elif self.mode == "hold":
            self.transport.write(b"ok\n")
        elif self.mode == "source":
            self.deadline = time.monotonic() + float(words[1])
            self._pump()
        elif self.mode not in ("sink", "echo"):
            self.transport.abort()

    def _pump(self) -> None:
        """Write 64 KiB chunks until the transport pushes back or the time is up; yield to
        the loop every few chunks so reads and timers still run."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        chunk = self.view[:CHUNK]
        for _ in range(16):
            if self.paused:
                return
            if time.monotonic() >= self.deadline:
                transport.close()
                return
            transport.write(chunk)
        asyncio.get_running_loop().call_soon(self._pump)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == "source":
            self._pump()

    def eof_received(self) -> bool:
        return False  # close our side too: sink done, echo done, hold released

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(addr: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(sockaddr(addr, port))
    sock.listen(4096)
    server = await loop.create_server(_Conn, sock=sock)
    print(f"listening on [{addr}]:{port}", flush=True)
    async with server:
        await server.serve_forever()


# -- clients --------------------------------------------------------------------------------
def send(addr: str, port: int, seconds: float) -> dict[str, float]:
    data = memoryview(bytes(CHUNK))
    with connect(addr, port) as sock:
        sock.sendall(b"sink\n")
        sent = 0
        start = time.monotonic()
        deadline = start + seconds
        while True:
            for _ in range(16):  # check the clock once per MiB, not per chunk
                sock.sendall(data)
            sent += 16 * CHUNK
            if time.monotonic() >= deadline:
                break
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):  # the sink closes once it has read everything
            pass
        elapsed = time.monotonic() - start
    return {"bytes": sent, "seconds": elapsed}


def recv(addr: str, port: int, seconds: float) -> dict[str, float]:
    buf = memoryview(bytearray(4 * CHUNK))
    with connect(addr, port) as sock:
        sock.sendall(f"source {seconds}\n".encode())
        got = sock.recv_into(buf)
        start = time.monotonic()  # from the first byte: connection set-up is not throughput
        received = 0
        while n := sock.recv_into(buf):
            received += n
        elapsed = time.monotonic() - start
    return {"bytes": received, "seconds": elapsed, "first": got}


def rate(addr: str, port: int, seconds: float, concurrency: int) -> dict[str, float]:
    target = sockaddr(addr, port)
    message = b"echo\n" + PAYLOAD
    counts = [0] * concurrency
    errors = [0] * concurrency
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(target)
                    sock.sendall(message)
                    got = b""
                    while len(got) < len(PAYLOAD):
                        part = sock.recv(64)
                        if not part:
                            raise ConnectionError("closed before the echo")
                        got += part
                counts[i] += 1
            except OSError:
                errors[i] += 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"connections": sum(counts), "errors": sum(errors),
            "seconds": time.monotonic() - start}


def hold(addr: str, port: int, count: int) -> int:
    raise_nofile()
    socks = []
    for _ in range(count):
        sock = connect(addr, port)
        sock.sendall(b"hold\n")
        socks.append(sock)
    for sock in socks:  # "ok" came back through the relay: every circuit is up end to end
        if sock.recv(3) != b"ok\n":
            print("a held circuit did not answer", file=sys.stderr, flush=True)
            return 1
    print(f"ready {len(socks)}", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    for sock in socks:
        sock.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True)
    s.add_argument("--port", type=int, required=True)
    for name in ("send", "recv", "rate", "hold"):
        c = sub.add_parser(name)
        c.add_argument("addr")
        c.add_argument("port", type=int)
        c.add_argument("--seconds", type=float, default=2.0)
        c.add_argument("--concurrency", type=int, default=4)
        c.add_argument("--count", type=int, default=1000)
    args = p.parse_args()
    if args.cmd == "server":
        raise_nofile()
        asyncio.run(serve(args.listen, args.port))
        return 0
    if args.cmd == "hold":
        return hold(args.addr, args.port, args.count)
    if args.cmd == "send":
        result = send(args.addr, args.port, args.seconds)
    elif args.cmd == "recv":
        result = recv(args.addr, args.port, args.seconds)
    else:
        result = rate(args.addr, args.port, args.seconds, args.concurrency)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
