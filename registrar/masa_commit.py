"""Group commit for the MASA's voucher records: concurrent requests share one durable
transaction.

Each issued voucher must be on disk before it is returned (the audit log answers from these
rows, and trust on first use decides ownership by them). One ``synchronous=FULL`` commit per
voucher costs an fsync, more than the voucher's crypto; and done on the event loop it stalls
every other request. ``GroupCommitter`` runs the writes in a thread of its own, on a store
connection of its own: a request hands over its record and awaits it; the thread takes every
record waiting, writes them in one transaction, commits once and only then resolves each
request's future, so no response leaves before its row is durable. While one commit is on
its way to disk, the event loop prepares the next requests, whose records form the next
batch.

If a batch's transaction fails, each record of it is retried in a transaction of its own,
so one bad record cannot take others with it; its own error goes to its request only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from .store import Store, Transaction

log = logging.getLogger(__name__)

MAX_BATCH = 64  # records per transaction: bounds how long one commit keeps the writer lock


@dataclass(frozen=True)
class IssuedVoucher:
    """What ``Store.issue_voucher`` writes for one voucher."""

    serial: str
    voucher: bytes
    assertion: str | None
    nonce: str | None
    domain_id: str | None
    created_at: datetime.datetime
    claim: tuple[bytes, bytes] | None  # trust on first use: (SPKI hash, DER) of the domain CA


_Pending = tuple[IssuedVoucher, "concurrent.futures.Future[int | None]"]
_STOP = object()


class GroupCommitter:
    """The writer thread; ``await issue(record)`` returns the voucher's row id once it is
    committed, or None when the record's ownership claim was lost to another domain."""

    def __init__(self, target: Path | str, role: str = "masa") -> None:
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.batches = 0  # transactions committed, for tests and the benchmark
        self.records = 0
        self._thread = threading.Thread(target=self._run, args=(target, role),
                                        name="masa-group-commit", daemon=True)
        self._thread.start()
        self._opened.result()  # the store's own errors (StoreError) surface here

    async def issue(self, record: IssuedVoucher) -> int | None:
        future: concurrent.futures.Future[int | None] = concurrent.futures.Future()
        self._queue.put((record, future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    # -- the writer thread ----------------------------------------------------------------
    def _run(self, target: Path | str, role: str) -> None:
        try:
            store = Store(target, role)  # SQLite connections stay in the thread that opened them
        except BaseException as exc:
            self._opened.set_exception(exc)
            return
        self._opened.set_result(None)
        try:
            stop = False
            while not stop:
                batch: list[_Pending] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stop = True
                        break
                    batch.append(item)  # type: ignore[arg-type]
                    if len(batch) >= MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._write(store, batch)
        finally:
            store.close()

    def _write(self, store: Store, batch: list[_Pending]) -> None:
        try:
            with store.transaction() as db:
                ids = [_issue(store, db, record) for record, _ in batch]
        except Exception as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            log.warning("a group commit of %d vouchers failed; writing them one by one",
                        len(batch), exc_info=True)
            for pending in batch:
                self._write(store, [pending])
            return
        self.batches += 1
        self.records += len(batch)
        for (_, future), row in zip(batch, ids, strict=True):
            future.set_result(row)


def write_now(store: Store, record: IssuedVoucher) -> int | None:
    """One record in a transaction of its own, on the caller's thread (no group commit)."""
    with store.transaction() as db:
        return _issue(store, db, record)


def _issue(store: Store, db: Transaction, record: IssuedVoucher) -> int | None:
    return store.issue_voucher(db, record.serial, record.voucher, assertion=record.assertion,
                               nonce=record.nonce, domain_id=record.domain_id,
                               created_at=record.created_at, claim=record.claim)

