"""The stateless cojp relay (RFC 9031): datagrams/s through joinproxyd against a bare
asyncio UDP relay.

    sudo .venv/bin/python bench/cojp_relay.py [--seconds 2] [--rounds 3] [--quick]

A namespace lab with one pledge and one JRC host. The JRC host runs two stand-in JRCs, one on
5683 for joinproxyd and one on 5690 for the bare relay, the same code: each answers a CoAP
request with a NON 2.04 carrying the request's token and payload (brski.coap_datagram, so both
do the same work and accept extended tokens). The proxy runs the real joinproxyd (cojp mode on
join0, port 5683, join rate unlimited for the run) and, beside it, the baseline: a bare asyncio
UDP relay on [fe80::1%join0]:9443 that forwards each pledge datagram unchanged from one socket
to the JRC on 5690 and each answer back to the pledge (one pledge, so it needs no table: the
least any UDP relay can do; it strips no option, seals no token). The pledge runs the load: 32
CoJP-shaped join requests in flight (NON POST, Uri-Host "6tisch.arpa", an OSCORE option,
Proxy-Scheme "coap", a 1-byte token, 32 bytes of payload: 64 bytes), each answer sending the
next, for ``--seconds``; a lost one is replaced after 0.2 s. Each round measures both paths,
order rotated; the ratio joinproxyd/bare is paired within a round, and the median (min-max)
is printed. All of sender, relay and echo
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
JOIN_PORT = 5683
BARE_PORT = 9443
JRC_PORT = 5683
ECHO_PORT = 5690
REGISTRAR = "fd4a:5044::100"

ECHO = """
import asyncio, sys
from brski.coap_datagram import CoapDatagram, MessageType
class Echo(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a):
        r = CoapDatagram.decode(d)
        if r.code == 0:  # a CoAP ping (joinproxyd's JRC health probe): Reset, RFC 7252 4.3
            self.t.sendto(CoapDatagram(MessageType.RST, 0, r.message_id).encode(), a)
            return
        self.t.sendto(CoapDatagram(MessageType.NON, 0x44, r.message_id, r.token, (),
                                   r.payload).encode(), a)
async def main():
    loop = asyncio.get_running_loop()
    for port in sys.argv[1:]:
        await loop.create_datagram_endpoint(Echo, local_addr=("::", int(port)))
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
# NON POST, token 1 byte, Uri-Host, OSCORE, Proxy-Scheme, 32 bytes of payload: 64 bytes
options = bytes([0x3B]) + b"6tisch.arpa" + bytes([0x63, 0x09, 0x00, 0x08]) + \
    bytes([0xD4, 0x11]) + b"coap" + b"\\xff"
def send():
    global seq
    seq += 1
    s.send(bytes([0x51, 0x02]) + (seq & 0xFFFF).to_bytes(2, "big") + b"\\x01" + options
           + seq.to_bytes(8, "big") * 4)
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


def run(seconds: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cojp-bench-") as tmp, \
            Lab(Topology(pledges=1), log_dir=Path(tmp) / "logs") as lab:
        registrar = lab.registrars[0]
        registrar.spawn(["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"],
                        name="tcp-health")
        echo = registrar.spawn([PY, "-c", ECHO, str(JRC_PORT), str(ECHO_PORT)], name="echo")
        wait_for(lambda: "ready" in echo.log(), 10, "the stand-in JRCs")
        config = base_config(
            Path(tmp) / "proxy", daemon={"log_level": "info",
                                         "control_socket": str(Path(tmp) / "proxy/ctl.sock"),
                                         "drain_seconds": 1},
            join=[{"interfaces": ["join*"], "modes": ["cojp"], "port": JOIN_PORT}],
            registrars={"discovery": ["static"],
                        "static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                    "cojp_port": JRC_PORT}],
                        "health_interval": 1, "health_timeout": 1},
            guard={"enabled": False}, cojp={"rate": 1e6, "burst": 1000})
        daemon = ProxyDaemon(lab, Path(tmp) / "proxy", config).start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
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
        print(f"\ncojp_relay: {rounds} round(s) of {seconds:g} s, 64-byte join requests, "
              "32 in flight, round trips through the relay")
        for name, values in results.items():
            print(f"{name:<12} {statistics.median(values):10.0f} datagrams/s "
                  f"({min(values):.0f}-{max(values):.0f})")
        print(f"ratio joinproxyd/bare {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) (target 0.8)")
        from _report import record  # make bench (bench/run_all.py): the same figures

        record("bare", results["bare"], "round trips/s")
        record("joinproxyd", results["joinproxyd"], "round trips/s", baseline="bare",
               ratios=ratios, target=0.8)
        drops = {reason: daemon.drops("cojp", reason)
                 for reason in ("cojp-forged", "cojp-replayed", "cojp-stale", "rate-limit")}
        print(f"joinproxyd drops during the run: {drops}")
        daemon.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.5, 1
    run(args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
