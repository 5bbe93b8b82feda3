"""The MASA's group commit (registrar.masa_commit.issue, through registrar.store_commit):
records waiting together share one transaction, every record acknowledged is on disk (also
after kill -9), a claim lost to another domain writes nothing, and a failing record does not
take the others with it."""

import asyncio
import datetime
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from registrar.masa_commit import IssuedVoucher, issue, write_now
from registrar.store import Store
from registrar.store_commit import GroupCommitter

NOW = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.UTC)
DOMAIN_A = (b"A" * 32, b"cert-A")
DOMAIN_B = (b"B" * 32, b"cert-B")


def record(serial: str, claim=DOMAIN_A, voucher: bytes | None = b"voucher") -> IssuedVoucher:
    return IssuedVoucher(serial, voucher, "proximity", "bm9uY2U=", "ZG9tYWlu", NOW,  # type: ignore[arg-type]
                         claim)


@pytest.fixture
def path(tmp_path):
    target = tmp_path / "masa.db"
    Store(target, "masa").close()
    return target


def held_write_lock(path):
    """Another connection holding SQLite's write lock: the committer's next transaction waits
    for it (busy_timeout), so everything queued meanwhile forms one batch."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    return db


async def issue_while_locked(committer, path, first, rest):
    lock = held_write_lock(path)
    try:
        head = asyncio.ensure_future(issue(committer, first))
        await asyncio.sleep(0)  # queued
        while committer._queue.qsize():  # until the thread has taken it
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # and is waiting for the lock with it, alone
        tail = [asyncio.ensure_future(issue(committer, r)) for r in rest]
        await asyncio.sleep(0.05)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    return await asyncio.gather(head, *tail, return_exceptions=True)


def test_records_waiting_together_share_one_commit(path):
    committer = GroupCommitter(path, "masa")
    try:
        rows = asyncio.run(issue_while_locked(
            committer, path, record("SN-0"), [record(f"SN-{i}") for i in range(1, 20)]))
    finally:
        committer.close()
    assert all(isinstance(r, int) for r in rows) and len(set(rows)) == 20
    assert (committer.batches, committer.jobs) == (2, 20)  # the first alone, then 19
    with Store(path, "masa") as store:
        assert len(store.vouchers()) == 20
        assert store.owner("SN-7") == DOMAIN_A[0]


def test_a_claim_lost_in_the_same_batch_writes_nothing(path):
    committer = GroupCommitter(path, "masa")
    try:
        rows = asyncio.run(issue_while_locked(
            committer, path, record("SN-X"),
            [record("SN-1", DOMAIN_A), record("SN-1", DOMAIN_B), record("SN-1", DOMAIN_A)]))
    finally:
        committer.close()
    assert isinstance(rows[1], int) and rows[2] is None and isinstance(rows[3], int)
    with Store(path, "masa") as store:
        assert store.owner("SN-1") == DOMAIN_A[0]
        assert len(store.vouchers("SN-1")) == 2
        claims = [e for e in store.audit_events("SN-1") if e.event == "owner-claimed"]
        assert len(claims) == 1


def test_a_failing_record_fails_alone(path):
    committer = GroupCommitter(path, "masa")
    try:
        rows = asyncio.run(issue_while_locked(
            committer, path, record("SN-0"),
            [record("SN-1"), record("SN-BAD", voucher=None), record("SN-2")]))
    finally:
        committer.close()
    assert isinstance(rows[1], int) and isinstance(rows[3], int)
    assert isinstance(rows[2], sqlite3.IntegrityError)  # voucher NOT NULL
    with Store(path, "masa") as store:
        assert [v.serial for v in store.vouchers()] == ["SN-0", "SN-1", "SN-2"]


def test_write_now_is_the_same_transaction_without_the_thread(path):
    with Store(path, "masa") as store:
        assert write_now(store, record("SN-1", DOMAIN_B)) is not None
        assert write_now(store, record("SN-1", DOMAIN_A)) is None  # owned by B
        assert store.owner("SN-1") == DOMAIN_B[0]
        assert len(store.vouchers("SN-1")) == 1


def test_a_store_that_cannot_open_is_an_error_at_start(tmp_path):
    bad = tmp_path / "not-a-store.db"
    bad.write_bytes(b"this is no sqlite file" * 100)
    with pytest.raises(Exception, match="not an SQLite database"):
        GroupCommitter(bad, "masa")


def test_every_acknowledged_voucher_survives_kill_9(path):
    # A MASA process acknowledges records as fast as it can (one line per committed record);
    # it is killed mid-stream; every record it acknowledged must be in the reopened store.
    script = textwrap.dedent(f"""
        import asyncio, datetime, sys
        from registrar.masa_commit import IssuedVoucher, issue
        from registrar.store_commit import GroupCommitter
        NOW = datetime.datetime(2026, 5, 1, tzinfo=datetime.UTC)
        committer = GroupCommitter({str(path)!r}, "masa")

        async def one(i):
            serial = f"SN-{{i}}"
            row = await issue(committer, IssuedVoucher(serial, b"v", "proximity", None, None,
                                                      NOW, (b"A" * 32, b"cert")))
            print(serial, row, flush=True)

        async def main():
            i = 0
            while True:
                await asyncio.gather(*(one(i + k) for k in range(8)))
                i += 8

        asyncio.run(main())
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    try:
        assert child.stdout is not None
        for line in child.stdout:
            acknowledged.append(line.split())
            if len(acknowledged) >= 300:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    with Store(path, "masa") as store:
        stored = {(v.serial, str(v.id)) for v in store.vouchers()}
        owners = {serial for serial, _ in acknowledged if store.owner(serial) == b"A" * 32}
    assert {(serial, row) for serial, row in acknowledged} <= stored
    assert owners == {serial for serial, _ in acknowledged}


def test_a_record_alone_in_its_batch_fails_alone_and_writes_nothing(path):
    # A job alone runs in the batch's transaction without a savepoint of its own: one that
    # raises after a first write (the claim, then the voucher row's NOT NULL) leaves neither
    # row nor audit line, its request gets the error, and the next record is written.
    committer = GroupCommitter(path, "masa")

    async def one_by_one():
        bad = await asyncio.gather(issue(committer, record("SN-BAD", voucher=None)),
                                   return_exceptions=True)
        return bad[0], await issue(committer, record("SN-OK"))

    try:
        bad, ok = asyncio.run(one_by_one())
    finally:
        committer.close()
    assert isinstance(bad, sqlite3.IntegrityError) and isinstance(ok, int)
    assert committer.jobs == committer.batches == 1  # the failed one committed nothing
    with Store(path, "masa") as store:
        assert [v.serial for v in store.vouchers()] == ["SN-OK"]
        assert store.owner("SN-BAD") is None and store.audit_events("SN-BAD") == []
