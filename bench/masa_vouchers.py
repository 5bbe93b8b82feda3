"""MASA vouchers per second (CMS and COSE), with where the time goes, against the bare
primitives a voucher needs.

    .venv/bin/python bench/masa_vouchers.py [--pledges N] [--seconds S] [--concurrency C]

In process: the real ``registrar.masa.Masa`` with its SQLite store in a temporary directory,
trust on first use, answering registrar voucher-requests (RVR) as the registrar sends them:
CMS (an RVR signed by the registrar, carrying the pledge's CMS PVR) and COSE (the cBRSKI
form, x5bag with both chains). Each of ``--pledges`` pledges has an IDevID of its own and asks
once per pass, so the IDevID chain check is a fresh one until the pass repeats.

What a voucher needs, counted as the baseline and measured in the same run: the RVR signature
verified (1 ECDSA verify), the PVR signature verified (1), the IDevID chained to the
manufacturer CA (1: the CA's signature on the IDevID), and the voucher signed (1 ECDSA sign),
all P-256. The registrar's own chain to the domain CA is the same for every request from one
registrar and is not counted. A voucher also needs its record on disk before it leaves (RFC 8995
§5.8: the MASA answers audit-log requests from what it recorded; a voucher it forgot after a
power cut could not be audited), so the full baseline adds one durable write: a row of the
voucher's size committed alone, in a file beside the MASA's, with the store's journal settings
(WAL, ``synchronous=FULL``). The ratio against the signatures alone is printed too. The cases
take turns in short slices so load from other work on the machine hits them alike; the ratio is
the median of the slices' ratios.

A reference, as HAProxy is for the circuit relay: the same CMS voucher work done in C by the
system's OpenSSL (``CMS_verify`` for the RVR and for the PVR with its chain, ``CMS_sign``;
bench/_openssl_cms.py), plus the same durable write. ``--reference none`` leaves it out.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _openssl_cms import OpenSslMasa, cost, save_requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from brski import certs, cose
from brski.pki import create_test_pki, issue_idevid
from brski.signed_voucher import sign_voucher_cms, sign_voucher_cose
from brski.voucher import Assertion, VoucherRequest, decode_cbor
from lab.masa_inprocess import in_process_masa
from registrar.constrained_voucher import sign_rvr_cose
from registrar.masa import Masa
from registrar.store_commit import GroupCommitter
from registrar.voucher_request import PledgeRequest, build_rvr

NOW = datetime(2026, 6, 1, tzinfo=UTC)
SLICE = 0.1


def requests(pledges: int) -> tuple[object, list[bytes], list[bytes]]:
    pki = create_test_pki(NOW - timedelta(days=1))
    cms_rvrs, cose_rvrs = [], []
    registrar_der = pki.registrar.cert.public_bytes(Encoding.DER)
    for i in range(pledges):
        serial = f"BENCH-{i:05d}"
        idevid = issue_idevid(pki.manufacturer_ca, serial, "masa.example", NOW - timedelta(1))
        nonce = i.to_bytes(4, "big") * 4
        pvr = VoucherRequest(serial_number=serial, assertion=Assertion.PROXIMITY, created_on=NOW,
                             nonce=nonce, proximity_registrar_cert=registrar_der)
        signed = sign_voucher_cms(pvr, idevid.key, [idevid.cert], NOW)
        rvr = build_rvr(PledgeRequest(pvr, signed, idevid.cert, serial), NOW)
        cms_rvrs.append(sign_voucher_cms(rvr, pki.registrar.key,
                                         [pki.registrar.cert, pki.domain_ca.cert], NOW))
        cpvr_req = VoucherRequest(serial_number=serial, assertion=Assertion.PROXIMITY,
                                  created_on=NOW, nonce=nonce,
                                  proximity_registrar_pubk=certs.spki_der(pki.registrar.cert))
        cpvr = sign_voucher_cose(cpvr_req, idevid.key)
        request = PledgeRequest(decode_cbor(cose.decode(cpvr).payload, VoucherRequest), cpvr,
                                idevid.cert, serial)
        cose_rvrs.append(sign_rvr_cose(request, pki.registrar.key,
                                       [pki.registrar.cert, pki.domain_ca.cert], [idevid.cert],
                                       NOW))
    return pki, cms_rvrs, cose_rvrs


def masa(pki, root: Path, committer: GroupCommitter | None = None) -> Masa:
    return in_process_masa(pki, root, committer=committer)


def durable_write(path: Path, size: int) -> Callable[[], None]:
    """One row of ``size`` bytes committed on its own, as durably as the store commits."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, serial TEXT, body BLOB)")
    body = bytes(size)
    count = 0

    def write() -> None:
        nonlocal count
        count += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO records (serial, body) VALUES (?, ?)", (f"BENCH-{count}", body))
        db.execute("COMMIT")

    return write


def cycle(items: list[bytes]) -> Callable[[], bytes]:
    index = 0

    def take() -> bytes:
        nonlocal index
        item = items[index % len(items)]
        index += 1
        return item

    return take


REFERENCE = "CMS in C (OpenSSL)"
NOW_TEXT = NOW.strftime("%Y-%m-%dT%H:%M:%SZ")


def reference_material(pki) -> tuple[list[bytes], list[bytes], bytes, bytes]:
    """The C reference's trust anchors, signer chain, signer key and pinned domain CA."""
    def der(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(Encoding.DER)

    pem = pki.masa_signer.key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    return ([der(pki.manufacturer_ca.cert)], [der(pki.masa_signer.cert), der(pki.masa_ca.cert)],
            pem, der(pki.domain_ca.cert))


def c_reference(pki, root: Path, rvrs: list[bytes],
                voucher_size: int) -> tuple[OpenSslMasa, Callable[[], None]]:
    """The reference, and one voucher's CMS work in it followed by its durable write."""
    reference = OpenSslMasa(*reference_material(pki))
    record = durable_write(root / "reference.db", voucher_size)
    take = cycle(rvrs)

    def voucher() -> None:
        reference.voucher(take(), NOW_TEXT)
        record()

    return reference, voucher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pledges", type=int, default=300, help="distinct pledges (300)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per case (3.0)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight when served (8)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (all its threads: the group "
                             "commit's too; steadier on a busy machine, but blind to fsync "
                             "waits)")
    parser.add_argument("--reference", choices=("openssl", "none"), default="openssl",
                        help="also do the CMS voucher work in C, in the system's OpenSSL "
                             "(openssl)")
    parser.add_argument("--save-requests", metavar="FILE",
                        help="write the RVRs and keys as JSON for bench/_openssl_cms.py, which "
                             "runs the C reference alone (in another root's OpenSSL, say)")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    pki, cms_rvrs, cose_rvrs = requests(args.pledges)
    if args.save_requests:
        save_requests(args.save_requests, cms_rvrs, *reference_material(pki), NOW_TEXT)
    with tempfile.TemporaryDirectory() as tmp:
        service = masa(pki, Path(tmp))
        committer = GroupCommitter(Path(tmp) / "masa.db", "masa")
        served = masa(pki, Path(tmp), committer)
        loop = asyncio.new_event_loop()
        key, pub = pki.masa_signer.key, pki.masa_signer.key.public_key()
        sample = cms_rvrs[0]
        sig = key.sign(sample, ec.ECDSA(hashes.SHA256()))

        def signatures() -> None:
            key.sign(sample, ec.ECDSA(hashes.SHA256()))
            for _ in range(3):
                pub.verify(sig, sample, ec.ECDSA(hashes.SHA256()))

        voucher_size = len(service.request_voucher(cms_rvrs[-1], NOW))
        record_voucher = durable_write(Path(tmp) / "bare.db", voucher_size)

        def primitives() -> None:
            signatures()
            record_voucher()

        steps: dict[str, list[float]] = {}
        next_cms, next_cose = cycle(cms_rvrs), cycle(cose_rvrs)

        def timed(label: str, op: Callable[[], object]) -> object:
            start = clock()
            out = op()
            steps.setdefault(label, []).append(clock() - start)
            return out

        def cms_voucher() -> None:
            body, now = next_cms(), NOW
            req = timed("cms: parse + verify RVR, PVR, IDevID chain",
                        lambda: service.authenticate(body, now))
            voucher, ca = timed("cms: owner check (registrar chain, ownership row)",
                                lambda: service._voucher(req, now))
            signed = timed("cms: sign voucher", lambda: sign_voucher_cms(
                voucher, service.config.signer_key, service.config.signer_chain, now))
            timed("cms: store + log", lambda: service._issued(req, voucher, ca, signed, now))

        def cose_voucher() -> None:
            body, now = next_cose(), NOW
            req = timed("cose: decode + verify RVR, PVR, IDevID chain",
                        lambda: service.authenticate_cose(body, now))
            voucher, ca = timed("cose: owner check (registrar chain, ownership row)",
                                lambda: service._voucher(req, now))
            signed = timed("cose: sign voucher", lambda: sign_voucher_cose(
                voucher, service.config.signer_key, x5bag=service.config.signer_chain))
            timed("cose: store + log", lambda: service._issued(req, voucher, ca, signed, now))

        def serve(take: Callable[[], bytes], cose_form: bool) -> Callable[[], int]:
            async def worker(deadline: float) -> int:
                done = 0
                while time.perf_counter() < deadline or done == 0:
                    await served.request_voucher_async(take(), NOW, cose_form=cose_form)
                    done += 1
                return done

            async def burst() -> int:
                deadline = time.perf_counter() + SLICE
                counts = await asyncio.gather(*(worker(deadline)
                                                for _ in range(args.concurrency)))
                return sum(counts)

            return lambda: loop.run_until_complete(burst())

        # the same work as request_voucher / request_voucher_cose, step by step: check once
        service.request_voucher(cms_rvrs[0], NOW)
        service.request_voucher_cose(cose_rvrs[0], NOW)
        cases: dict[str, Callable[[], object]] = {
            "primitives": primitives, "signatures": signatures, "CMS one by one": cms_voucher,
            "COSE one by one": cose_voucher}
        reference = None
        if args.reference == "openssl":
            reference, cases[REFERENCE] = c_reference(pki, Path(tmp), cms_rvrs, voucher_size)
        batches: dict[str, Callable[[], int]] = {
            "CMS served": serve(next_cms, False), "COSE served": serve(next_cose, True)}
        per_slice: dict[str, list[float]] = {name: [] for name in [*cases, *batches]}
        for _ in range(max(3, round(args.seconds / SLICE))):
            for name, op in cases.items():
                count, start = 0, clock()
                while (now := clock()) < start + SLICE or count == 0:
                    op()
                    count += 1
                per_slice[name].append(count / (now - start))
            for name, run in batches.items():
                start = clock()
                count = run()
                per_slice[name].append(count / (clock() - start))
        loop.close()
        committer.close()
        base, sigs = per_slice["primitives"], per_slice["signatures"]
        unit = "/CPU-s" if args.clock == "cpu" else "/s"
        vouchers = [name for name in [*cases, *batches][2:] if name != REFERENCE]

        def ratios(name: str, against: list[float]) -> list[float]:
            return sorted(r / b for r, b in zip(per_slice[name], against, strict=True))

        print(f"baseline: 1 ECDSA P-256 sign + 3 verifies + 1 durable write: "
              f"{statistics.median(base):,.0f}{unit} (the signatures alone "
              f"{statistics.median(sigs):,.0f}{unit})")
        for name in vouchers:
            full, bare = ratios(name, base), ratios(name, sigs)
            print(f"{name:16s} vouchers{unit} {statistics.median(per_slice[name]):8,.0f}   "
                  f"x baseline {statistics.median(full):.3f} ({full[0]:.3f}-{full[-1]:.3f}); "
                  f"x signatures {statistics.median(bare):.3f}")
        if REFERENCE in per_slice:
            c_ref = per_slice[REFERENCE]
            print(f"{REFERENCE}: {statistics.median(c_ref):,.0f} vouchers{unit}   x baseline "
                  f"{statistics.median(ratios(REFERENCE, base)):.3f}; CMS one by one x"
                  f"{statistics.median(ratios('CMS one by one', c_ref)):.3f} of it")
        print(f"group commit: {committer.jobs / max(1, committer.batches):.1f} vouchers "
              f"per commit")
        print("breakdown (median per voucher):")
        for label, times in steps.items():
            print(f"  {label:55s} {statistics.median(times) * 1e6:8.0f} us")
        sig_us, write_us = 1e6 / statistics.median(sigs), 1e6 / statistics.median(base)
        print(f"  {'(the durable write alone, by difference)':55s} "
              f"{write_us - sig_us:8.0f} us")
        for name in ("cms", "cose"):
            work = sum(statistics.median(t) for label, t in steps.items()
                       if label.startswith(name + ":") and "store" not in label) * 1e6
            print(f"{name}: everything but the store {work:.0f} us per voucher against "
                  f"{sig_us:.0f} us of signatures: x{sig_us / work:.2f}")
        if reference is not None:
            alone = sorted(cost(reference, cms_rvrs, NOW_TEXT, passes=3))
            print(f"{REFERENCE}, {reference.version()}: the CMS work alone {alone[0]:.0f} us "
                  f"CPU per voucher (best of 3 passes; bench/_openssl_cms.py measures it in "
                  f"another root's OpenSSL)")
        from _report import record  # make bench (bench/run_all.py): the same figures

        full_name = "primitives (1 sign + 3 verifies + 1 durable write)"
        record(full_name, base, unit)
        record("signatures (1 sign + 3 verifies)", sigs, unit)
        for name in vouchers:  # issue 18 item 2: x0.5 of what a voucher needs
            record(f"{name} vouchers", per_slice[name], f"vouchers{unit}",
                   baseline=full_name, target=0.5)
            record(f"{name} vouchers against the signatures alone", per_slice[name],
                   f"vouchers{unit}", baseline="signatures (1 sign + 3 verifies)")
        if REFERENCE in per_slice:
            record(f"{REFERENCE} vouchers", per_slice[REFERENCE], f"vouchers{unit}",
                   baseline=full_name)
            record("CMS one by one vouchers against the C reference", per_slice["CMS one by one"],
                   f"vouchers{unit}", baseline=f"{REFERENCE} vouchers")
        for label, times in steps.items():
            record(label, [t * 1e6 for t in times], "µs/voucher", better="lower")


if __name__ == "__main__":
    main()
