"""Group commit for the registrar's and the MASA's store writes (registrar.masa_commit):
concurrent requests share one durable commit, made off the event loop.

Every enrollment writes the store five times (the voucher-request, the voucher, two status
reports, the LDevID), and each write must be durable before its answer leaves: SQLite's
``synchronous=FULL`` makes every commit an fsync of a few milliseconds. Done on the event loop
that is time in which the registrar does nothing else; at tens of enrollments a second it is
the whole second. ``GroupCommitter`` runs the writes in a thread of its own, on a store
connection of its own (SQLite connections stay in the thread that opened them; a PostgreSQL
store gets a pool of its own): a request hands over a job, a function of the store, and
awaits it. The thread takes every job waiting, runs each in a savepoint of one transaction
(a job that raises rolls back its own writes only, and its exception goes to its request;
a job alone needs no savepoint: the transaction is its own),
commits once and only then resolves the requests' futures: no answer leaves before its
record is on disk, as before. While one commit is on its way to disk the event loop
prepares the next requests, whose jobs form the next batch.

If the batch's commit itself fails, each job of it runs again in a transaction of its own,
so that one cannot take the others with it; so does a job whose statement the database
refused inside the batch (PostgreSQL: two registrars' batches deadlocked on each other's
locks). Jobs must therefore only touch the store (and compute): they may run twice, the
first run having left nothing behind.

Reads stay on the event loop's own connection (SQLite WAL: readers do not wait for the
writer), and see a job's writes once it has been awaited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .store import Store, Transaction

log = logging.getLogger(__name__)

T = TypeVar("T")
_TxJob = Callable[[Store, Transaction], Any]  # what the queue holds: a job and its transaction
MAX_BATCH = 64  # jobs per transaction: bounds how long one commit holds the write lock
_STOP = object()
_Pending = tuple[_TxJob, "concurrent.futures.Future[Any]"]


class GroupCommitter:
    """``await committer.run(job)``: ``job(store)``'s result once its writes are committed."""

    def __init__(self, target: Path | str, role: str = "registrar") -> None:
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.batches = 0  # transactions committed (tests, benchmarks)
        self.jobs = 0
        self._thread = threading.Thread(target=self._run, args=(target, role),
                                        name=f"{role}-group-commit", daemon=True)
        self._thread.start()
        self._opened.result()  # the store's own errors (StoreError) surface here, at start

    async def run(self, job: Callable[[Store], T]) -> T:
        return await self.run_in_transaction(lambda store, _db: job(store))

    async def run_in_transaction(self, job: Callable[[Store, Transaction], T]) -> T:
        """``run`` for a job that writes through the transaction it is given (the batch's
        own when it runs alone, else a savepoint of it) instead of opening one."""
        if not self._thread.is_alive():
            raise RuntimeError("the group commit thread has stopped")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((job, future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ----------------------------------------------------------------
    def _run(self, target: Path | str, role: str) -> None:
        try:
            store = Store(target, role)
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
                    # Running from here on: a request cancelled before cannot see its job
                    # run; one cancelled later leaves its writes standing.
                    if item[1].set_running_or_notify_cancel():  # type: ignore[index]
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
        outcomes: list[tuple[bool, Any]] = []
        try:
            with store.transaction() as db:
                if len(batch) == 1:
                    # A job alone needs no savepoint: if it raises, the transaction rolls
                    # back with nothing else in it, and the exception reaches its request
                    # below. Each statement saved is a GIL hand-over fewer between this
                    # thread and the event loop's, which costs more CPU than the statement.
                    outcomes.append((True, batch[0][0](store, db)))
                else:
                    for job, _future in batch:
                        try:
                            with store.transaction() as savepoint:  # this job's writes only
                                outcomes.append((True, job(store, savepoint)))
                        except Exception as exc:
                            outcomes.append((False, exc))
        except Exception as exc:  # the commit (or BEGIN) failed: nothing of it was written
            if len(batch) == 1:
                _settle(batch[0][1], False, exc)
                return
            log.warning("a group commit of %d store writes failed (%s); writing them one "
                        "by one", len(batch), exc)
            for pending in batch:
                self._write(store, [pending])
            return
        self.batches += 1
        self.jobs += len(batch)
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            if not ok and len(batch) > 1 and isinstance(value, store.errors):
                # The database refused a statement of a shared transaction (PostgreSQL: a
                # deadlock between two registrars' batches, each holding its own locks):
                # the job alone, in a transaction of its own, as it would have run.
                self._write(store, [pending])
            else:
                _settle(pending[1], ok, value)


def _settle(future: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
