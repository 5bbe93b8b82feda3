"""Voucher sign+verify throughput: CMS (JSON) and COSE_Sign1 (CBOR), against bare ECDSA.

    .venv/bin/python bench/voucher_sign_verify.py [--seconds S]

One operation = the MASA signs a voucher and the pledge verifies it, as deployed: the signer
certificate travels in the message (CMS certificates / COSE x5bag) and is chained to the MASA
CA at a fixed time, then the payload is decoded and validated. The baseline, measured in the
same run, is one P-256 ECDSA sign plus one verify with cryptography over the same payload, so
the ratio shows what the envelope, the encodings and the chain check cost on this machine.
A last line measures pycose's own ES256 (pure-Python ``ecdsa``), which ``brski.cose`` avoids.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose import algorithms, headers
from pycose.keys import EC2Key
from pycose.keys.curves import P256
from pycose.messages import Sign1Message

from brski.pki import create_test_pki
from brski.signed_voucher import (
    sign_voucher_cms,
    sign_voucher_cose,
    verify_voucher_cms,
    verify_voucher_cose,
)
from brski.voucher import Assertion, Voucher, encode_cbor

NOW = datetime(2026, 6, 1, tzinfo=UTC)


SLICE = 0.05  # seconds each case runs before the next takes its turn


def rates(ops: dict[str, Callable[[], object]], seconds: float,
          clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Ops per second of each case, one figure per round. The cases take turns in slices of
    ``SLICE`` within each round, so a burst of load from other work on a shared machine hits
    them alike and the ratio of a round holds even when the absolute figures wobble.
    ``clock``: wall time, or this thread's CPU time (ops per CPU-second: time spent waiting
    for a CPU that other work holds is not counted, which steadies the ratio on a busy
    machine)."""
    for op in ops.values():  # warm-up (fills the certificate and chain tables as in service)
        for _ in range(3):
            op()
    rounds = max(3, round(seconds / SLICE))
    out: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            count, start = 0, clock()
            deadline = start + SLICE
            while True:
                op()
                count += 1
                now = clock()
                if now >= deadline:
                    break
            out[name].append(count / (now - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per case (3.0)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the thread's CPU time (steadier on a busy machine)")
    args = parser.parse_args()
    seconds = args.seconds
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    pki = create_test_pki(NOW - timedelta(days=1))
    signer, anchors = pki.masa_signer, [pki.masa_ca.cert]
    voucher = Voucher(
        serial_number="BENCH-0001",
        assertion=Assertion.LOGGED,
        created_on=NOW,
        nonce=b"0123456789abcdef",
        pinned_domain_cert=pki.domain_ca.cert.public_bytes(serialization.Encoding.DER),
    )
    payload = encode_cbor(voucher)
    public = signer.key.public_key()

    def bare_ecdsa() -> None:
        public.verify(signer.key.sign(payload, ec.ECDSA(hashes.SHA256())), payload,
                      ec.ECDSA(hashes.SHA256()))  # fmt: skip

    def cms_voucher() -> None:
        data = sign_voucher_cms(voucher, signer.key, [signer.cert], NOW)
        verify_voucher_cms(data, anchors, NOW, serial_number="BENCH-0001")

    def cose_voucher() -> None:
        data = sign_voucher_cose(voucher, signer.key, x5bag=[signer.cert])
        verify_voucher_cose(data, anchors, NOW, serial_number="BENCH-0001")

    numbers = public.public_numbers()
    d = signer.key.private_numbers().private_value.to_bytes(32, "big")
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")

    def pycose_es256() -> None:
        msg = Sign1Message(phdr={headers.Algorithm: algorithms.Es256}, payload=payload)
        msg.key = EC2Key(crv=P256, d=d, x=x, y=y)
        received = Sign1Message.decode(msg.encode())
        received.key = EC2Key(crv=P256, x=x, y=y)
        assert received.verify_signature()

    results = rates(
        {
            "bare ECDSA P-256 sign+verify (baseline)": bare_ecdsa,
            "CMS voucher sign+verify (JSON, chain)": cms_voucher,
            "COSE voucher sign+verify (CBOR, x5bag chain)": cose_voucher,
            "pycose-native ES256 sign+verify (reference)": pycose_es256,
        },
        seconds,
        clock,
    )
    baseline = next(iter(results.values()))
    unit = "ops/CPU-s" if args.clock == "cpu" else "ops/s"
    print(f"{'operation':48} {unit:>9}  {'x baseline (min-max of rounds)':>30}")
    for label, per_round in results.items():
        ratios = sorted(r / b for r, b in zip(per_round, baseline, strict=True))
        print(f"{label:48} {statistics.median(per_round):9.0f}  "
              f"{statistics.median(ratios):10.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})")
    from _report import record  # make bench (bench/run_all.py): the same figures, per slice

    base_label, *labels = results
    record(base_label, results[base_label], "ops/s")
    for label in labels:  # issue 18's targets: CMS x0.3, COSE x0.5 of bare ECDSA
        record(label, results[label], "ops/s", baseline=base_label,
               target={"CMS": 0.3, "COSE": 0.5}.get(label.split()[0]))


if __name__ == "__main__":
    main()
