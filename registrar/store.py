"""Persistent state of the registrar and the MASA: one SQLite file each, behind ``Store``.

What is kept (all times are UTC RFC 3339 text, all blobs DER or the bytes as received):

* ``pledges``: every device seen (serial, IDevID, first/last seen, last state);
* ``voucher_requests``: each pledge voucher-request with the registrar request made from it,
  and its outcome (pending while the MASA is unreachable, vouchered, refused + reason);
* ``vouchers``: vouchers obtained (registrar) or issued (MASA), with assertion and nonce;
* ``telemetry``: voucher_status and enrollstatus reports;
* ``certificates``: LDevIDs issued by the domain CA;
* ``audit``: an append-only event log (registrar and MASA);
* ``owners``: the MASA's trust-on-first-use ownership table (serial -> domain).

Every write is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) with ``synchronous=FULL``,
so a process killed at any point leaves either all or none of a change. At open, the file is
checked: it must be an SQLite database of this application (``PRAGMA application_id``), of the
same role (a registrar does not open the MASA's file), and of a schema version this code
understands (``PRAGMA user_version``); anything else is a ``StoreError`` naming the file and
the reason. Schema changes add a migration step to ``_MIGRATIONS``.

The class is the interface: a PostgreSQL backend for a registrar cluster would implement the
same methods.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APPLICATION_ID = 0x4A505244  # "JPRD": joinproxyd registrar/MASA store
SCHEMA_VERSION = 1
ROLES = ("registrar", "masa")

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE pledges (
    serial TEXT PRIMARY KEY,
    idevid BLOB,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE voucher_requests (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    pvr_sha256 BLOB NOT NULL,
    pvr BLOB,
    rvr BLOB,
    nonce TEXT,
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX voucher_requests_pvr ON voucher_requests (pvr_sha256);
CREATE INDEX voucher_requests_serial ON voucher_requests (serial);
CREATE TABLE vouchers (
    id INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    request_id INTEGER REFERENCES voucher_requests (id),
    voucher BLOB NOT NULL,
    assertion TEXT,
    nonce TEXT,
    domain_id TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX vouchers_serial ON vouchers (serial);
CREATE TABLE telemetry (
    id INTEGER PRIMARY KEY,
    serial TEXT,
    kind TEXT NOT NULL,
    version INTEGER,
    status INTEGER,
    reason TEXT,
    body BLOB NOT NULL,
    client_cert_matches INTEGER NOT NULL,
    received_at TEXT NOT NULL
);
CREATE TABLE certificates (
    cert_serial TEXT PRIMARY KEY,
    serial TEXT NOT NULL,
    subject TEXT NOT NULL,
    der BLOB NOT NULL,
    not_after TEXT NOT NULL,
    issued_at TEXT NOT NULL
);
CREATE INDEX certificates_serial ON certificates (serial);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    event TEXT NOT NULL,
    serial TEXT,
    detail TEXT NOT NULL
);
CREATE TABLE owners (
    serial TEXT PRIMARY KEY,
    domain_spki_sha256 BLOB NOT NULL,
    domain_cert BLOB NOT NULL,
    claimed_at TEXT NOT NULL
);
"""

# _MIGRATIONS[n] takes a store at version n to n + 1. Version 0 is an empty file.
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}


class StoreError(Exception):
    """The store file cannot be used (not ours, too new, unreadable); the message says why."""


def utc_text(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return utc_text(datetime.datetime.now(datetime.UTC))


@dataclass(frozen=True)
class VoucherRequestRecord:
    id: int
    serial: str
    status: str
    reason: str | None
    nonce: str | None
    pvr: bytes | None
    rvr: bytes | None


@dataclass(frozen=True)
class VoucherRecord:
    id: int
    serial: str
    request_id: int | None
    voucher: bytes
    assertion: str | None
    nonce: str | None
    domain_id: str | None
    created_at: str


@dataclass(frozen=True)
class TelemetryRecord:
    serial: str | None
    kind: str
    version: int | None
    status: bool | None
    reason: str | None
    client_cert_matches: bool
    received_at: str


@dataclass(frozen=True)
class CertificateRecord:
    cert_serial: str
    serial: str
    subject: str
    der: bytes
    not_after: str
    issued_at: str


@dataclass(frozen=True)
class AuditRecord:
    at: str
    event: str
    serial: str | None
    detail: dict[str, Any]


class Store:
    """One open store file. Not thread-safe: each service uses it from its event loop."""

    def __init__(self, path: Path | str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        self.path = Path(path)
        self.role = role
        self._db = self._open()

    # -- opening and checking -------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        name = self.path.name
        existed = self.path.exists()
        if existed and not self.path.is_file():
            raise StoreError(f"{self.path}: not a regular file")
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open: {exc}") from exc
        try:
            db.execute("PRAGMA foreign_keys = ON")
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{name}: not an SQLite database ({exc})") from exc
        if app_id == 0 and version == 0 and tables > 0:
            db.close()
            raise StoreError(f"{name}: an SQLite database of another application")
        if app_id not in (0, APPLICATION_ID):
            db.close()
            raise StoreError(f"{name}: an SQLite database of another application "
                             f"(application_id {app_id:#x})")
        if version > SCHEMA_VERSION:
            db.close()
            raise StoreError(f"{name}: schema version {version} is newer than this "
                             f"{self.role} understands ({SCHEMA_VERSION})")
        try:
            # WAL: readers never block the writer; FULL: a committed change survives power loss.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            self._migrate(db, version)
            role = db.execute("SELECT value FROM meta WHERE key = 'role'").fetchone()
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"{name}: cannot prepare the store: {exc}") from exc
        if role is None or role[0] != self.role:
            db.close()
            raise StoreError(f"{name}: belongs to a {role[0] if role else 'unknown'} "
                             f"service, not a {self.role}")
        return db

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        while version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                if version == 0:
                    db.execute("INSERT INTO meta VALUES ('role', ?), ('created', ?)",
                               (self.role, _now()))
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _audit(self, db: sqlite3.Connection, event: str, serial: str | None,
               detail: dict[str, Any], at: str) -> None:
        db.execute("INSERT INTO audit (at, event, serial, detail) VALUES (?, ?, ?, ?)",
                   (at, event, serial, json.dumps(detail, sort_keys=True)))

    # -- pledges --------------------------------------------------------------------------
    def pledge_seen(self, serial: str, idevid: bytes | None, state: str) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO pledges VALUES (?, ?, ?, ?, ?) ON CONFLICT (serial) DO UPDATE SET "
                "idevid = coalesce(excluded.idevid, idevid), last_seen = excluded.last_seen, "
                "state = excluded.state", (serial, idevid, now, now, state))

    def pledge(self, serial: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT serial, idevid, first_seen, last_seen, state FROM pledges "
                               "WHERE serial = ?", (serial,)).fetchone()
        if row is None:
            return None
        keys = ("serial", "idevid", "first_seen", "last_seen", "state")
        return dict(zip(keys, row, strict=True))

    # -- voucher requests and vouchers ----------------------------------------------------
    def add_voucher_request(self, serial: str, pvr_sha256: bytes, pvr: bytes | None,
                            rvr: bytes | None, nonce: str | None, status: str,
                            reason: str | None = None) -> int:
        now = _now()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO voucher_requests (serial, pvr_sha256, pvr, rvr, nonce, received_at,"
                " updated_at, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (serial, pvr_sha256, pvr, rvr, nonce, now, now, status, reason))
            request_id = int(cur.lastrowid or 0)
            self._audit(db, "voucher-request", serial,
                        {"request": request_id, "status": status, "reason": reason}, now)
        return request_id

    def update_voucher_request(self, request_id: int, status: str,
                               reason: str | None = None) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute("UPDATE voucher_requests SET status = ?, reason = ?, updated_at = ? "
                       "WHERE id = ?", (status, reason, now, request_id))
            self._audit(db, "voucher-request-update", None,
                        {"request": request_id, "status": status, "reason": reason}, now)

    def find_voucher_request(self, pvr_sha256: bytes) -> VoucherRequestRecord | None:
        """The latest record of this exact pledge request, if it was seen before."""
        row = self._db.execute(
            "SELECT id, serial, status, reason, nonce, pvr, rvr FROM voucher_requests "
            "WHERE pvr_sha256 = ? ORDER BY id DESC LIMIT 1", (pvr_sha256,)).fetchone()
        return VoucherRequestRecord(*row) if row else None

    def voucher_request(self, request_id: int) -> VoucherRequestRecord | None:
        row = self._db.execute(
            "SELECT id, serial, status, reason, nonce, pvr, rvr FROM voucher_requests "
            "WHERE id = ?", (request_id,)).fetchone()
        return VoucherRequestRecord(*row) if row else None

    def voucher_requests(self, serial: str) -> list[VoucherRequestRecord]:
        rows = self._db.execute(
            "SELECT id, serial, status, reason, nonce, pvr, rvr FROM voucher_requests "
            "WHERE serial = ? ORDER BY id", (serial,)).fetchall()
        return [VoucherRequestRecord(*row) for row in rows]

    def add_voucher(self, serial: str, voucher: bytes, *, request_id: int | None = None,
                    assertion: str | None = None, nonce: str | None = None,
                    domain_id: str | None = None,
                    created_at: datetime.datetime | None = None) -> int:
        """Record a voucher; with ``request_id`` the request is marked vouchered in the same
        transaction."""
        when = utc_text(created_at) if created_at else _now()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO vouchers (serial, request_id, voucher, assertion, nonce, domain_id,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (serial, request_id, voucher, assertion, nonce, domain_id, when))
            voucher_id = int(cur.lastrowid or 0)
            if request_id is not None:
                db.execute("UPDATE voucher_requests SET status = 'vouchered', reason = NULL, "
                           "updated_at = ? WHERE id = ?", (when, request_id))
            self._audit(db, "voucher", serial, {"voucher": voucher_id, "request": request_id,
                                                "assertion": assertion, "nonce": nonce,
                                                "domain": domain_id}, when)
        return voucher_id

    def voucher_for_request(self, pvr_sha256: bytes) -> VoucherRecord | None:
        """The voucher already obtained for this exact pledge request (a pledge retrying
        after 202 sends the same signed request, RFC 8995 §5.6)."""
        row = self._db.execute(
            "SELECT v.id, v.serial, v.request_id, v.voucher, v.assertion, v.nonce, v.domain_id,"
            " v.created_at FROM vouchers v JOIN voucher_requests r ON v.request_id = r.id "
            "WHERE r.pvr_sha256 = ? ORDER BY v.id DESC LIMIT 1", (pvr_sha256,)).fetchone()
        return VoucherRecord(*row) if row else None

    def vouchers(self, serial: str) -> list[VoucherRecord]:
        rows = self._db.execute(
            "SELECT id, serial, request_id, voucher, assertion, nonce, domain_id, created_at "
            "FROM vouchers WHERE serial = ? ORDER BY id", (serial,)).fetchall()
        return [VoucherRecord(*row) for row in rows]

    # -- telemetry ------------------------------------------------------------------------
    def add_telemetry(self, serial: str | None, kind: str, body: bytes, *,
                      version: int | None, status: bool | None, reason: str | None,
                      client_cert_matches: bool) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO telemetry (serial, kind, version, status, reason, body,"
                " client_cert_matches, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (serial, kind, version, None if status is None else int(status), reason, body,
                 int(client_cert_matches), now))
            if serial is not None and status is not None:
                state = f"{kind}-{'ok' if status else 'failed'}"
                db.execute("UPDATE pledges SET state = ?, last_seen = ? WHERE serial = ?",
                           (state, now, serial))
            self._audit(db, kind, serial, {"status": status, "reason": reason,
                                           "client_cert_matches": client_cert_matches}, now)

    def telemetry(self, serial: str | None = None) -> list[TelemetryRecord]:
        query = ("SELECT serial, kind, version, status, reason, client_cert_matches, received_at"
                 " FROM telemetry")
        rows = (self._db.execute(query + " WHERE serial = ? ORDER BY id", (serial,))
                if serial is not None else self._db.execute(query + " ORDER BY id")).fetchall()
        return [TelemetryRecord(r[0], r[1], r[2], None if r[3] is None else bool(r[3]), r[4],
                                bool(r[5]), r[6]) for r in rows]

    # -- certificates ---------------------------------------------------------------------
    def add_certificate(self, cert_serial: str, serial: str, subject: str, der: bytes,
                        not_after: datetime.datetime) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute("INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?)",
                       (cert_serial, serial, subject, der, utc_text(not_after), now))
            db.execute("UPDATE pledges SET state = 'enrolled', last_seen = ? WHERE serial = ?",
                       (now, serial))
            self._audit(db, "certificate", serial, {"cert_serial": cert_serial,
                                                    "subject": subject}, now)

    def certificates(self, serial: str | None = None) -> list[CertificateRecord]:
        query = "SELECT cert_serial, serial, subject, der, not_after, issued_at FROM certificates"
        rows = (self._db.execute(query + " WHERE serial = ? ORDER BY issued_at", (serial,))
                if serial is not None else self._db.execute(query + " ORDER BY issued_at"))
        return [CertificateRecord(*row) for row in rows.fetchall()]

    # -- audit ----------------------------------------------------------------------------
    def audit(self, event: str, serial: str | None, **detail: Any) -> None:
        with self.transaction() as db:
            self._audit(db, event, serial, detail, _now())

    def audit_events(self, serial: str | None = None) -> list[AuditRecord]:
        query = "SELECT at, event, serial, detail FROM audit"
        rows = (self._db.execute(query + " WHERE serial = ? ORDER BY id", (serial,))
                if serial is not None else self._db.execute(query + " ORDER BY id"))
        return [AuditRecord(r[0], r[1], r[2], json.loads(r[3])) for r in rows.fetchall()]

    # -- MASA ownership (trust on first use) ----------------------------------------------
    def claim_owner(self, serial: str, domain_spki_sha256: bytes,
                    domain_cert: bytes) -> bytes:
        """Record ``domain`` as the owner of ``serial`` unless someone already is; return the
        owner's SPKI hash either way (compare it with yours). Atomic: two domains racing for
        one device cannot both win."""
        now = _now()
        with self.transaction() as db:
            row = db.execute("SELECT domain_spki_sha256 FROM owners WHERE serial = ?",
                             (serial,)).fetchone()
            if row is not None:
                return bytes(row[0])
            db.execute("INSERT INTO owners VALUES (?, ?, ?, ?)",
                       (serial, domain_spki_sha256, domain_cert, now))
            self._audit(db, "owner-claimed", serial,
                        {"domain_spki_sha256": domain_spki_sha256.hex()}, now)
        return domain_spki_sha256

    def owner(self, serial: str) -> bytes | None:
        row = self._db.execute("SELECT domain_spki_sha256 FROM owners WHERE serial = ?",
                               (serial,)).fetchone()
        return bytes(row[0]) if row else None
