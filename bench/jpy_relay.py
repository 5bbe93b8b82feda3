"""The stateless jpy relay: datagrams/s through joinproxyd against a bare asyncio UDP relay.

    sudo .venv/bin/python bench/jpy_relay.py [--seconds 2] [--rounds 3] [--quick]
                                             [--datapath user|kernel]

--datapath is the daemon's [jpy] datapath: user (default) measures the asyncio relay; kernel
its tc programs (round trips from one Python pledge: sender-bound, see bench/jpy_kernel_pps.py
for the programs' own rate).

A namespace lab with one pledge and one registrar host. The registrar runs two plain UDP echo
servers (each sends back the datagram it got, unchanged: for the jpy path that is
``[header, payload]``, a valid JPY reply, so both registrars do the same work). The proxy runs
the real joinproxyd (jpy mode on join0, port 8443, the registrar's JPY port 5684) and, beside
it, the baseline: a bare asyncio UDP relay on [fe80::1%join0]:9443 that forwards each pledge
datagram from one socket to the echo on 5690 and each reply back to the pledge (one pledge, so
it needs no table: the least any UDP relay can do). The pledge runs the load: 32 datagrams of
64 bytes in flight, each reply sending the next, for ``--seconds``; a lost one is replaced
after 0.2 s. Each round measures both paths, order rotated; the ratio joinproxyd/bare is
paired within a round, and the median (min-max) is printed. All of sender, relay and echo
share this machine's CPUs, so the figures are CPU-bound for everyone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config

PY = sys.executable
JOIN_PORT = 8443
BARE_PORT = 9443
JPY_PORT = 5684
ECHO_PORT = 5690
REGISTRAR = "fd4a:5044::100"

# The first port answers the daemon's DTLS probe (a JPY message with a 16-byte header, where
# the relay's headers are 32) with a HelloVerifyRequest under the same header.
ECHO = """
import asyncio, sys
import cbor2
body = bytes([0xFE, 0xFF, 1, 88])
hs = bytes([3]) + len(body).to_bytes(3, "big") + bytes(5) + len(body).to_bytes(3, "big") + body
HVR = bytes([22, 0xFE, 0xFD]) + bytes(8) + len(hs).to_bytes(2, "big") + hs
class Echo(asyncio.DatagramProtocol):
    def __init__(self, jpy): self.jpy = jpy
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a):
        if self.jpy and d[1:2] == bytes([0x50]):
            d = cbor2.dumps([cbor2.loads(d)[0], HVR])
        self.t.sendto(d, a)
async def main():
    loop = asyncio.get_running_loop()
    for i, port in enumerate(sys.argv[1:]):
        await loop.create_datagram_endpoint(lambda i=i: Echo(i == 0),
                                            local_addr=("::", int(port)))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

BARE = """
import asyncio, socket, sys
registrar = (sys.argv[1], int(sys.argv[2]))
class Up(asyncio.DatagramProtocol):
    def __init__(self): self.pledge = None
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a):
        self.pledge = a
        down.t.sendto(d, registrar)
class Down(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a):
        if up.pledge is not None: up.t.sendto(d, up.pledge)
async def main():
    global up, down
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("fe80::1", int(sys.argv[3]), 0, socket.if_nametoindex("join0")))
    _, up = await loop.create_datagram_endpoint(Up, sock=sock)
    _, down = await loop.create_datagram_endpoint(
        Down, local_addr=("::", 0), family=socket.AF_INET6)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

LOAD = """
import json, socket, sys, time, select
port, seconds, window = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.connect(("fe80::1", port, 0, socket.if_nametoindex("eth0")))
s.setblocking(False)
seq = 0
def send():
    global seq
    seq += 1
    s.send(seq.to_bytes(8, "big") * 8)
for _ in range(window):
    send()
got, start, last = 0, time.monotonic(), time.monotonic()
while True:
    now = time.monotonic()
    if now - start >= seconds:
        break
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
"""


def measure(lab: Lab, port: int, seconds: float, window: int = 32) -> float:
    done = lab.pledges[0].run([PY, "-c", LOAD, str(port), str(seconds), str(window)],
                              timeout=seconds + 30)
    result = json.loads(done.stdout)
    return result["datagrams"] / result["seconds"]


def run(seconds: float, rounds: int, datapath: str = "user") -> None:
    with tempfile.TemporaryDirectory(prefix="jpy-bench-") as tmp, \
            Lab(Topology(pledges=1), log_dir=Path(tmp) / "logs") as lab:
        registrar = lab.registrars[0]
        registrar.spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"],
                        name="tcp-health")
        echo = registrar.spawn([PY, "-c", ECHO, str(JPY_PORT), str(ECHO_PORT)], name="echo")
        wait_for(lambda: "ready" in echo.log(), 10, "the echo servers")
        config = base_config(
            Path(tmp) / "proxy", daemon={"log_level": "info",
                                         "control_socket": str(Path(tmp) / "proxy/ctl.sock"),
                                         "drain_seconds": 1},
            join=[{"interfaces": ["join*"], "modes": ["jpy"], "port": JOIN_PORT}],
            registrars={"discovery": ["static"],
                        "static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                    "jpy_port": JPY_PORT}],
                        "health_interval": 1, "health_timeout": 1},
            guard={"enabled": False}, jpy={"datapath": datapath})
        daemon = ProxyDaemon(lab, Path(tmp) / "proxy", config).start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        runs = daemon.ctl()["relays"]["jpy"]["datapath"]
        if runs != datapath:
            raise SystemExit(f"the jpy relay runs in {runs}, not {datapath}: "
                             f"{daemon.ctl()['relays']['jpy']['datapath_reason']}")
        bare = lab.proxy.spawn([PY, "-c", BARE, REGISTRAR, str(ECHO_PORT), str(BARE_PORT)],
                               name="bare-relay")
        wait_for(lambda: "ready" in bare.log() or not bare.alive(), 10, "the bare relay")
        if not bare.alive():
            raise SystemExit(f"bare relay failed: {bare.log()}")
        paths = {"joinproxyd": JOIN_PORT, "bare": BARE_PORT}
        results: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                results[name].append(measure(lab, paths[name], seconds))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        ratios = [j / b for j, b in zip(results["joinproxyd"], results["bare"], strict=True)]
        print(f"\njpy_relay: {rounds} round(s) of {seconds:g} s, 64-byte datagrams, "
              f"32 in flight, round trips through the relay ([jpy] datapath = {datapath})")
        for name, values in results.items():
            print(f"{name:<12} {statistics.median(values):10.0f} datagrams/s "
                  f"({min(values):.0f}-{max(values):.0f})")
        print(f"ratio joinproxyd/bare {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) (target 0.8)")
        from _report import record  # make bench (bench/run_all.py): the same figures

        record("bare", results["bare"], "round trips/s")
        record(f"joinproxyd ({datapath})", results["joinproxyd"], "round trips/s", baseline="bare",
               ratios=ratios, target=0.8)
        drops = {reason: daemon.drops("jpy", reason)
                 for reason in ("jpy-forged", "jpy-replayed", "jpy-stale", "too-big")}
        print(f"joinproxyd drops during the run: {drops}")
        daemon.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    p.add_argument("--datapath", choices=("user", "kernel"), default="user")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    run(args.seconds, args.rounds, args.datapath)
    return 0


if __name__ == "__main__":
    sys.exit(main())
