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
it, the baseline: a bare asyncio UDP relay on [fe80::1%join0]:9443 (bench/_udpflow.py
single-relay) that forwards each pledge datagram from one socket to the echo on 5690 and each
reply back to the pledge (one pledge, so it needs no table: the least any UDP relay can do).
The pledge runs the load: 32 datagrams of 64 bytes in flight, each reply sending the next, for
``--seconds``; a lost one is replaced after 0.2 s. Each round measures both paths, order
rotated; the ratio joinproxyd/bare is paired within a round, and the median (min-max) is
printed. All of sender, relay and echo share this machine's CPUs, so the figures are
CPU-bound for everyone. The lab and the rounds are bench/_stateless_relay.py's, shared with
bench/cojp_relay.py.
"""

from __future__ import annotations

import sys

from _stateless_relay import TARGET, StatelessBench, options

from lab.proxyd import ProxyDaemon

JOIN_PORT = 8443
JPY_PORT = 5684

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


def run(seconds: float, rounds: int, datapath: str = "user") -> None:
    def runs_there(daemon: ProxyDaemon) -> None:
        runs = daemon.ctl()["relays"]["jpy"]["datapath"]
        if runs != datapath:
            raise SystemExit(f"the jpy relay runs in {runs}, not {datapath}: "
                             f"{daemon.ctl()['relays']['jpy']['datapath_reason']}")

    bench = StatelessBench("jpy", JOIN_PORT, JPY_PORT, ECHO, "the echo servers", "bytes",
                           ("jpy-forged", "jpy-replayed", "jpy-stale", "too-big"),
                           {"datapath": datapath}, runs_there)
    def figures(results: dict[str, list[float]], ratios: list[float]) -> None:
        from _report import record  # make bench (bench/run_all.py): the same figures

        record("bare", results["bare"], "round trips/s")
        record(f"joinproxyd ({datapath})", results["joinproxyd"], "round trips/s", baseline="bare",
               ratios=ratios, target=TARGET)

    bench.run(seconds, rounds,
              f"\njpy_relay: {rounds} round(s) of {seconds:g} s, 64-byte datagrams, "
              f"32 in flight, round trips through the relay ([jpy] datapath = {datapath})",
              figures)


def main() -> int:
    args = options(__doc__, extra=lambda p: p.add_argument(
        "--datapath", choices=("user", "kernel"), default="user"))
    run(args.seconds, args.rounds, args.datapath)
    return 0


if __name__ == "__main__":
    sys.exit(main())
