"""The circuit relay on loopback: real sockets, a real registrar-side server, no mocks.

End-to-end runs through namespaces and the whole daemon live in test_joinproxyd_e2e.py; here
each behaviour of the relay itself is pinned down: bytes intact both ways under
backpressure, half-close, every refusal reason counted, timeouts, drain on close.
"""

import asyncio
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest

from joinproxyd.config import CircuitSettings, Limits
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface, RegistrarEndpoint
from joinproxyd.relays import RelayContext, mode_class
from joinproxyd.relays.circuit import CircuitMode

LOOPBACK = JoinInterface("lo", socket.if_nametoindex("lo"), "::1", (), ("circuit",), 0)


# Every test runs with the circuits spliced in the kernel ([circuit] splice = on) and with
# the asyncio relay (off); the harness reads which from here.
SPLICE = {"setting": "off"}


@pytest.fixture(autouse=True, params=["on", "off"])
def splice(request: pytest.FixtureRequest) -> str:
    SPLICE["setting"] = request.param
    return request.param


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.metrics = Metrics()
        ctx = RelayContext(self.metrics, lambda: self.limits, lambda: None,
                           logging.getLogger("test"),
                           circuit=lambda: CircuitSettings(SPLICE["setting"]))
        self.mode = CircuitMode(ctx)
        self.iface = replace(LOOPBACK, port=free_port())

    def drops(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value(
            "joinproxyd_drops_total", {"mode": "circuit", "reason": reason}) or 0.0

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("::1", self.iface.port)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def with_registrar(handler: Callable[..., Awaitable[None]]
                         ) -> tuple[asyncio.AbstractServer, RegistrarEndpoint]:
    server = await asyncio.start_server(handler, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, RegistrarEndpoint(10, "::1", port)


async def closed_by_proxy(reader: asyncio.StreamReader) -> bool:
    """The proxy closed the connection: EOF, or a reset when unread bytes were pending."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


DEFAULT = Limits(new_circuits_per_second=1000, new_circuits_burst=1000)


def test_registry_knows_the_circuit_mode():
    assert mode_class("circuit") is CircuitMode


def test_bytes_relayed_both_ways_and_counted():
    async def scenario() -> None:
        h = Harness(DEFAULT)
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        reader, writer = await h.connect()
        writer.write(b"ClientHello")
        assert await reader.readexactly(11) == b"ClientHello"
        assert h.mode.status()["active"] == 1
        assert h.mode.circuits()[0]["registrar"] == registrar.key
        want = "splice" if SPLICE["setting"] == "on" else "asyncio"
        assert h.mode.circuits()[0]["datapath"] == want
        assert h.mode.status()["splice"]["running"] is (want == "splice")
        writer.close()
        await asyncio.sleep(0.2)
        assert h.mode.status()["active"] == 0
        assert h.sample("joinproxyd_circuits_total", mode="circuit") == 1
        assert h.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                        direction="upstream") == 11
        assert h.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                        direction="downstream") == 11
        assert h.sample("joinproxyd_circuits_active", interface="lo", mode="circuit") == 0
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_large_transfer_with_slow_registrar_loses_nothing():
    payload = bytes(range(256)) * 40_000  # 10 MB
    received = hashlib.sha256()
    done = asyncio.Event()

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(16384):
            received.update(data)
            total += len(data)
            if total % (1 << 20) < 16384:
                await asyncio.sleep(0.01)  # a slow reader: the relay must pause the pledge
        writer.write(total.to_bytes(8, "big"))
        await writer.drain()
        writer.close()
        done.set()

    async def scenario() -> None:
        h = Harness(DEFAULT)
        server, registrar = await with_registrar(slow_sink)
        await h.mode.reconcile([h.iface], registrar)
        reader, writer = await h.connect()
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # half-close: the answer must still come back
        total = int.from_bytes(await reader.readexactly(8), "big")
        assert await reader.read() == b""
        await done.wait()
        assert total == len(payload)
        assert received.digest() == hashlib.sha256(payload).digest()
        writer.close()
        await h.mode.close(1)
        server.close()

    run(scenario())


def test_per_pledge_limit_refuses_and_counts():
    async def scenario() -> None:
        h = Harness(replace(DEFAULT, circuits_per_pledge=2))
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        open_ones = []
        for _ in range(2):
            reader, writer = await h.connect()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            open_ones.append(writer)
        reader, writer = await h.connect()
        assert await closed_by_proxy(reader)  # refused: closed at once
        assert h.drops("limit-pledge") == 1
        assert h.mode.status()["active"] == 2
        for w in open_ones:
            w.close()
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_rate_limit_refuses_bursts_from_one_pledge():
    async def scenario() -> None:
        h = Harness(replace(DEFAULT, new_circuits_per_second=0.01, new_circuits_burst=3))
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        outcomes = []
        for _ in range(5):
            reader, writer = await h.connect()
            writer.write(b"x")
            try:
                outcomes.append(await asyncio.wait_for(reader.read(1), 2))
            except ConnectionError:
                outcomes.append(b"")
            writer.close()
        assert outcomes == [b"x", b"x", b"x", b"", b""]
        assert h.drops("rate-limit") == 2
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_without_registrar_new_circuits_are_refused_but_open_ones_stay():
    async def scenario() -> None:
        h = Harness(DEFAULT)
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        reader, writer = await h.connect()
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        await h.mode.reconcile([h.iface], None)  # the registrar went unhealthy
        r2, _w2 = await h.connect()
        assert await closed_by_proxy(r2)
        assert h.drops("no-registrar") == 1
        writer.write(b"b")  # the established circuit still works
        assert await reader.readexactly(1) == b"b"
        writer.close()
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_unreachable_registrar_is_counted():
    async def scenario() -> None:
        h = Harness(DEFAULT)
        await h.mode.reconcile([h.iface], RegistrarEndpoint(10, "::1", free_port()))
        reader, writer = await h.connect()
        writer.write(b"hello")
        assert await closed_by_proxy(reader)
        await asyncio.sleep(0.05)
        assert h.drops("registrar-unreachable") == 1
        assert h.mode.status()["active"] == 0
        assert h.mode.admission.total == 0
        await h.mode.close(0)

    run(scenario())


def test_silent_pledge_is_timed_out():
    async def scenario() -> None:
        h = Harness(replace(DEFAULT, idle_timeout=0.4))
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        reader, _writer = await h.connect()  # a slowloris: connects, sends nothing
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await closed_by_proxy(reader)
        assert 0.3 < loop.time() - start < 2
        assert h.drops("idle-timeout") == 1
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_reconcile_without_the_interface_stops_listening():
    async def scenario() -> None:
        h = Harness(DEFAULT)
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        assert h.mode.status()["listeners"][0]["port"] == h.iface.port
        await h.mode.reconcile([], registrar)
        assert h.mode.status()["listeners"] == []
        with pytest.raises(ConnectionRefusedError):
            await h.connect()
        await h.mode.reconcile([h.iface], registrar)  # and back, idempotently
        await h.mode.reconcile([h.iface], registrar)
        reader, writer = await h.connect()
        writer.write(b"z")
        assert await reader.readexactly(1) == b"z"
        writer.close()
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_close_drains_then_aborts_leftovers():
    async def scenario() -> None:
        h = Harness(DEFAULT)
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        reader, writer = await h.connect()
        writer.write(b"q")
        await reader.readexactly(1)
        await h.mode.close(0.3)
        assert h.drops("shutdown") == 1
        status = h.mode.status()
        assert status.pop("splice")["spliced_now"] == 0
        assert status == {"listeners": [], "registrar": registrar.key, "active": 0}
        server.close()

    run(scenario())


def test_listen_failure_is_logged_not_raised(caplog):
    async def scenario() -> None:
        h = Harness(DEFAULT)
        bad = replace(h.iface, link_local="2001:db8::1")  # not an address of this host
        await h.mode.reconcile([bad], None)
        assert h.mode.status()["listeners"] == []
        await h.mode.close(0)

    with caplog.at_level(logging.ERROR):
        run(scenario())
    assert "cannot listen on [2001:db8::1%lo]" in caplog.text


def test_out_of_file_descriptors_refuses_cleanly(monkeypatch):
    import errno

    real_socket = socket.socket

    def no_more_files(*args: object, **kwargs: object) -> socket.socket:
        # Only the relay's own registrar-side socket() (positional arguments, no fileno)
        # fails; asyncio's client sockets (keywords) and accepted sockets (fileno) do not.
        if args == (socket.AF_INET6, socket.SOCK_STREAM) and not kwargs:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_socket(*args, **kwargs)  # type: ignore[arg-type]

    async def scenario() -> None:
        h = Harness(DEFAULT)
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        monkeypatch.setattr(socket, "socket", no_more_files)
        try:
            reader, writer = await h.connect()
            writer.write(b"hello")
            assert await closed_by_proxy(reader)
        finally:
            monkeypatch.undo()
        await asyncio.sleep(0.05)
        assert h.drops("resources") == 1
        assert h.drops("registrar-unreachable") == 0
        assert h.mode.open == set() and h.mode.admission.total == 0
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_out_of_file_descriptors_at_accept_pauses_the_listener_then_serves(monkeypatch):
    """accept() failing with EMFILE is counted (drop reason resources), logged, and stops
    the listener for a moment instead of spinning on it; the pledge waits in the backlog and
    is served once accepting resumes."""
    import errno

    from joinproxyd.relays import circuit as circuit_module

    real_accept = socket.socket.accept
    failures = {"left": 1}

    def accept_once_emfile(self: socket.socket) -> tuple[socket.socket, object]:
        if failures["left"] and self.getsockname()[1] == h.iface.port:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(self)

    h = Harness(DEFAULT)
    monkeypatch.setattr(socket.socket, "accept", accept_once_emfile)
    monkeypatch.setattr(circuit_module, "ACCEPT_RETRY_SECONDS", 0.3)

    async def scenario() -> None:
        server, registrar = await with_registrar(echo)
        await h.mode.reconcile([h.iface], registrar)
        reader, writer = await h.connect()  # the kernel completes it; accept() fails
        writer.write(b"hello")
        await asyncio.sleep(0.1)
        assert h.drops("resources") == 1
        assert h.mode.open == set()  # not admitted yet: the listener is paused
        assert h.mode.listeners[h.iface.name].retry is not None
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"  # then served
        assert h.drops("resources") == 1 and failures["left"] == 0
        writer.close()
        await h.mode.close(0)
        server.close()

    run(scenario())
