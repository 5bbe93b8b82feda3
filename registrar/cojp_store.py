"""The JRC's per-pledge state in the registrar's store: PSK, OSCORE counters, last response.

RFC 9031 §7.3.1: the sender sequence number and the replay window MUST survive a restart, and
every replay window update MUST be written. Each update here is its own committed transaction
(the store runs ``synchronous=FULL``), so a ``kill -9`` loses nothing already acted upon:

* ``window_index``/``window_bits``: the recipient replay window, written before the request it
  accepted is answered;
* ``ssn_reserved``: every sender sequence number below it may have been used; the JRC moves it
  ahead (by ``SSN_STEP``) *before* it uses a number past it, and starts from it after a restart,
  so no nonce is used twice (RFC 8613 App. B.1.1);
* ``last_piv``/``last_request_sha256``/``last_response``: the answer to the latest Join Request,
  resent as is when the same request comes again (its response was lost, and a stateless join
  proxy turns the pledge's CoAP retransmission into a new message the replay window refuses).

The table is part of the store's versioned schema (``registrar.store``, version 2), on SQLite
and PostgreSQL alike.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .store import Store, utc_text

SSN_STEP = 32  # sequence numbers reserved per store write (RFC 8613 App. B.1.1's K)
FIRST_SHORT_ID = 1
LAST_SHORT_ID = 0xFFFD  # 0xfffe and 0xffff mean "no short address" in IEEE 802.15.4

class CojpStoreError(Exception):
    """An operator-level problem (a pledge known twice, no short identifier left)."""


@dataclass(frozen=True)
class CojpPledge:
    pledge_id: bytes
    psk: bytes | None
    added_at: str
    short_id: int
    ssn_reserved: int
    window_index: int
    window_bits: int
    last_piv: bytes | None
    last_request_sha256: bytes | None
    last_response: bytes | None
    joins: int
    last_join: str | None
    edhoc_kid: bytes | None
    edhoc_credential: bytes | None


_COLUMNS = ("pledge_id, psk, added_at, short_id, ssn_reserved, window_index, window_bits, "
            "last_piv, last_request_sha256, last_response, joins, last_join, edhoc_kid, "
            "edhoc_credential")


def _now() -> str:
    return utc_text(datetime.datetime.now(datetime.UTC))


class CojpStore:
    """The ``cojp_pledges`` table of one open ``Store``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def add_pledge(self, pledge_id: bytes, psk: bytes | None, *, replace: bool = False,
                   edhoc_kid: bytes | None = None,
                   edhoc_credential: bytes | None = None) -> CojpPledge:
        """A pledge with its PSK and/or its EDHOC credential (a CCS, with its kid).
        ``replace``: recommissioning, which also resets the OSCORE counters (a new key starts a
        new nonce space) and keeps the short identifier."""
        if psk is None and edhoc_credential is None:
            raise CojpStoreError("a pledge needs a PSK or an EDHOC credential")
        with self.store.transaction() as db:
            row = db.execute("SELECT short_id FROM cojp_pledges WHERE pledge_id = ?",
                             (pledge_id,)).fetchone()
            if row is not None and not replace:
                raise CojpStoreError(f"pledge {pledge_id.hex()} is already known "
                                     "(--replace gives it new keys)")
            if row is not None:
                if psk is not None and db.execute(
                        "SELECT 1 FROM cojp_pledges WHERE pledge_id = ? AND psk = ?",
                        (pledge_id, psk)).fetchone():
                    raise CojpStoreError("a new PSK must differ from the old one "
                                         "(RFC 9031 §7.3.1: never reuse a nonce under a PSK)")
                db.execute("DELETE FROM cojp_pledges WHERE pledge_id = ?", (pledge_id,))
                short_id = row[0]
            else:
                short_id = self._free_short_id(db)
            if edhoc_kid is not None and db.execute(
                    "SELECT 1 FROM cojp_pledges WHERE edhoc_kid = ?", (edhoc_kid,)).fetchone():
                raise CojpStoreError(f"another pledge has the EDHOC kid {edhoc_kid.hex()}")
            db.execute("INSERT INTO cojp_pledges (pledge_id, psk, added_at, short_id, "
                       "edhoc_kid, edhoc_credential) VALUES (?, ?, ?, ?, ?, ?)",
                       (pledge_id, psk, _now(), short_id, edhoc_kid, edhoc_credential))
            self.store._audit(db, "cojp-pledge-added", pledge_id.hex(),
                              {"short_id": short_id, "replaced": row is not None,
                               "psk": psk is not None, "edhoc": edhoc_kid is not None},
                              _now())
        pledge = self.pledge(pledge_id)
        assert pledge is not None
        return pledge

    @staticmethod
    def _free_short_id(db: object) -> int:
        used = {r[0] for r in db.execute("SELECT short_id FROM cojp_pledges")}  # type: ignore[attr-defined]
        for candidate in range(FIRST_SHORT_ID, LAST_SHORT_ID + 1):
            if candidate not in used:
                return candidate
        raise CojpStoreError("no free short identifier left (65533 pledges)")

    def remove_pledge(self, pledge_id: bytes) -> bool:
        with self.store.transaction() as db:
            gone = db.execute("DELETE FROM cojp_pledges WHERE pledge_id = ?",
                              (pledge_id,)).rowcount
            if gone:
                self.store._audit(db, "cojp-pledge-removed", pledge_id.hex(), {}, _now())
        return bool(gone)

    def pledge(self, pledge_id: bytes) -> CojpPledge | None:
        with self.store.transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM cojp_pledges WHERE pledge_id = ?",
                             (pledge_id,)).fetchone()
        return None if row is None else CojpPledge(*row)

    def pledge_by_edhoc_kid(self, kid: bytes) -> CojpPledge | None:
        with self.store.transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM cojp_pledges WHERE edhoc_kid = ?",
                             (kid,)).fetchone()
        return None if row is None else CojpPledge(*row)

    def pledges(self) -> list[CojpPledge]:
        with self.store.transaction() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM cojp_pledges ORDER BY pledge_id")
            return [CojpPledge(*row) for row in rows]

    def save_window(self, pledge_id: bytes, index: int, bits: int) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE cojp_pledges SET window_index = ?, window_bits = ? "
                       "WHERE pledge_id = ?", (index, bits, pledge_id))

    def reserve_ssn(self, pledge_id: bytes, reserved: int) -> None:
        with self.store.transaction() as db:
            # Only ever forward (SQLite's max() of two values is not PostgreSQL's).
            db.execute("UPDATE cojp_pledges SET ssn_reserved = ? "
                       "WHERE pledge_id = ? AND ssn_reserved < ?", (reserved, pledge_id, reserved))

    def save_join(self, pledge_id: bytes, piv: bytes | None, request_sha256: bytes | None,
                  response: bytes | None, network_id: bytes, role: int, *,
                  method: str = "psk") -> None:
        """A join, and (PSK) the response to resend for the same request; an EDHOC session
        keeps that in memory, as its keys do not outlive the process."""
        with self.store.transaction() as db:
            db.execute("UPDATE cojp_pledges SET joins = joins + 1, last_join = ?, "
                       "network_id = ?, role = ? WHERE pledge_id = ?",
                       (_now(), network_id, role, pledge_id))
            if response is not None:
                db.execute("UPDATE cojp_pledges SET last_piv = ?, last_request_sha256 = ?, "
                           "last_response = ? WHERE pledge_id = ?",
                           (piv, request_sha256, response, pledge_id))
            self.store._audit(db, "cojp-join", pledge_id.hex(),
                              {"network_id": network_id.hex(), "role": role,
                               "method": method}, _now())
