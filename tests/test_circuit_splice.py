"""The circuit relay spliced in the kernel (ebpf/splice.bpf.c), on loopback with real
sockets: idle timeout from the program's byte counters, half-close both ways, the kernel's
refusal falling back to asyncio, status, and the [circuit] splice key."""

import asyncio
import contextlib
import ctypes
import logging
import socket
import threading
import time
from dataclasses import replace

import pytest

from joinproxyd.config import CircuitSettings, ConfigError, Limits, parse
from joinproxyd.ctl import render_circuits
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface, RegistrarEndpoint
from joinproxyd.relays import RelayContext
from joinproxyd.relays.circuit import CircuitMode
from joinproxyd.uci import read, translate

LOOPBACK = JoinInterface("lo", socket.if_nametoindex("lo"), "::1", (), ("circuit",), 0)
FAST = Limits(new_circuits_per_second=1000, new_circuits_burst=1000)


def free_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, limits: Limits = FAST, splice: str = "on") -> None:
        self.metrics = Metrics()
        self.limits = limits
        ctx = RelayContext(self.metrics, lambda: self.limits, lambda: None,
                           logging.getLogger("test"),
                           circuit=lambda: CircuitSettings(splice))
        self.mode = CircuitMode(ctx)
        self.iface = replace(LOOPBACK, port=free_port())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def start(self, handler) -> asyncio.AbstractServer:  # type: ignore[no-untyped-def]
        server = await asyncio.start_server(handler, "::1", 0)
        registrar = RegistrarEndpoint(10, "::1", server.sockets[0].getsockname()[1])
        await self.mode.reconcile([self.iface], registrar)
        return server


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, 30))


def test_bytes_moved_by_the_kernel_keep_a_circuit_alive_and_are_counted():
    """The daemon sees none of a spliced circuit's bytes: only the program's counters can
    tell the sweeper the circuit is busy, and the metrics what it carried."""
    async def scenario() -> None:
        h = Harness(replace(FAST, idle_timeout=0.8))
        server = await h.start(echo)
        reader, writer = await asyncio.open_connection("::1", h.iface.port)
        for _ in range(10):  # 2 s of traffic, well past the idle timeout
            writer.write(b"x" * 1000)
            assert await reader.readexactly(1000) == b"x" * 1000
            await asyncio.sleep(0.2)
        (info,) = h.mode.circuits()
        assert info["datapath"] == "splice"
        assert render_circuits([{**info, "mode": "circuit"}]).splitlines()[1].split()[-1] \
            == "splice"
        assert info["bytes_up"] == info["bytes_down"] == 10_000
        assert h.sample("joinproxyd_drops_total", mode="circuit", reason="idle-timeout") == 0
        assert h.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                        direction="upstream") == 10_000
        # silent now: the idle timeout still ends it (a reset)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 3)
        assert h.sample("joinproxyd_drops_total", mode="circuit", reason="idle-timeout") == 1
        assert h.mode.status()["active"] == 0
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_half_close_each_way_passes_after_the_bytes():
    """The pledge half-closes after its request; the registrar answers after reading to end
    of file, then half-closes itself: every byte arrives, then each end sees end of file."""
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def sink_then_answer(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # to the pledge's FIN
        writer.write(len(data).to_bytes(8, "big") + data[:1000])
        await writer.drain()
        writer.write_eof()
        await asyncio.sleep(0.5)
        writer.close()

    async def scenario() -> None:
        h = Harness()
        server = await h.start(sink_then_answer)
        reader, writer = await asyncio.open_connection("::1", h.iface.port)
        await asyncio.sleep(0.1)  # spliced before the bytes come
        assert h.mode.circuits()[0]["datapath"] == "splice"
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert int.from_bytes(answer[:8], "big") == len(payload)
        assert answer[8:] == payload[:1000]
        await asyncio.sleep(0.2)
        assert h.mode.status()["active"] == 0  # both directions closed: the circuit ended
        assert h.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                        direction="upstream") == len(payload)
        assert h.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                        direction="downstream") == 1008
        writer.close()
        await h.mode.close(0)
        server.close()

    run(scenario())


def test_pledge_bytes_waiting_before_the_splice_are_not_stranded():
    """A pledge's first flight sits in its socket's receive queue while the registrar
    connects (here: its listener's accept queue is full, so the proxy's SYN is retried a
    second later); the program only sees bytes that arrive after the insertion, and this
    pledge sends nothing more until answered."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind(("::1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname()[:2])  # the queue is full now

    def registrar() -> None:
        time.sleep(0.5)
        listener.accept()[0].close()  # the filler: room for the proxy's retried SYN
        conn, _ = listener.accept()
        with conn, contextlib.suppress(ConnectionResetError):  # the proxy closes with a reset
            while data := conn.recv(65536):
                conn.sendall(data)

    async def scenario() -> None:
        h = Harness()
        endpoint = RegistrarEndpoint(10, "::1", listener.getsockname()[1])
        await h.mode.reconcile([h.iface], endpoint)
        thread = threading.Thread(target=registrar, daemon=True)
        thread.start()
        sock = socket.create_connection(("::1", h.iface.port))
        await asyncio.sleep(0.2)  # accepted, paused, the registrar not yet connected
        assert [c.connected for c in h.mode.open] == [False]
        sock.sendall(b"ClientHello" * 100)
        sock.settimeout(5)
        got = b""
        while len(got) < 1100:
            got += await asyncio.to_thread(sock.recv, 65536)
        assert got == b"ClientHello" * 100
        assert h.mode.circuits()[0]["datapath"] == "splice"
        sock.close()
        await h.mode.close(0)
        thread.join(5)

    try:
        run(scenario())
    finally:
        filler.close()
        listener.close()


def test_the_kernel_refuses_a_half_closed_pledge_and_asyncio_carries_it(caplog):
    """Only established sockets enter a sockhash: a pledge that sent its request and its FIN
    before the registrar answered is refused by the kernel (EOPNOTSUPP), and the circuit
    runs in asyncio, logged and counted, with the answer delivered."""
    async def scenario() -> None:
        h = Harness()
        server = await h.start(echo)
        sock = socket.create_connection(("::1", h.iface.port))
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        got = b""
        while chunk := await asyncio.to_thread(sock.recv, 65536):
            got += chunk
        assert got == b"request"
        status = h.mode.status()["splice"]
        assert status["running"] is True
        assert status["refused"] == 1 and status["spliced"] == 0, status
        sock.close()
        await h.mode.close(0)
        server.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    refusals = [r.getMessage() for r in caplog.records if "refused to splice" in r.getMessage()]
    assert len(refusals) == 1 and "ENOTSUP" in refusals[0], refusals


def test_splice_off_and_a_missing_object_run_in_asyncio(tmp_path):
    async def scenario() -> None:
        off = Harness(splice="off")
        server = await off.start(echo)
        assert off.mode.status()["splice"] == {
            "setting": "off", "running": False, "reason": "[circuit] splice = off",
            "spliced_now": 0, "spliced": 0, "refused": 0}
        await off.mode.close(0)
        server.close()

        class NoObjects:  # a data plane whose object directory has no splice.bpf.o
            obj_dir = tmp_path

        on = Harness(splice="on")
        on.mode.ctx.datapath = NoObjects()  # type: ignore[assignment]
        server = await on.start(echo)
        reader, writer = await asyncio.open_connection("::1", on.iface.port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        status = on.mode.status()["splice"]
        assert status["running"] is False and "splice.bpf.o" in status["reason"], status
        assert on.mode.circuits()[0]["datapath"] == "asyncio"
        writer.close()
        await on.mode.close(0)
        server.close()

    run(scenario())


def test_auto_prefers_the_asyncio_relay():
    """auto does not splice: measured, the splice loses for short circuits and a pledge's
    small segments (README, Benchmarks); status says so, the circuit runs in asyncio."""
    async def scenario() -> None:
        h = Harness(splice="auto")
        server = await h.start(echo)
        reader, writer = await asyncio.open_connection("::1", h.iface.port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        status = h.mode.status()["splice"]
        assert status["setting"] == "auto" and status["running"] is False, status
        assert "asyncio relay is faster" in status["reason"], status
        assert h.mode.splicer is None
        assert h.mode.circuits()[0]["datapath"] == "asyncio"
        writer.close()
        await h.mode.close(0)
        server.close()

    run(scenario())


MINIMAL = {"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join0"]}],
           "registrars": {"static": [{"address": "fd00::1"}]}}


def test_circuit_splice_key_parses_and_refuses_nonsense():
    assert parse(dict(MINIMAL)).circuit.splice == "off"
    for value in ("on", "off", "auto"):
        assert parse({**MINIMAL, "circuit": {"splice": value}}).circuit.splice == value
    for bad, shown in ((True, "true"), ("yes", "'yes'"), (1, "1")):
        with pytest.raises(ConfigError) as err:
            parse({**MINIMAL, "circuit": {"splice": bad}})
        assert str(err.value) == (f'circuit.splice: must be "auto", "on" or "off" '
                                  f"(got {shown})"), str(err.value)
    with pytest.raises(ConfigError, match=r"circuit\.spliced"):
        parse({**MINIMAL, "circuit": {"spliced": "on"}})


def test_uci_circuit_section_maps_to_the_splice_key():
    text = ("config join 'lan'\n\toption enabled '1'\n\tlist interface 'join0'\n"
            "config circuit 'circuit'\n\toption splice 'off'\n")
    data = translate(read(text)).data
    assert data["circuit"] == {"splice": "off"}


def test_closed_spliced_circuits_leave_nothing_in_either_map():
    """A closing circuit deletes its rows; its sockets leave the sockhash as they close (the
    kernel's unlink, which the daemon relies on instead of deleting them itself)."""
    from joinproxyd.kernel.libbpf import map_keys

    async def scenario() -> None:
        h = Harness()
        server = await h.start(echo)
        conns = [await asyncio.open_connection("::1", h.iface.port) for _ in range(3)]
        for reader, writer in conns:
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
        splicer = h.mode.splicer
        assert splicer is not None
        assert len(map_keys(splicer.socks_fd, ctypes.c_uint64)) == 6  # two per circuit
        assert len(map_keys(splicer.sides_fd, ctypes.c_uint64)) == 6
        (_, first), (_, second), (reader, _) = conns
        first.write_eof()  # a graceful end: each side half-closes
        await asyncio.sleep(0.2)
        first.close()
        h.mode.drop(min(h.mode.open, key=lambda c: c.id), "test")  # an abort
        second.close()
        for _ in range(50):
            if h.mode.status()["active"] == 1:
                break
            await asyncio.sleep(0.05)
        assert h.mode.status()["active"] == 1
        assert len(map_keys(splicer.socks_fd, ctypes.c_uint64)) == 2
        assert len(map_keys(splicer.sides_fd, ctypes.c_uint64)) == 2
        await h.mode.close(0)  # aborts what is left: a reset
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 3)
        server.close()

    run(scenario())
