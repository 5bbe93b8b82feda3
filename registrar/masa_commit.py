"""The MASA's voucher records and how they reach the store durably.

Each issued voucher must be on disk before it is returned (the audit log answers from these
rows, and trust on first use decides ownership by them). One ``synchronous=FULL`` commit per
voucher costs an fsync, more than the voucher's crypto; and done on the event loop it stalls
every other request. The service therefore hands each record to the group commit of
``registrar.store_commit`` (``issue``): records waiting together share one transaction,
each in a savepoint of its own, and no response leaves before its row is durable.
``write_now`` writes one record on the caller's thread (no group commit).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .store import Store, Transaction
from .store_commit import GroupCommitter


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


async def issue(committer: GroupCommitter, record: IssuedVoucher) -> int | None:
    """The voucher's row id once its record is committed (in the group commit of
    ``registrar.store_commit``), or None when its ownership claim was lost to another
    domain (then nothing of it was written)."""
    # in the transaction the group commit gives it: no savepoint of its own to open
    return await committer.run_in_transaction(lambda store, db: _issue(store, db, record))


def write_now(store: Store, record: IssuedVoucher) -> int | None:
    """One record in a transaction of its own, on the caller's thread (no group commit)."""
    with store.transaction() as db:
        return _issue(store, db, record)


def _issue(store: Store, db: Transaction, record: IssuedVoucher) -> int | None:
    return store.issue_voucher(db, record.serial, record.voucher, assertion=record.assertion,
                               nonce=record.nonce, domain_id=record.domain_id,
                               created_at=record.created_at, claim=record.claim)

