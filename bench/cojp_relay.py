"""The stateless cojp relay (RFC 9031): datagrams/s through joinproxyd against a bare
asyncio UDP relay.

    sudo .venv/bin/python bench/cojp_relay.py [--seconds 2] [--rounds 3] [--quick]

A namespace lab with one pledge and one JRC host. The JRC host runs two stand-in JRCs, one on
5683 for joinproxyd and one on 5690 for the bare relay, the same code: each answers a CoAP
request with a NON 2.04 carrying the request's token and payload (brski.coap_datagram, so both
do the same work and accept extended tokens). The proxy runs the real joinproxyd (cojp mode on
join0, port 5683, join rate unlimited for the run) and, beside it, the baseline: a bare asyncio
UDP relay on [fe80::1%join0]:9443 (bench/_udpflow.py single-relay) that forwards each pledge
datagram unchanged from one socket to the JRC on 5690 and each answer back to the pledge (one
pledge, so it needs no table: the least any UDP relay can do; it strips no option, seals no
token). The pledge runs the load: 32 CoJP-shaped join requests in flight (NON POST, Uri-Host
"6tisch.arpa", an OSCORE option, Proxy-Scheme "coap", a 1-byte token, 32 bytes of payload: 64
bytes), each answer sending the next, for ``--seconds``; a lost one is replaced after 0.2 s.
Each round measures both paths, order rotated; the ratio joinproxyd/bare is paired within a
round, and the median (min-max) is printed. All of sender, relay and echo share this
machine's CPUs, so the figures are CPU-bound for everyone. The lab and the rounds are
bench/_stateless_relay.py's, shared with bench/jpy_relay.py; the join requests are
bench/_udpflow.py pingpong's "cojp" shape.
"""

from __future__ import annotations

import sys

from _stateless_relay import TARGET, StatelessBench, options

JOIN_PORT = 5683
JRC_PORT = 5683

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


def run(seconds: float, rounds: int) -> None:
    bench = StatelessBench("cojp", JOIN_PORT, JRC_PORT, ECHO, "the stand-in JRCs", "cojp",
                           ("cojp-forged", "cojp-replayed", "cojp-stale", "rate-limit"),
                           {"rate": 1e6, "burst": 1000})

    def figures(results: dict[str, list[float]], ratios: list[float]) -> None:
        from _report import record  # make bench (bench/run_all.py): the same figures

        record("bare", results["bare"], "round trips/s")
        record("joinproxyd", results["joinproxyd"], "round trips/s", baseline="bare",
               ratios=ratios, target=TARGET)

    bench.run(seconds, rounds,
              f"\ncojp_relay: {rounds} round(s) of {seconds:g} s, 64-byte join requests, "
              "32 in flight, round trips through the relay", figures)


def main() -> int:
    args = options(__doc__)
    run(args.seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
