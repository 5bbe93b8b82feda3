"""JPY header seal+open per second, against the bare AEAD doing the same work.

What the numbers mean: one op = seal one pledge endpoint and open the header again, i.e. the
per-datagram cost of a stateless relay (seal on the way to the registrar, open on the way back).
The baseline is cryptography's AEAD alone on the same 15-byte plaintext (encrypt + decrypt),
measured in the same run, so the ratio is the price of our packing, checks, key lookup and
replay window, independent of the machine.

    .venv/bin/python bench/jpy_seal_open.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from ipaddress import IPv6Address

from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESSIV

from brski.jpy import FlowHeaderSealer, JpyMessage, PledgeEndpoint, SequencedHeaderSealer

BATCH = 1000
PLEDGE = PledgeEndpoint(IPv6Address("fe80::1234:5678"), 45965, 3)


def rates(ops: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Ops per second for each case. The cases take turns, one batch each, until every case
    has run ``seconds``: on a shared machine a burst of load then hits all of them alike, so
    the ratios hold even when the absolute figures wobble."""
    spent = dict.fromkeys(ops, 0.0)
    done = dict.fromkeys(ops, 0)
    for op in ops.values():  # warm-up
        for _ in range(BATCH):
            op()
    while min(spent.values()) < seconds:
        for name, op in ops.items():
            start = time.perf_counter()
            for _ in range(BATCH):
                op()
            spent[name] += time.perf_counter() - start
            done[name] += BATCH
    return {name: done[name] / spent[name] for name in ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent on each case")
    parser.add_argument("--quick", action="store_true", help="0.1 s a case (smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 0.1

    ccm_key, siv_key = os.urandom(16), os.urandom(32)
    sequenced = SequencedHeaderSealer(ccm_key)
    flow = FlowHeaderSealer(siv_key)

    # The exact plaintext the sealers encrypt, recovered from a header with the bare AEAD.
    header = SequencedHeaderSealer(ccm_key).seal(PLEDGE)
    bare_ccm = AESCCM(ccm_key, tag_length=8)
    plaintext = bare_ccm.decrypt(header[:7], header[7:], None)
    bare_siv = AESSIV(siv_key)
    nonce = header[:7]  # reusing one nonce is harmless here: nothing in a benchmark is secret

    def ccm_pair() -> object:
        return bare_ccm.decrypt(nonce, bare_ccm.encrypt(nonce, plaintext, None), None)

    def siv_pair() -> object:
        return bare_siv.decrypt(bare_siv.encrypt(plaintext, [b"\x00"]), [b"\x00"])

    def sequenced_pair() -> object:
        return sequenced.open(sequenced.seal(PLEDGE))

    def flow_pair() -> object:
        return flow.open(flow.seal(PLEDGE))

    message = JpyMessage(flow.seal(PLEDGE), bytes(427))

    def jpy_pair() -> object:
        return JpyMessage.decode(message.encode())

    results = rates(
        {
            "bare AESCCM-8 encrypt+decrypt": ccm_pair,
            "SequencedHeaderSealer seal+open": sequenced_pair,
            "bare AES-SIV encrypt+decrypt": siv_pair,
            "FlowHeaderSealer seal+open": flow_pair,
            "JpyMessage encode+decode (427 B)": jpy_pair,
        },
        args.seconds,
    )
    for name, ops in results.items():
        print(f"{name:36s} {ops:12,.0f} ops/s")
    ratios = [
        ("sequenced / bare AESCCM", "SequencedHeaderSealer seal+open", "bare AESCCM-8"),
        ("flow / bare AESCCM", "FlowHeaderSealer seal+open", "bare AESCCM-8"),
        ("flow / bare AES-SIV", "FlowHeaderSealer seal+open", "bare AES-SIV"),
    ]
    for label, ours, bare in ratios:
        print(f"{'ratio ' + label:36s} {results[ours] / results[bare + ' encrypt+decrypt']:12.2f}")
    from _report import record  # make bench (bench/run_all.py), which runs this repeatedly

    # issue 18 item 3: JPY seal+open x0.6 of the bare AEAD, each sealer against its own
    baselines = {"SequencedHeaderSealer seal+open": "bare AESCCM-8 encrypt+decrypt",
                 "FlowHeaderSealer seal+open": "bare AES-SIV encrypt+decrypt"}
    for name in sorted(results, key=lambda n: n in baselines):  # baselines first
        record(name, results[name], "ops/s", baseline=baselines.get(name),
               target=0.6 if name in baselines else None)


if __name__ == "__main__":
    main()
