"""Nat66Mode against a real kernel: a driver runs the mode inside the lab's proxy namespace.

    pledge (fd4a:5044:0:100::100) ── join0 [proxy] bb0 (fd4a:5044::1) ── registrar (::100)

The registrar runs a TCP echo server that first says which address the connection came from
and which port it reached, so a test sees that bytes flow, that the registrar saw the proxy
(masquerade), and which registrar port the proxy chose.
"""

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab import Lab, Topology, wait_for
from lab.topology import PROXY_LL

pytestmark = pytest.mark.netns
PYTHON = sys.executable
PROXY_JOIN_ULA = "fd4a:5044:0:100::1"
PROXY_BACKBONE = "fd4a:5044::1"
REGISTRAR = "fd4a:5044::100"
ECHO_PORT = 9000
JOIN_PORT = 8443

DRIVER = r"""
import asyncio, json, logging, sys
from joinproxyd.config import Limits
from joinproxyd.kernel.netlink import InterfaceWatcher
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface, RegistrarEndpoint
from joinproxyd.relays.base import RelayContext
from joinproxyd.relays.nat66 import Nat66Mode

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s %(message)s")

async def main():
    log = logging.getLogger("nat66-driver")
    watcher = InterfaceWatcher(lambda snapshot: None, log)
    await watcher.start()
    metrics = Metrics()
    ctx = RelayContext(metrics, Limits, lambda: watcher.snapshot().get("bb0"), log)
    mode = Nat66Mode(ctx)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        request = json.loads(line)
        command = request["cmd"]
        if command == "reconcile":
            links = watcher.snapshot()
            interfaces = [JoinInterface(name, links[name].index, links[name].link_local[0],
                                        links[name].routable, ("nat66",), request["port"])
                          for name in request["interfaces"]]
            registrar = request.get("registrar")
            endpoint = RegistrarEndpoint(100, registrar[0], registrar[1]) if registrar else None
            await mode.reconcile(interfaces, endpoint)
        elif command == "close":
            await mode.close(request.get("drain", 0))
        reply = {"status": mode.status()}
        if command == "circuits":
            reply["circuits"] = mode.circuits()
        reply["shutdown_drops"] = metrics.registry.get_sample_value(
            "joinproxyd_drops_total", {"mode": "nat66", "reason": "shutdown"})
        reply["circuits_total"] = metrics.registry.get_sample_value(
            "joinproxyd_circuits_total", {"mode": "nat66"})
        reply["relayed_bytes"] = {direction: metrics.registry.get_sample_value(
            "joinproxyd_relayed_bytes_total", {"mode": "nat66", "direction": direction})
            for direction in ("upstream", "downstream")}
        print(json.dumps(reply), flush=True)
    await watcher.stop()

asyncio.run(main())
"""

ECHO = r"""
import socket, sys, threading
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", int(sys.argv[1])))
server.listen(16)
print("listening", flush=True)
def serve(conn, peer):
    with conn:
        conn.sendall(f"from {peer[0]} to {conn.getsockname()[1]}\n".encode())
        while data := conn.recv(4096):
            conn.sendall(data)
while True:
    conn, peer = server.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

CLIENT = r"""
import socket, sys
target, port, timeout, source = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
info = socket.getaddrinfo(target, port, socket.AF_INET6, socket.SOCK_STREAM)[0][4]
sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
sock.settimeout(timeout)
try:
    if source:
        sock.bind((source, 0))
    sock.connect(info)
    sock.sendall(b"hello pledge\n")
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    print(data.decode(), end="")
except OSError as exc:
    print(f"ERROR {type(exc).__name__}", end="")
    sys.exit(1)
"""


class Driver:
    """The mode in the proxy namespace, driven one JSON line at a time."""

    def __init__(self, lab: Lab, log_path: Path) -> None:
        self.log_path = log_path
        self.stderr = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(lab.proxy.cmd([PYTHON, "-c", DRIVER]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, start_new_session=True)
        assert self._read(30) == {"ready": True}

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise AssertionError(f"driver silent for {timeout} s: {self.log()}")
        line = self.proc.stdout.readline()
        assert line, f"driver ended: {self.log()}"
        return json.loads(line)

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """The mode's status after the command."""
        return self.reply(cmd, **args)["status"]

    def reply(self, cmd: str, **args: Any) -> dict[str, Any]:
        self.send(cmd, **args)
        return self._read(60)

    def send(self, cmd: str, **args: Any) -> None:
        """Send a command without waiting for its reply (read it with _read)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()

    def reconcile(self, interfaces: list[str] | None = None,
                  registrar: tuple[str, int] | None = (REGISTRAR, ECHO_PORT),
                  port: int = JOIN_PORT) -> dict[str, Any]:
        return self.call("reconcile", interfaces=["join0"] if interfaces is None else interfaces,
                         registrar=registrar, port=port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self.stderr.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr.close()


@pytest.fixture
def lab(as_root, tmp_path):
    with Lab(Topology(pledges=1, join_ula=True), log_dir=tmp_path) as lab:
        echo = lab.registrars[0].spawn([PYTHON, "-c", ECHO, str(ECHO_PORT)], name="echo")
        wait_for(lambda: "listening" in echo.log(), 10, "the echo server")
        yield lab


@pytest.fixture
def driver(lab, tmp_path):
    d = Driver(lab, tmp_path / "driver.log")
    yield d
    d.stop()


def connect(lab: Lab, target: str, port: int = JOIN_PORT, timeout: float = 5,
            source: str = "") -> str:
    done = lab.pledges[0].run([PYTHON, "-c", CLIENT, target, str(port), str(timeout), source],
                              check=False, timeout=timeout + 10)
    return done.stdout


def forwarding(lab: Lab) -> str:
    return lab.proxy.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip()


def nft_tables(lab: Lab) -> list[str]:
    out = json.loads(lab.proxy.run(["nft", "-j", "list", "tables"]).stdout)
    return [f"{o['table']['family']} {o['table']['name']}" for o in out["nftables"]
            if "table" in o]


def test_pledge_reaches_the_registrar_which_sees_the_proxy(lab, driver):
    assert forwarding(lab) == "0"
    status = driver.reconcile()
    assert status["relaying"] and status["error"] is None
    assert forwarding(lab) == "1"
    reply = connect(lab, PROXY_JOIN_ULA)
    assert reply == f"from {PROXY_BACKBONE} to {ECHO_PORT}\nhello pledge\n"
    # With a ULA source, the proxy's link-local address works as well.
    pledge_ula = lab.pledges[0].address("eth0", link_local=False)
    assert connect(lab, f"{PROXY_LL}%eth0", source=pledge_ula) == reply
    # A link-local source is left alone (for the circuit mode): nothing listens, so a reset.
    assert connect(lab, f"{PROXY_LL}%eth0") == "ERROR ConnectionRefusedError"


def test_everything_else_from_and_to_pledges_is_dropped_and_counted(lab, driver):
    driver.reconcile()
    # The registrar's host on another port: nothing listens there, so a reset if it got through.
    assert connect(lab, REGISTRAR, port=ECHO_PORT + 1, timeout=1.5) == "ERROR TimeoutError"
    assert connect(lab, PROXY_BACKBONE, port=22, timeout=1) in ("ERROR TimeoutError",
                                                                "ERROR ConnectionRefusedError")
    assert driver.call("status")["drops"]["not-to-registrar"] >= 1
    # The backbone cannot open connections to pledges through the proxy either.
    registrar = lab.registrars[0]
    registrar.run(["ip", "-6", "route", "add", "fd4a:5044:0:100::/64", "via", "fe80::b:1",
                   "dev", "eth0"])
    pledge_ula = lab.pledges[0].address("eth0", link_local=False)
    out = registrar.run(["ping", "-6", "-c", "1", "-W", "1", pledge_ula], check=False)
    assert out.returncode != 0
    drops = driver.call("status")["drops"]
    assert drops["unsolicited"] >= 1
    # ...while the relayed flow still works.
    assert connect(lab, PROXY_JOIN_ULA).startswith(f"from {PROXY_BACKBONE} to {ECHO_PORT}\n")


@pytest.mark.parametrize("join_port", [ECHO_PORT, JOIN_PORT])
def test_pledge_addressing_the_registrar_itself_is_relayed(lab, driver, join_port):
    """With the join port equal to the registrar's, the DNAT to the same address sets no
    dnat status in conntrack; with another join port, no DNAT happens at all. Either way
    the flow is the registrar's and is relayed (masqueraded), and nothing else is opened."""
    driver.reconcile(port=join_port)
    hello = f"from {PROXY_BACKBONE} to {ECHO_PORT}\nhello pledge\n"
    assert connect(lab, REGISTRAR, port=ECHO_PORT) == hello
    assert connect(lab, PROXY_JOIN_ULA, port=join_port) == hello
    assert driver.call("status")["drops"]["not-to-registrar"] == 0
    # The same host on another port, another backbone host: still dropped and counted.
    registrar = lab.registrars[0]
    registrar.run(["ip", "-6", "addr", "add", "fd4a:5044::200/64", "dev", "eth0", "nodad"])
    registrar.spawn([PYTHON, "-c", ECHO, str(ECHO_PORT + 2)], name="echo-other")
    wait_for(lambda: registrar.run(["ss", "-ltnH", f"sport = :{ECHO_PORT + 2}"]).stdout.strip(),
             10, "the other echo server")
    assert connect(lab, REGISTRAR, port=ECHO_PORT + 2, timeout=1) == "ERROR TimeoutError"
    assert connect(lab, "fd4a:5044::200", port=ECHO_PORT + 2, timeout=1) \
        == "ERROR TimeoutError"
    assert driver.call("status")["drops"]["not-to-registrar"] >= 2


def test_relayed_flows_and_bytes_are_counted(lab, driver):
    driver.reconcile()
    payload = len("hello pledge\n")
    hello = f"from {PROXY_BACKBONE} to {ECHO_PORT}\nhello pledge\n"
    assert connect(lab, PROXY_JOIN_ULA) == hello  # DNAT
    assert connect(lab, REGISTRAR, port=ECHO_PORT) == hello  # addressed to the registrar
    connect(lab, REGISTRAR, port=ECHO_PORT + 1, timeout=1)  # dropped: not counted

    def counted() -> dict[str, Any] | None:
        reply = driver.reply("status")
        return reply if reply["circuits_total"] == 2 else None

    reply = wait_for(counted, 5, "two NAT66 circuits counted")
    traffic = reply["status"]["traffic"]["join0"]
    assert traffic["flows"] == 2
    # IPv6 packets, headers included: 2 flows x (SYN, ACK, data, FIN, ...) of >= 60 bytes.
    assert reply["relayed_bytes"]["upstream"] == traffic["upstream_bytes"] \
        >= 2 * (payload + 4 * 60)
    assert reply["relayed_bytes"]["downstream"] == traffic["downstream_bytes"] \
        >= 2 * (len(hello) + 3 * 60)
    # Counts survive a table replacement and close.
    before = reply["relayed_bytes"]
    driver.reconcile(registrar=(REGISTRAR, 9001))
    after = driver.reply("close")
    assert after["circuits_total"] == 2 and after["relayed_bytes"] == before


def test_table_matches_the_ruleset_the_builder_made(lab, driver):
    from joinproxyd.model import JoinInterface, RegistrarEndpoint
    from joinproxyd.relays.nat66 import build_ruleset

    status = driver.reconcile()
    listed = json.loads(lab.proxy.run(["nft", "-j", "list", "table", "ip6", "joinproxyd"]).stdout)
    rules = [o["rule"] for o in listed["nftables"] if "rule" in o]
    join0 = JoinInterface("join0", 0, "fe80::1", (PROXY_JOIN_ULA,), ("nat66",), JOIN_PORT)
    spec = build_ruleset([join0], RegistrarEndpoint(100, REGISTRAR, ECHO_PORT), "bb0",
                         forwarding_before=status["forwarding"]["before"])
    wanted = [o["rule"] for o in spec if "rule" in o]
    assert [(r["chain"], r.get("expr"), r.get("comment")) for r in rules] == \
        [(r["chain"], r["expr"], r.get("comment")) for r in wanted]


def test_a_killed_run_is_replaced_and_forwarding_restored_to_before_it(lab, tmp_path):
    first = Driver(lab, tmp_path / "first.log")
    first.reconcile()
    first.kill()  # no close(): table and forwarding stay behind
    assert nft_tables(lab) == ["ip6 joinproxyd"]
    assert forwarding(lab) == "1"
    second = Driver(lab, tmp_path / "second.log")
    try:
        status = second.reconcile()
        assert nft_tables(lab) == ["ip6 joinproxyd"]
        assert status["forwarding"]["before"] == "0"  # from the table, not the current 1
        assert "left by an earlier run" in second.log()
        assert connect(lab, PROXY_JOIN_ULA).startswith(f"from {PROXY_BACKBONE} to {ECHO_PORT}\n")
        second.call("close")
        assert nft_tables(lab) == []
        assert forwarding(lab) == "0"
    finally:
        second.stop()


def test_serving_nothing_gives_forwarding_back(lab, driver):
    driver.reconcile()
    assert forwarding(lab) == "1"
    status = driver.reconcile(interfaces=[])
    assert forwarding(lab) == "0"
    assert nft_tables(lab) == []
    assert status["interfaces"] == [] and not status["relaying"]
    driver.reconcile()
    assert forwarding(lab) == "1"
    driver.call("close")
    assert forwarding(lab) == "0"


def test_forwarding_that_was_on_stays_on(lab, driver):
    lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    driver.reconcile()
    driver.call("close")
    assert forwarding(lab) == "1"
    assert nft_tables(lab) == []


@pytest.mark.parametrize("registrar", [None, ("fe80::b:2", ECHO_PORT)])
def test_without_a_usable_registrar_pledges_get_nothing(lab, driver, registrar):
    status = driver.reconcile(registrar=registrar)
    assert not status["relaying"]
    listed = lab.proxy.run(["nft", "list", "table", "ip6", "joinproxyd"]).stdout
    assert "dnat to" not in listed and "masquerade" not in listed
    assert connect(lab, PROXY_JOIN_ULA, timeout=2) == "ERROR ConnectionRefusedError"
    assert connect(lab, REGISTRAR, port=ECHO_PORT, timeout=1) == "ERROR TimeoutError"
    assert driver.call("status")["drops"]["no-registrar"] >= 1
    driver.reconcile(registrar=registrar)
    assert driver.log().count("nat66 relays nothing") == 1  # logged once, not per reconcile
    # A usable registrar later: relaying starts.
    assert driver.reconcile()["relaying"]
    assert connect(lab, PROXY_JOIN_ULA).startswith(f"from {PROXY_BACKBONE} to {ECHO_PORT}\n")


def test_registrar_change_moves_new_connections(lab, driver):
    second = lab.registrars[0]
    second.spawn([PYTHON, "-c", ECHO, "9001"], name="echo2")
    wait_for(lambda: second.run(["ss", "-ltnH", "sport = :9001"]).stdout.strip(), 10,
             "the second echo server")
    driver.reconcile()
    assert connect(lab, PROXY_JOIN_ULA).startswith(f"from {PROXY_BACKBONE} to {ECHO_PORT}\n")
    status = driver.reconcile(registrar=(REGISTRAR, 9001))
    assert status["registrar"] == f"[{REGISTRAR}]:9001"
    assert connect(lab, PROXY_JOIN_ULA).startswith(f"from {PROXY_BACKBONE} to 9001\n")


def test_counters_survive_table_replacement(lab, driver):
    driver.reconcile()
    connect(lab, REGISTRAR, port=ECHO_PORT + 1, timeout=1)
    before = driver.call("status")["drops"]["not-to-registrar"]
    assert before >= 1
    driver.reconcile(registrar=(REGISTRAR, 9001))  # a new table
    assert driver.call("status")["drops"]["not-to-registrar"] == before


def test_link_without_a_prefix_is_warned_about_once(as_root, tmp_path):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        d = Driver(lab, tmp_path / "driver.log")
        try:
            d.reconcile()
            d.reconcile()
            text = d.log()
            assert text.count("join0 has no ULA or global prefix") == 1
            assert "WARNING" in text.split("join0 has no ULA or global prefix")[0].splitlines()[-1]
            d.call("close")
        finally:
            d.stop()


def test_forward_rules_are_in_place_before_forwarding_is_on(lab, driver):
    """Poll the namespace while the mode starts: forwarding=1 is never seen without the
    table."""
    seen: list[tuple[str, bool]] = []
    start = time.monotonic()
    probe = subprocess.Popen(lab.proxy.cmd(["sh", "-c", (
        "for i in $(seq 400); do "
        "f=$(cat /proc/sys/net/ipv6/conf/all/forwarding); "
        "nft list table ip6 joinproxyd >/dev/null 2>&1 && t=1 || t=0; "
        "echo $f$t; done")]), stdout=subprocess.PIPE, text=True)
    time.sleep(0.05)
    driver.reconcile()
    out, _ = probe.communicate(timeout=60)
    seen = [(line[0], line[1] == "1") for line in out.split()]
    assert ("1", False) not in seen, seen
    assert time.monotonic() - start < 60


HOLD = r"""
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
greeting = sock.recv(100)
print("connected", greeting.decode().strip(), flush=True)
time.sleep(float(sys.argv[3]))
sock.sendall(b"late\n")
sock.shutdown(socket.SHUT_WR)
data = b""
while chunk := sock.recv(100):
    data += chunk
print("echoed", data.decode().strip(), flush=True)
"""


def test_close_drains_open_flows_and_lists_them(lab, driver):
    driver.reconcile()
    hold = lab.pledges[0].spawn([PYTHON, "-c", HOLD, PROXY_JOIN_ULA, str(JOIN_PORT), "2"],
                                name="hold")
    wait_for(lambda: "connected" in hold.log(), 10, "the held connection")
    pledge = lab.pledges[0].address("eth0", link_local=False)
    circuits = driver.reply("circuits")["circuits"]
    assert len(circuits) == 1
    assert circuits[0]["interface"] == "join0"
    assert circuits[0]["pledge"].startswith(f"[{pledge}]:")
    assert circuits[0]["proxy"] == f"[{PROXY_JOIN_ULA}]:{JOIN_PORT}"
    assert circuits[0]["registrar"] == f"[{REGISTRAR}]:{ECHO_PORT}"
    started = time.monotonic()
    driver.send("close", drain=20)
    time.sleep(0.5)
    # Draining: a new pledge connection is no longer relayed (the proxy itself resets it)...
    assert connect(lab, PROXY_JOIN_ULA, timeout=2) == "ERROR ConnectionRefusedError"
    reply = driver._read(30)
    assert time.monotonic() - started < 15  # returned when the flow ended, not at the deadline
    assert "echoed late" in hold.log()  # ...while the open flow lived through the drain
    assert reply["shutdown_drops"] == 0
    assert nft_tables(lab) == [] and forwarding(lab) == "0"


def test_flows_outliving_the_drain_are_cut(lab, driver):
    driver.reconcile()
    hold = lab.pledges[0].spawn([PYTHON, "-c", HOLD, PROXY_JOIN_ULA, str(JOIN_PORT), "30"],
                                name="hold")
    wait_for(lambda: "connected" in hold.log(), 10, "the held connection")
    started = time.monotonic()
    reply = driver.reply("close", drain=1)
    assert 1 <= time.monotonic() - started < 10
    assert reply["shutdown_drops"] == 1
    assert nft_tables(lab) == [] and forwarding(lab) == "0"


def test_a_flow_addressed_to_the_registrar_is_listed_and_drained_too(lab, driver):
    """It has only source NAT in conntrack (no dnat status): it must still be found."""
    driver.reconcile()
    hold = lab.pledges[0].spawn([PYTHON, "-c", HOLD, REGISTRAR, str(ECHO_PORT), "2"],
                                name="hold")
    wait_for(lambda: "connected" in hold.log(), 10, "the held connection")
    pledge = lab.pledges[0].address("eth0", link_local=False)
    (circuit,) = driver.reply("circuits")["circuits"]
    assert circuit["pledge"].startswith(f"[{pledge}]:")
    assert circuit["proxy"] == circuit["registrar"] == f"[{REGISTRAR}]:{ECHO_PORT}"
    started = time.monotonic()
    driver.send("close", drain=20)
    time.sleep(0.5)
    # Draining: a new connection to the registrar is no longer admitted...
    assert connect(lab, REGISTRAR, port=ECHO_PORT, timeout=1) == "ERROR TimeoutError"
    reply = driver._read(30)
    assert time.monotonic() - started < 15  # waited for the flow, and only as long as it lived
    assert "echoed late" in hold.log()  # ...while the open one lived through the drain
    assert reply["shutdown_drops"] == 0
