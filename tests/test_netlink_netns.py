"""InterfaceWatcher against a real kernel, in a fresh network namespace per test."""

import asyncio
import logging
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from joinproxyd.kernel import KernelError
from joinproxyd.kernel.netlink import InterfaceWatcher, nat_flows
from joinproxyd.model import LinkState

pytestmark = pytest.mark.netns


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def ns(as_root):
    """A fresh namespace; DAD on (the kernel default) but no kernel-made link-locals, so each
    test decides which addresses exist."""
    name = f"jpxw{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        for key, value in (("net.ipv6.conf.all.accept_dad", "1"),
                           ("net.ipv6.conf.default.accept_dad", "1"),
                           ("net.ipv6.conf.default.addr_gen_mode", "1"),
                           ("net.ipv6.conf.default.accept_ra", "0")):
            sh("ip", "netns", "exec", name, "sysctl", "-qw", f"{key}={value}")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def ip(ns: str, *args: str) -> None:
    sh("ip", "-n", ns, *args)


def tentative(ns: str, ifname: str) -> str:
    return sh("ip", "-n", ns, "-6", "addr", "show", "dev", ifname, "tentative").stdout


class Recorder:
    """Collects on_change calls; fails the test if one arrives off the event loop."""

    def __init__(self) -> None:
        self.calls: list[dict[str, LinkState]] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, snapshot: dict[str, LinkState]) -> None:
        assert asyncio.get_running_loop() is self.loop
        self.calls.append(snapshot)


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)


def run(ns: str, scenario: Callable[[InterfaceWatcher, Recorder], object],
        log: logging.Logger | None = None) -> Recorder:
    recorder = Recorder()

    async def main() -> None:
        recorder.loop = asyncio.get_running_loop()
        watcher = InterfaceWatcher(recorder, log or logging.getLogger("test.netlink"),
                                   netns=ns)
        first = await watcher.start()
        assert set(first) == {"lo"}
        try:
            await scenario(watcher, recorder)  # type: ignore[misc]
        finally:
            await watcher.stop()

    asyncio.run(main())
    return recorder


def test_new_link_appears_once_up_with_a_link_local(ns):
    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        await until(lambda: "va" in w.snapshot(), 1, "va to appear")
        assert not w.snapshot()["va"].up
        started = time.monotonic()
        ip(ns, "-6", "addr", "add", "fe80::a/64", "dev", "va", "nodad")
        ip(ns, "link", "set", "va", "up")
        ip(ns, "link", "set", "vb", "up")
        await until(lambda: w.snapshot()["va"].ready, 1, "va ready")
        assert time.monotonic() - started < 1
        assert w.snapshot()["va"].link_local == ("fe80::a",)
        # ...and the change was reported, not only visible on request.
        await until(lambda: rec.calls and rec.calls[-1]["va"].ready, 1, "on_change for va")
        assert rec.calls[-1]["va"].index == w.snapshot()["va"].index

    run(ns, scenario)


def test_tentative_address_is_listed_only_after_dad(ns):
    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip(ns, "link", "set", "va", "up")
        ip(ns, "link", "set", "vb", "up")
        await until(lambda: w.snapshot().get("va", LinkState("", 0, False)).up, 1, "va up")
        ip(ns, "-6", "addr", "add", "fe80::d/64", "dev", "va")
        ip(ns, "-6", "addr", "add", "fd00:d::1/64", "dev", "va")
        assert "fe80::d" in tentative(ns, "va")
        await asyncio.sleep(0.2)  # long enough for the NEWADDR (tentative) to be processed
        if "fe80::d" in tentative(ns, "va"):
            assert w.snapshot()["va"].link_local == ()
            assert w.snapshot()["va"].routable == ()
        await until(lambda: "fe80::d" not in tentative(ns, "va"), 5, "DAD to finish")
        await until(lambda: w.snapshot()["va"].link_local == ("fe80::d",), 1,
                    "the address once DAD finished")
        await until(lambda: w.snapshot()["va"].routable == ("fd00:d::1",), 2, "the ULA")
        await until(lambda: rec.calls[-1]["va"].link_local == ("fe80::d",), 1, "on_change")

    run(ns, scenario)


def test_down_rename_and_delete_are_noticed(ns):
    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip(ns, "-6", "addr", "add", "fe80::a/64", "dev", "va", "nodad")
        ip(ns, "link", "set", "va", "up")
        ip(ns, "link", "set", "vb", "up")
        await until(lambda: w.snapshot().get("va", LinkState("", 0, False)).ready, 1, "ready")
        index = w.snapshot()["va"].index
        # Carrier loss: the peer goes down, va stays administratively up.
        ip(ns, "link", "set", "vb", "down")
        await until(lambda: not w.snapshot()["va"].up, 1, "va to lose carrier")
        ip(ns, "link", "set", "vb", "up")
        await until(lambda: w.snapshot()["va"].up, 1, "carrier back")
        # Administratively down.
        ip(ns, "link", "set", "va", "down")
        await until(lambda: not w.snapshot()["va"].up, 1, "va down")
        await until(lambda: rec.calls and not rec.calls[-1]["va"].up, 1, "on_change for down")
        ip(ns, "link", "set", "va", "name", "join7")
        await until(lambda: "join7" in w.snapshot() and "va" not in w.snapshot(), 1, "rename")
        assert w.snapshot()["join7"].index == index
        ip(ns, "link", "del", "join7")
        await until(lambda: set(w.snapshot()) == {"lo"}, 1, "both ends of the veth gone")
        await until(lambda: rec.calls and set(rec.calls[-1]) == {"lo"}, 1, "on_change")

    run(ns, scenario)


def test_bridge_port_leaving_its_bridge_stays(ns):
    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip(ns, "link", "add", "br0", "type", "bridge")
        ip(ns, "link", "set", "va", "master", "br0")
        ip(ns, "link", "set", "va", "nomaster")  # the bridge sends an AF_BRIDGE RTM_DELLINK
        ip(ns, "link", "add", "marker", "type", "veth", "peer", "name", "marker1")
        await until(lambda: "marker" in w.snapshot(), 1, "the marker link")
        assert {"va", "vb", "br0"} <= set(w.snapshot())

    run(ns, scenario)


def test_a_burst_of_changes_is_reported_in_few_calls(ns):
    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        await until(lambda: rec.calls and "va" in rec.calls[-1], 1, "va reported")
        await asyncio.sleep(0.2)
        before = len(rec.calls)
        batch = "".join(f"addr add fd00:b::{i:x}/64 dev va nodad\n" for i in range(1, 41))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
        await until(lambda: len(w.snapshot()["va"].routable) == 40, 1, "40 addresses")
        await asyncio.sleep(0.2)
        assert rec.calls[-1]["va"].routable == w.snapshot()["va"].routable
        assert len(rec.calls) - before <= 3, "a burst should be coalesced"

    run(ns, scenario)


GARBAGE = r"""
import socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, 0))
group = int(sys.argv[1])
for data in (
    # RTM_NEWLINK whose only attribute claims 200 bytes in an 8-byte tail
    struct.pack("IHHII", 40, 16, 0, 0, 0) + struct.pack("BxHiII", 0, 1, 77, 1, 0)
    + struct.pack("HH", 200, 3) + b"abcd",
    # RTM_NEWADDR too short for its own header
    struct.pack("IHHII", 20, 20, 0, 0, 0) + b"\x0a\x40\x00\x00",
    # a message type nobody knows
    struct.pack("IHHII", 24, 0x7777, 0, 0, 0) + bytes(8),
    # a length larger than the datagram
    struct.pack("IHHII", 4000, 16, 0, 0, 0) + bytes(16),
):
    s.sendto(data, (0, group))
"""


def test_malformed_messages_on_the_groups_do_not_stop_it(ns, caplog):
    """Root may send anything to the rtnetlink groups; the watcher logs, re-reads, carries on.
    The sender runs inside the test namespace: only this namespace's listeners get it."""
    caplog.set_level(logging.WARNING, logger="test.netlink")

    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        for group in (1, 1 << 8):  # RTNLGRP_LINK, RTNLGRP_IPV6_IFADDR
            sh("ip", "netns", "exec", ns, sys.executable, "-c", GARBAGE, str(group))
        await until(lambda: "malformed" in caplog.text or "undecodable" in caplog.text, 2,
                    "a warning about the garbage")
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip(ns, "-6", "addr", "add", "fe80::a/64", "dev", "va", "nodad")
        ip(ns, "link", "set", "va", "up")
        ip(ns, "link", "set", "vb", "up")
        await until(lambda: w.snapshot().get("va", LinkState("", 0, False)).ready, 2,
                    "va ready after the garbage")
        assert 77 not in {state.index for state in w.snapshot().values()}

    run(ns, scenario)


def test_receive_buffer_overflow_is_recovered_by_a_resync(ns, caplog):
    """ENOBUFS means events were lost: the watcher must re-read the kernel's state."""
    caplog.set_level(logging.INFO, logger="test.netlink")

    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        assert w._monitor is not None
        # The smallest buffer the kernel allows, and a loop that does not read for a while.
        w._monitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        batch = "".join(f"link add v{i} type veth peer name p{i}\n" for i in range(60))
        subprocess.run(["ip", "-n", ns, "-batch", "-"], input=batch, text=True, check=True)
        time.sleep(0.3)  # blocks the loop: the socket overflows meanwhile
        await until(lambda: "overflowed" in caplog.text, 2, "the overflow to be noticed")
        await until(lambda: len(w.snapshot()) == 121, 3, "all 120 links after the resync")
        ip(ns, "link", "del", "v0")
        await until(lambda: "v0" not in w.snapshot(), 2, "monitoring to go on")

    run(ns, scenario, logging.getLogger("test.netlink"))


def test_a_failed_monitor_socket_is_replaced(ns, caplog):
    caplog.set_level(logging.WARNING, logger="test.netlink")

    async def scenario(w: InterfaceWatcher, rec: Recorder) -> None:
        assert w._monitor is not None
        w._monitor.close()  # as if the socket had died under the watcher
        await until(lambda: "reopening" in caplog.text, 2, "the failure to be logged")
        ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        await until(lambda: "va" in w.snapshot(), 3, "va through the new socket")
        await until(lambda: rec.calls and "va" in rec.calls[-1], 1, "on_change")

    run(ns, scenario)


def test_a_failing_change_handler_does_not_stop_it(ns, caplog):
    calls: list[dict[str, LinkState]] = []

    def handler(snapshot: dict[str, LinkState]) -> None:
        calls.append(snapshot)
        raise RuntimeError("handler bug")

    async def main() -> None:
        watcher = InterfaceWatcher(handler, logging.getLogger("test.netlink"), netns=ns)
        await watcher.start()
        try:
            ip(ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
            await until(lambda: calls, 1, "the first call")
            ip(ns, "link", "del", "va")
            await until(lambda: len(calls) >= 2 and "va" not in calls[-1], 1, "a second call")
        finally:
            await watcher.stop()

    asyncio.run(main())
    assert "handler bug" in caplog.text


def test_start_twice_is_refused_and_stop_is_idempotent(ns):
    async def main() -> None:
        watcher = InterfaceWatcher(lambda s: None, logging.getLogger("test"), netns=ns)
        await watcher.start()
        with pytest.raises(RuntimeError):
            await watcher.start()
        await watcher.stop()
        await watcher.stop()

    asyncio.run(main())
    assert issubclass(KernelError, Exception)


def test_nat_flows_of_a_namespace_without_nat_is_empty(ns):
    """(Flows with NAT are read in test_nat66_lab, where the kernel makes them.)"""
    assert asyncio.run(nat_flows(netns=ns)) == []
