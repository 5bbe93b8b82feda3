"""Not tests: the script the discovery namespace tests run inside lab namespaces, and the
test-side handle on it. It holds no test functions, so collecting it runs nothing.

The daemon's parts run in the proxy namespace and the peers (registrars, pledges) in theirs,
each as ``ip netns exec NS python tests/test_discovery_driver.py ROLE ...``. A role prints one
JSON object per line on stdout (``{"event": ...}``) and reads JSON commands on stdin
(``{"cmd": "status"}``); ``quit`` or end of input stops it, and the part's stop() is followed by
a ``stopped`` event listing any asyncio task or thread still alive. Logs go to stderr.

Roles, daemon side: health, grasp-listen, announce, mdns-advertise, mdns-browse.
Roles, peer side: tcp-listen, send-flood, recv-flood, mdns-register, mdns-resolve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DRIVER = Path(__file__).resolve()
PYTHON = sys.executable


# ==== test side ================================================================================
class Driver:
    """One driver process in a namespace, its JSON events collected by a reader thread."""

    def __init__(self, ns: str, role: str, *args: str, log_dir: Path) -> None:
        self.role = role
        self.log_path = log_dir / f"{ns}-{role}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, PYTHON, str(DRIVER), role, *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def _pump(self, timeout: float) -> bool:
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        if event is None:
            self._queue.put(None)  # stay at end of stream
            return False
        self.events.append(event)
        return True

    def expect(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
               what: str, since: int = 0) -> dict[str, Any]:
        """The first event at or after index `since` matching `predicate`."""
        deadline = time.monotonic() + timeout
        checked = since
        while True:
            for event in self.events[checked:]:
                if predicate(event):
                    return event
            checked = max(checked, len(self.events))
            left = deadline - time.monotonic()
            if left <= 0 or not self._pump(min(left, 0.2)):
                break  # out of time, or the process ended
        raise AssertionError(f"{self.role}: no {what} within {timeout} s; events "
                             f"{self.events[since:]!r}\n--- log ---\n{self.log()[-4000:]}")

    def event(self, kind: str, /, timeout: float = 10, since: int = 0,
              **match: Any) -> dict[str, Any]:
        """The first `kind` event whose fields equal `match` (positional-only `kind`, so
        events may have a field called "kind" or "name")."""
        return self.expect(lambda e: e.get("event") == kind
                           and all(e.get(k) == v for k, v in match.items()),
                           timeout, f"{kind} event {match or ''}", since)

    def request(self, cmd: str, reply: str, timeout: float = 10, **fields: Any
                ) -> dict[str, Any]:
        mark = len(self.events)
        self.send(cmd, **fields)
        return self.event(reply, timeout, since=mark)

    def quiet_for(self, seconds: float, name: str) -> list[dict[str, Any]]:
        """Collect for `seconds`; the `name` events seen meanwhile."""
        mark = len(self.events)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self._pump(min(left, 0.2)):
                time.sleep(min(left, 0.2))
        return [e for e in self.events[mark:] if e.get("event") == name]

    def close(self, timeout: float = 15) -> dict[str, Any] | None:
        """Ask it to stop; returns its `stopped` event (None if it never sent one)."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("quit")
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self._reader.join(5)
        while self._pump(0):
            if self._queue.empty():
                break
        return next((e for e in reversed(self.events) if e.get("event") == "stopped"), None)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)


def driver(request: Any, tmp_path: Path) -> Callable[..., Driver]:
    """Factory for drivers that are all closed at the end of the test (see the fixtures)."""
    started: list[Driver] = []

    def start(ns: str, role: str, *args: str) -> Driver:
        d = Driver(ns, role, *args, log_dir=tmp_path)
        started.append(d)
        return d

    def close_all() -> None:
        for d in started:
            d.close(5)
            d.kill()

    request.addfinalizer(close_all)
    return start


# ==== namespace side ===========================================================================
def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


async def commands() -> asyncio.Queue[dict[str, Any]]:
    """Commands from stdin, as a queue; end of input is a quit."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def pump() -> None:
        while line := await reader.readline():
            with contextlib.suppress(ValueError):
                out.put_nowait(json.loads(line))
        out.put_nowait({"cmd": "quit"})

    # asyncio only keeps weak references to tasks: hold this one, or it is collected.
    _KEEP.add(asyncio.create_task(pump(), name="driver-stdin"))
    return out


_KEEP: set[asyncio.Task[None]] = set()


def leftovers() -> dict[str, list[str]]:
    me = asyncio.current_task()
    tasks = [t.get_name() for t in asyncio.all_tasks() if t is not me
             and t.get_name() != "driver-stdin"]
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return {"tasks": tasks, "threads": threads}


def metric(metrics: Any, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def drops(metrics: Any, mode: str) -> dict[str, float]:
    from joinproxyd.model import DropReason

    return {r.value: metric(metrics, "joinproxyd_drops_total", mode=mode, reason=r.value)
            for r in DropReason}


def join_interface(spec: str) -> Any:
    """NAME[:PORT[:LINK_LOCAL]] in this namespace -> JoinInterface."""
    from joinproxyd.model import JoinInterface

    name, _, rest = spec.partition(":")
    port, _, ll = rest.partition(":")
    return JoinInterface(name, socket.if_nametoindex(name), ll or "fe80::1", (), ("circuit",),
                         int(port or 8443))


def endpoint(spec: str, source: str = "static") -> Any:
    """[ADDR[%IFACE]]:PORT[/PREFERENCE] -> RegistrarEndpoint."""
    from joinproxyd.model import RegistrarEndpoint

    spec, _, pref = spec.partition("/")
    addr, _, port = spec.rpartition(":")
    addr, _, iface = addr.strip("[]").partition("%")
    scope = socket.if_nametoindex(iface) if iface else 0
    return RegistrarEndpoint(int(pref or 100), addr, int(port), source=source, scope_id=scope)


async def serve(part_stop: Callable[[], Any], handle: Callable[[dict[str, Any]], Any]) -> None:
    """Run commands until quit, then stop the part and report leftovers."""
    cmds = await commands()
    emit("ready")
    while True:
        cmd = await cmds.get()
        if cmd.get("cmd") == "quit":
            break
        result = handle(cmd)
        if asyncio.iscoroutine(result):
            await result
    await part_stop()
    await asyncio.sleep(0.1)  # let closed transports' callbacks run
    emit("stopped", **leftovers())


async def role_health(args: argparse.Namespace) -> None:
    from joinproxyd.discovery.registrars import RegistrarSet
    from joinproxyd.metrics import Metrics

    metrics = Metrics()
    rset = RegistrarSet(
        static=[endpoint(s) for s in args.static], health_interval=args.interval,
        health_timeout=args.timeout, metrics=metrics, log=logging.getLogger("health"),
        on_change=lambda e: emit("active", registrar=e.key if e else None,
                                 t=time.monotonic()))
    await rset.start()

    def handle(cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "status":
            emit("status", registrars=rset.status(),
                 active=rset.active.key if rset.active else None)
        elif cmd["cmd"] == "offer":
            rset.offer(endpoint(cmd["endpoint"], cmd.get("source", "grasp")), cmd.get("ttl"))

    await serve(rset.stop, handle)


async def role_grasp_listen(args: argparse.Namespace) -> None:
    from joinproxyd.discovery.grasp import GraspRegistrarListener
    from joinproxyd.metrics import Metrics

    metrics = Metrics()
    extra = []
    for name in args.also_join:
        # Something else on the router listening on a join link (a GRASP daemon, say):
        # floods from that link then reach the host, and our listener must still ignore them.
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("::", 7017))
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, socket.inet_pton(
            socket.AF_INET6, "ff02::13") + struct.pack("@I", socket.if_nametoindex(name)))
        s.setblocking(False)
        asyncio.get_running_loop().add_reader(s.fileno(), lambda s=s, n=name: emit(
            "other-socket", interface=n, size=len(s.recv(65535))))
        extra.append(s)
    listener = GraspRegistrarListener(
        interface=args.interface, ifindex=socket.if_nametoindex(args.interface),
        on_registrar=lambda e, ttl: emit("registrar", key=e.key, address=e.address,
                                         port=e.port, scope_id=e.scope_id, source=e.source,
                                         ttl=ttl),
        metrics=metrics, log=logging.getLogger("grasp"))
    await listener.start()

    def handle(cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "metrics":
            emit("metrics", drops=drops(metrics, "discovery"),
                 accepted=metric(metrics, "joinproxyd_discovery_messages_total",
                                 method="grasp"))

    async def stop() -> None:
        for s in extra:
            asyncio.get_running_loop().remove_reader(s.fileno())
            s.close()
        await listener.stop()

    await serve(stop, handle)


async def role_announce(args: argparse.Namespace) -> None:
    from joinproxyd.discovery.announce import ProxyAnnouncer
    from joinproxyd.metrics import Metrics

    metrics = Metrics()
    announcer = ProxyAnnouncer(interval=args.interval, metrics=metrics,
                               log=logging.getLogger("announce"))
    announcer.set_targets([join_interface(t) for t in args.target])
    announcer.set_enabled(args.enabled)

    def handle(cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "enable":
            announcer.set_enabled(cmd.get("on", True))
        elif cmd["cmd"] == "targets":
            announcer.set_targets([join_interface(t) for t in cmd["targets"]])
        elif cmd["cmd"] == "interval":
            announcer.interval = cmd["interval"]
        elif cmd["cmd"] == "metrics":
            sent = {n: metric(metrics, "joinproxyd_announcements_total", method="grasp",
                              interface=n) for n in cmd.get("interfaces", [])}
            emit("metrics", sent=sent, drops=drops(metrics, "announce"),
                 socket_open=announcer._sock is not None)

    await serve(announcer.stop, handle)


async def role_mdns_advertise(args: argparse.Namespace) -> None:
    from joinproxyd.discovery.mdns import MdnsProxyAdvertiser
    from joinproxyd.metrics import Metrics

    metrics = Metrics()
    advertiser = MdnsProxyAdvertiser(metrics=metrics, log=logging.getLogger("mdns"),
                                     hostname="proxy")
    await advertiser.start()
    advertiser.set_targets([join_interface(t) for t in args.target])
    advertiser.set_enabled(args.enabled)

    def handle(cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "enable":
            advertiser.set_enabled(cmd.get("on", True))
        elif cmd["cmd"] == "status":
            emit("status", **advertiser.status(), sent={
                n: metric(metrics, "joinproxyd_announcements_total", method="mdns",
                          interface=n) for n in cmd.get("interfaces", [])})

    await serve(advertiser.stop, handle)


async def role_mdns_browse(args: argparse.Namespace) -> None:
    from joinproxyd.discovery.mdns import MdnsRegistrarBrowser
    from joinproxyd.metrics import Metrics

    metrics = Metrics()
    browser = MdnsRegistrarBrowser(
        interface=args.interface, ifindex=socket.if_nametoindex(args.interface),
        on_registrar=lambda e, ttl: emit("registrar", key=e.key, address=e.address,
                                         port=e.port, scope_id=e.scope_id, source=e.source,
                                         ttl=ttl),
        on_gone=lambda e: emit("gone", key=e.key, source=e.source),
        metrics=metrics, log=logging.getLogger("mdns"))
    await browser.start()

    def handle(cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "status":
            emit("status", found=browser.found(),
                 accepted=metric(metrics, "joinproxyd_discovery_messages_total",
                                 method="mdns"))

    await serve(browser.stop, handle)


# -- peers ----------------------------------------------------------------------------------------
async def role_tcp_listen(args: argparse.Namespace) -> None:
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "::", args.port, reuse_address=True)

    async def stop() -> None:
        server.close()
        await server.wait_closed()

    await serve(stop, lambda cmd: None)


def grasp_socket(ifname: str) -> tuple[socket.socket, int]:
    index = socket.if_nametoindex(ifname)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
    return sock, index


async def role_send_flood(args: argparse.Namespace) -> None:
    """Send one datagram to [ff02::13%IFACE]:7017 per --registrar/--raw/--junk, then exit."""
    from ipaddress import IPv6Address

    from brski import grasp

    sock, index = grasp_socket(args.interface)
    datagrams: list[bytes] = [bytes.fromhex(h) for h in args.raw]
    datagrams += [os.urandom(n) for n in args.junk]
    for spec in args.registrar:
        addr, _, port = spec.rpartition(":")
        address = IPv6Address(addr.strip("[]"))
        locator = grasp.IPv6Locator(address, args.protocol, int(port))
        datagrams.append(grasp.registrar_flood(os.urandom, address, [locator],
                                               ttl_ms=args.ttl_ms).encode())
    for data in datagrams:
        sock.sendto(data, ("ff02::13", 7017, 0, index))
        emit("sent", size=len(data))
    sock.close()


async def role_recv_flood(args: argparse.Namespace) -> None:
    """Print every GRASP datagram heard on [ff02::13%IFACE]:7017, decoded with brski.grasp."""
    from brski import grasp
    from brski.errors import DecodeError

    index = socket.if_nametoindex(args.interface)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", 7017))
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, grasp.ALL_GRASP_NEIGHBORS.packed
                    + struct.pack("@I", index))
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        data, anc, _, addr = sock.recvmsg(65535, socket.CMSG_SPACE(4))
        hops = next((struct.unpack("@i", d[:4])[0] for lvl, typ, d in anc
                     if lvl == socket.IPPROTO_IPV6 and typ == socket.IPV6_HOPLIMIT), None)
        try:
            flood = grasp.Flood.decode(data)
        except DecodeError as exc:
            emit("junk", error=str(exc), sender=addr[0])
            return
        emit("flood", sender=addr[0], sender_port=addr[1], hop_limit=hops,
             ttl_ms=flood.ttl_ms, initiator=str(flood.initiator),
             objectives=[e.objective.to_cbor() for e in flood.entries],
             locators=[[str(loc.address), loc.protocol, loc.port]
                       for loc in flood.locators_for("AN_Proxy")])

    loop.add_reader(sock.fileno(), readable)

    async def stop() -> None:
        loop.remove_reader(sock.fileno())
        sock.close()

    await serve(stop, lambda cmd: None)


async def role_mdns_register(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion, ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    index = socket.if_nametoindex(args.interface)
    aiozc = AsyncZeroconf(interfaces=[index], ip_version=IPVersion.V6Only)
    info = ServiceInfo(args.service, f"{args.name}.{args.service}", port=args.port,
                       server=f"{args.name}.local.", parsed_addresses=args.address)
    await (await aiozc.async_register_service(info))
    emit("registered", name=info.name)

    async def handle(cmd: dict[str, Any]) -> None:
        if cmd["cmd"] == "unregister":
            await (await aiozc.async_unregister_service(info))
            emit("unregistered", name=info.name)

    await serve(aiozc.async_close, handle)


async def role_mdns_resolve(args: argparse.Namespace) -> None:
    """Browse a service type; print each instance resolved (name, scoped addresses, port)."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    index = socket.if_nametoindex(args.interface)
    aiozc = AsyncZeroconf(interfaces=[index], ip_version=IPVersion.V6Only)
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(args.service, name)
        if await info.async_request(aiozc.zeroconf, 3000):
            emit("resolved", name=name, port=info.port, server=info.server,
                 addresses=info.parsed_scoped_addresses(IPVersion.V6Only),
                 text=(info.text or b"").hex())

    def on_event(zeroconf: Any, service_type: str, name: str,
                 state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            emit("removed", name=name)
        else:
            task = asyncio.create_task(resolve(name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(aiozc.zeroconf, [args.service], handlers=[on_event])

    async def stop() -> None:
        await browser.async_cancel()
        for task in tasks:
            task.cancel()
        await aiozc.async_close()

    await serve(stop, lambda cmd: None)


ROLES = {
    "health": role_health, "grasp-listen": role_grasp_listen, "announce": role_announce,
    "mdns-advertise": role_mdns_advertise, "mdns-browse": role_mdns_browse,
    "tcp-listen": role_tcp_listen, "send-flood": role_send_flood,
    "recv-flood": role_recv_flood, "mdns-register": role_mdns_register,
    "mdns-resolve": role_mdns_resolve,
}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="test_discovery_driver")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--static", action="append", default=[])
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--interface", default="eth0")
    p.add_argument("--also-join", action="append", default=[])
    p.add_argument("--target", action="append", default=[])
    p.add_argument("--enabled", action="store_true")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--registrar", action="append", default=[])
    p.add_argument("--protocol", type=int, default=6)
    p.add_argument("--ttl-ms", type=int, default=180_000)
    p.add_argument("--raw", action="append", default=[])
    p.add_argument("--junk", action="append", type=int, default=[])
    p.add_argument("--service", default="_brski-registrar._tcp.local.")
    p.add_argument("--name", default="registrar")
    p.add_argument("--address", action="append", default=[])
    return p.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zeroconf").setLevel(logging.INFO)
    asyncio.run(ROLES[args.role](args))


if __name__ == "__main__":
    main(sys.argv[1:])
