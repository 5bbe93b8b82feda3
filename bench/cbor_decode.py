"""Untrusted-CBOR decoding: brski.cbor_strict against cbor2's C decoder, in the same run.

The library decodes network CBOR with its own strict decoder (brski/cbor_strict.py) because
cbor2 5.9's C decoder leaks memory on text that is not UTF-8 and accepts duplicate keys. This
measures what that costs: decodes per second of three real inputs (a GRASP flood, a JPY message,
a COSE-signed voucher-request) with both, and the ratio C/strict. Also the RSS growth of each
after 100,000 decodes of the 3-byte datagram ``81 61 ff``.

    .venv/bin/python bench/cbor_decode.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import time
from collections.abc import Callable
from ipaddress import IPv6Address

import cbor2

from brski.cbor_strict import loads_exact
from brski.errors import DecodeError
from brski.grasp import proxy_flood

BATCH = 200
LEAK_INPUT = bytes.fromhex("8161ff")


def rates(ops: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Decodes per second for each case; the cases take turns one batch each, so a burst of
    load on this shared machine hits all of them alike and the ratios hold."""
    spent = dict.fromkeys(ops, 0.0)
    done = dict.fromkeys(ops, 0)
    while min(spent.values()) < seconds:
        for name, op in ops.items():
            start = time.perf_counter()
            for _ in range(BATCH):
                op()
            spent[name] += time.perf_counter() - start
            done[name] += BATCH
    return {name: done[name] / spent[name] for name in ops}


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def growth(decode: Callable[[bytes], object], count: int = 100_000) -> int:
    gc.collect()
    before = rss()
    for _ in range(count):
        with contextlib.suppress(DecodeError, cbor2.CBORDecodeError):
            decode(LEAK_INPUT)
    gc.collect()
    return rss() - before


def c_decode(data: bytes) -> object:
    return cbor2.CBORDecoder(io.BytesIO(data)).decode()


def samples() -> dict[str, bytes]:
    flood = proxy_flood(lambda n: bytes(n), IPv6Address("fe80::1"), 4443).encode()
    jpy = cbor2.dumps([bytes(range(16)), b"\x16\xfe\xfd" + bytes(range(200))])
    voucher_request = cbor2.dumps(cbor2.CBORTag(18, [
        cbor2.dumps({1: -7}), {32: bytes(600)},
        cbor2.dumps({2501: {1: 2, 2: "2024-01-01T00:00:00Z", 5: bytes(16), 7: bytes(16),
                            13: "ABC-1234567", 10: bytes(700)}}),
        bytes(64)]))
    return {"GRASP flood": flood, "JPY message": jpy, "COSE voucher-request": voucher_request}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent on each case")
    parser.add_argument("--quick", action="store_true",
                        help="0.1 s a case, 10,000 datagrams for RSS (smoke test)")
    args = parser.parse_args()
    count = 100_000
    if args.quick:
        args.seconds, count = 0.1, 10_000
    from _report import record  # make bench (bench/run_all.py), which runs this repeatedly

    print(f"{'input':24} {'bytes':>6} {'cbor2 C/s':>12} {'strict/s':>12} {'ratio C/strict':>15}")
    for name, data in samples().items():
        assert cbor2.loads(data) == loads_exact(data, name)
        got = rates({"c": lambda d=data: c_decode(d),
                     "strict": lambda d=data, n=name: loads_exact(d, n)}, args.seconds)
        print(f"{name:24} {len(data):6} {got['c']:12.0f} {got['strict']:12.0f} "
              f"{got['c'] / got['strict']:15.2f}")
        record(f"{name}: cbor2 C", got["c"], "decodes/s")
        record(f"{name}: strict", got["strict"], "decodes/s", baseline=f"{name}: cbor2 C")
    c_growth = growth(c_decode, count)
    strict_growth = growth(lambda d: loads_exact(d, "x"), count)
    print(f"RSS growth after {count} x 81 61 ff: cbor2 C {c_growth / 1e6:.1f} MB, "
          f"strict {strict_growth / 1e6:.1f} MB")
    record(f"RSS growth, {count} x 81 61 ff: cbor2 C", c_growth / 1e6, "MB", better="lower")
    record(f"RSS growth, {count} x 81 61 ff: strict", strict_growth / 1e6, "MB", better="lower")


if __name__ == "__main__":
    main()
