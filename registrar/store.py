"""Persistent state of the registrar and the MASA, behind ``Store``: an SQLite file (the
default, one per service) or a PostgreSQL database (``[store] url``, shared by the registrars
of one domain).

What is kept (all times are UTC RFC 3339 text, all blobs DER or the bytes as received):

* ``pledges``: every device seen (serial, IDevID, first/last seen, last state);
* ``voucher_requests``: each pledge voucher-request with the registrar request made from it,
  and its outcome (pending while the MASA is unreachable, vouchered, refused + reason);
* ``vouchers``: vouchers obtained (registrar) or issued (MASA), with assertion and nonce;
* ``telemetry``: voucher_status and enrollstatus reports;
* ``certificates``: LDevIDs issued by the domain CA;
* ``audit``: an append-only event log (registrar and MASA);
* ``owners``: the MASA's trust-on-first-use ownership table (serial -> domain);
* ``cojp_pledges``: the CoJP JRC's pledges and OSCORE counters (``registrar.cojp_store``);
* ``sequences``: counters handed out by the database (the CA's certificate serial numbers).

Every write is one transaction, so a process killed at any point leaves either all or none of
a change (SQLite: ``BEGIN IMMEDIATE`` with ``synchronous=FULL``; PostgreSQL: the server rolls
back the transaction of a connection that goes away). Whatever must be unique or ordered across
several registrars comes from the database: row ids (audit and voucher order) from the
engine's identity columns, certificate serial numbers from ``sequences`` (a row update that
concurrent transactions serialize on), and the "is this request already known" decisions run
under a lock the database holds (``BEGIN IMMEDIATE`` / ``pg_advisory_xact_lock``).

At open, the store is checked: it must be a store of this application (SQLite:
``PRAGMA application_id``; PostgreSQL: ``meta.application``), of the same role (a registrar
does not open the MASA's store), and of a schema version this code understands; anything else
is a ``StoreError`` naming the store and the reason. Both engines share one schema and one list
of versioned migrations (``_MIGRATIONS``; SQLite text, translated for PostgreSQL by
``_pg_ddl``); an older store is migrated in place at open.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

APPLICATION_ID = 0x4A505244  # "JPRD": joinproxyd registrar/MASA store
APPLICATION = "joinproxyd-store"
SCHEMA_VERSION = 2
ROLES = ("registrar", "masa")
PG_SCHEMES = ("postgresql://", "postgres://")

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


# Version 2: the JRC's table joins the versioned schema (a version-1 file where the JRC ran
# already has it, created on first use: hence IF NOT EXISTS), and the database hands out the
# CA's serial numbers.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS cojp_pledges (
    pledge_id BLOB PRIMARY KEY,
    psk BLOB,
    edhoc_kid BLOB UNIQUE,
    edhoc_credential BLOB,
    added_at TEXT NOT NULL,
    short_id INTEGER NOT NULL UNIQUE,
    ssn_reserved INTEGER NOT NULL DEFAULT 0,
    window_index INTEGER NOT NULL DEFAULT 0,
    window_bits INTEGER NOT NULL DEFAULT 0,
    last_piv BLOB,
    last_request_sha256 BLOB,
    last_response BLOB,
    joins INTEGER NOT NULL DEFAULT 0,
    last_join TEXT,
    network_id BLOB,
    role INTEGER
);
CREATE TABLE sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO sequences VALUES ('cert_serial', 0);
CREATE INDEX vouchers_request ON vouchers (request_id);
CREATE INDEX audit_serial ON audit (serial)
"""

# _MIGRATIONS[n] takes a store at version n to n + 1. Version 0 is an empty store.
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1, 1: _SCHEMA_V2}

# Every table with its key, in an order that satisfies the foreign keys (export/import).
TABLES: dict[str, str] = {
    "pledges": "serial", "voucher_requests": "id", "vouchers": "id", "telemetry": "id",
    "certificates": "cert_serial", "audit": "id", "owners": "serial",
    "cojp_pledges": "pledge_id", "sequences": "name",
}
IDENTITY_TABLES = ("voucher_requests", "vouchers", "telemetry", "audit")


def _pg_ddl(sql: str) -> str:
    """The SQLite schema text in PostgreSQL's words: rowid keys become identity columns (BY
    DEFAULT, so an import can keep the ids), BLOB becomes BYTEA, integers are 64-bit."""
    return (sql.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY "
                        "PRIMARY KEY")
            .replace("BLOB", "BYTEA").replace("INTEGER", "BIGINT"))


def _statements(sql: str) -> list[str]:
    return [part for part in sql.split(";") if part.strip()]


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


def display_name(target: Path | str) -> str:
    """The store as messages name it: a file's name, a URL without its password."""
    if not is_url(target):
        return Path(target).name
    from psycopg.conninfo import conninfo_to_dict
    try:
        info = conninfo_to_dict(str(target))
    except Exception:  # psycopg.ProgrammingError for a malformed URL
        return "postgresql://(unparsable URL)"
    host = info.get("host", "")
    host = "(socket)" if host.startswith("/") or not host else host
    return f"postgresql://{host}/{info.get('dbname', '')}"


def _lock_key(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)

def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the store being out of reach for now (SQLite busy or locked past its
    timeout, a disk error or a full disk; PostgreSQL down, restarting, a dropped connection,
    an exhausted pool, a deadlock or serialization failure): a request that met it may
    succeed when repeated later, so it is answered 503 with Retry-After, not 500."""
    if isinstance(exc, sqlite3.OperationalError):
        return True
    module = type(exc).__module__
    if module.startswith("psycopg_pool"):
        return type(exc).__name__ == "PoolTimeout"
    if module.startswith("psycopg"):
        import psycopg
        return isinstance(exc, psycopg.OperationalError)
    return False


class StoreError(Exception):
    """The store cannot be used (not ours, too new, unreadable, unreachable); the message says
    why."""


def utc_text(when: datetime.datetime) -> str:
    utc = when.astimezone(datetime.UTC)
    if utc.year >= 1000:  # isoformat writes the same digits, without strftime's format parse
        return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # (unpadded years, as before)


# json.dumps(detail, sort_keys=True) with one encoder for every audit line (json.dumps with
# arguments makes a new encoder per call)
_AUDIT_JSON = json.JSONEncoder(sort_keys=True)


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




class _Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    @property
    def rowcount(self) -> int: ...
    def __iter__(self) -> Iterator[Any]: ...


class Transaction(Protocol):
    """What ``Store.transaction`` yields: ``execute`` with ``?`` placeholders on either engine."""

    def execute(self, sql: str, params: tuple[Any, ...] = ...) -> _Cursor: ...


class _SqliteEngine:
    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.role = role
        self._depth = 0  # transactions open (nested ones are savepoints)
        self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        name = self.path.name
        if self.path.exists() and not self.path.is_file():
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
            # Another process (a second service on the same file) may hold the write lock.
            db.execute("PRAGMA busy_timeout = 10000")
            # WAL: readers never block the writer; FULL: a committed change survives power loss.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            while version < SCHEMA_VERSION:
                db.execute("BEGIN IMMEDIATE")
                # Read again under the write lock: another process may have migrated first.
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version >= SCHEMA_VERSION:
                    db.execute("COMMIT")
                    break
                try:
                    _migrate_step(db, version, self.role, sqlite=True)
                    version += 1
                    db.execute(f"PRAGMA user_version = {version}")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            role = db.execute("SELECT value FROM meta WHERE key = 'role'").fetchone()
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"{name}: cannot prepare the store: {exc}") from exc
        if role is None or role[0] != self.role:
            db.close()
            raise StoreError(f"{name}: belongs to a {role[0] if role else 'unknown'} "
                             f"service, not a {self.role}")
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        if self._depth:  # inside another: a savepoint (registrar.store_commit's jobs)
            name = f"nested{self._depth}"
            self.db.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self.db
            except BaseException:
                self.db.execute(f"ROLLBACK TO {name}")
                self.db.execute(f"RELEASE {name}")
                raise
            finally:
                self._depth -= 1
            self.db.execute(f"RELEASE {name}")
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
        self.db.execute("COMMIT")

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self.db.execute(sql, params).fetchall()

    def lock(self, db: Any, key: int) -> None:
        """Nothing to do: BEGIN IMMEDIATE already holds the file's one write lock."""

    def close(self) -> None:
        self.db.close()


class _PgTransaction:
    """One PostgreSQL transaction, spoken to with SQLite's ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)


class _PgEngine:
    def __init__(self, url: str, role: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool, PoolTimeout
        self.role = role
        self.name = display_name(url)
        self._held = threading.local()  # the connection of this thread's open transaction
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout)
        try:  # once by hand first: the reason of a failure, at once (the pool would retry)
            psycopg.connect(url, connect_timeout=10, autocommit=True).close()
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or ["no reason given"])[0]
            raise StoreError(f"{self.name}: cannot connect to PostgreSQL: {reason}") from exc
        # A small pool: the service runs one transaction at a time from its event loop. No
        # check at checkout (a round trip per transaction, measured +0.9 ms): a connection
        # the server dropped (restart, failover) fails its next transaction, which rolls back
        # (the pledge retries; a read is retried here once), and the pool replaces it.
        self._operational = psycopg.OperationalError
        self.pool = ConnectionPool(url, min_size=1, max_size=4, open=False, timeout=15,
                                   kwargs={"connect_timeout": 10,
                                           "application_name": f"brski-{role}"})
        try:
            self.pool.open(wait=True, timeout=15)
        except PoolTimeout as exc:
            self.pool.close()
            raise StoreError(f"{self.name}: cannot connect to PostgreSQL") from exc
        try:
            self._prepare()
        except StoreError:
            self.pool.close()
            raise
        except psycopg.Error as exc:
            self.pool.close()
            raise StoreError(f"{self.name}: cannot prepare the store: {exc}") from exc

    def _prepare(self) -> None:
        # Two registrars starting at once: the advisory lock makes one migrate, the other wait
        # and then find the store at the current version.
        with self.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (APPLICATION_ID,))
            meta = db.execute("SELECT to_regclass('meta')").fetchone()[0]
            if meta is None:
                tables = db.execute("SELECT count(*) FROM information_schema.tables "
                                    "WHERE table_schema = current_schema()").fetchone()[0]
                if tables:
                    raise StoreError(f"{self.name}: a database of another application "
                                     f"({tables} tables and no store metadata)")
                version = 0
            else:
                values = dict(db.execute("SELECT key, value FROM meta").fetchall())
                if values.get("application") != APPLICATION:
                    raise StoreError(f"{self.name}: a database of another application")
                version = int(values.get("schema_version", "0"))
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.name}: schema version {version} is newer than this "
                                 f"{self.role} understands ({SCHEMA_VERSION})")
            while version < SCHEMA_VERSION:
                _migrate_step(db, version, self.role, sqlite=False)
                version += 1
                db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) "
                           "DO UPDATE SET value = excluded.value", (str(version),))
            role = db.execute("SELECT value FROM meta WHERE key = 'role'").fetchone()
        if role is None or role[0] != self.role:
            raise StoreError(f"{self.name}: belongs to a {role[0] if role else 'unknown'} "
                             f"service, not a {self.role}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        held = getattr(self._held, "conn", None)
        if held is not None:  # inside another on this thread: psycopg makes it a savepoint
            with held.transaction():
                yield _PgTransaction(held)
            return
        # The pool's context commits when the block ends normally and rolls back otherwise.
        with self.pool.connection() as conn:
            self._held.conn = conn
            try:
                yield _PgTransaction(conn)
            finally:
                self._held.conn = None

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self.transaction() as db:
                return db.execute(sql, params).fetchall()
        except self._operational:  # a dropped connection: once more, on a fresh one
            with self.transaction() as db:
                return db.execute(sql, params).fetchall()

    def lock(self, db: Any, key: int) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (key,))

    def close(self) -> None:
        self.pool.close()


def _migrate_step(db: Any, version: int, role: str, *, sqlite: bool) -> None:
    sql = _MIGRATIONS[version]
    for statement in _statements(sql if sqlite else _pg_ddl(sql)):
        db.execute(statement)
    if version == 0:
        db.execute("INSERT INTO meta VALUES ('role', ?), ('created', ?)", (role, _now()))
        if sqlite:
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        else:
            db.execute("INSERT INTO meta VALUES ('application', ?)", (APPLICATION,))


class Store:
    """One open store. Not thread-safe: each service uses it from its event loop.

    ``target``: a path (SQLite) or a ``postgresql://`` URL."""

    def __init__(self, target: Path | str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        self.role = role
        self.target = target
        self.engine_name = "postgresql" if is_url(target) else "sqlite"
        self.path = None if is_url(target) else Path(target)
        self._engine: _SqliteEngine | _PgEngine = (
            _PgEngine(str(target), role) if is_url(target) else _SqliteEngine(Path(target), role))
        self._errors = (self._engine._errors if isinstance(self._engine, _PgEngine)
                        else (sqlite3.Error,))
        self._sqlite = isinstance(self._engine, _SqliteEngine)

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions this store's engine raises for a failed statement."""
        return self._errors

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        """All statements inside commit together or not at all."""
        return self._engine.transaction()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self._engine.read(sql, params)

    def _insert_id(self, db: Transaction, sql: str, params: tuple[Any, ...]) -> int:
        """Run an INSERT of one row into a table keyed by ``id``; the new row's id. SQLite
        tells it without RETURNING, whose row costs the statement a second step (a GIL
        hand-over each in the group commit's thread); PostgreSQL returns it."""
        if self._sqlite:
            return int(db.execute(sql, params).lastrowid)  # type: ignore[attr-defined]
        return int(db.execute(sql + " RETURNING id", params).fetchone()[0])

    def _audit(self, db: Transaction, event: str, serial: str | None,
               detail: dict[str, Any], at: str) -> None:
        db.execute("INSERT INTO audit (at, event, serial, detail) VALUES (?, ?, ?, ?)",
                   (at, event, serial, _AUDIT_JSON.encode(detail)))

    # -- sequences ------------------------------------------------------------------------
    def next_cert_serial(self) -> int:
        """The next certificate serial number of this domain (1, 2, ...): unique across every
        registrar sharing the store, as the row update serializes concurrent callers."""
        with self.transaction() as db:
            row = db.execute("UPDATE sequences SET value = value + 1 WHERE name = 'cert_serial' "
                             "RETURNING value").fetchone()
        return int(row[0])

    # -- pledges --------------------------------------------------------------------------
    def pledge_seen(self, serial: str, idevid: bytes | None, state: str) -> None:
        now = _now()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO pledges VALUES (?, ?, ?, ?, ?) ON CONFLICT (serial) DO UPDATE SET "
                "idevid = coalesce(excluded.idevid, pledges.idevid), "
                "last_seen = excluded.last_seen, state = excluded.state",
                (serial, idevid, now, now, state))

    def pledge(self, serial: str) -> dict[str, Any] | None:
        rows = self._read("SELECT serial, idevid, first_seen, last_seen, state FROM pledges "
                          "WHERE serial = ?", (serial,))
        if not rows:
            return None
        keys = ("serial", "idevid", "first_seen", "last_seen", "state")
        return dict(zip(keys, rows[0], strict=True))

    # -- voucher requests and vouchers ----------------------------------------------------
    def add_voucher_request(self, serial: str, pvr_sha256: bytes, pvr: bytes | None,
                            rvr: bytes | None, nonce: str | None, status: str,
                            reason: str | None = None) -> int:
        with self.transaction() as db:
            return self._insert_voucher_request(db, serial, pvr_sha256, pvr, rvr, nonce,
                                                status, reason)

    def _insert_voucher_request(self, db: Transaction, serial: str, pvr_sha256: bytes,
                                pvr: bytes | None, rvr: bytes | None, nonce: str | None,
                                status: str, reason: str | None) -> int:
        now = _now()
        request_id = self._insert_id(
            db, "INSERT INTO voucher_requests (serial, pvr_sha256, pvr, rvr, nonce, received_at,"
            " updated_at, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (serial, pvr_sha256, pvr, rvr, nonce, now, now, status, reason))
        self._audit(db, "voucher-request", serial,
                    {"request": request_id, "status": status, "reason": reason}, now)
        return request_id

    def find_or_add_voucher_request(self, serial: str, pvr_sha256: bytes, pvr: bytes | None,
                                    rvr: bytes | None, nonce: str | None,
                                    status: str) -> int:
        """The id of the record of this exact pledge request: the one already there (a retry
        after 202, perhaps to another registrar of the domain) or a new one. Atomic across
        registrars: the same request arriving at two of them makes one record."""
        with self.transaction() as db:
            self._engine.lock(db, _lock_key("voucher-request", pvr_sha256))
            row = db.execute("SELECT id FROM voucher_requests WHERE pvr_sha256 = ? "
                             "ORDER BY id DESC LIMIT 1", (pvr_sha256,)).fetchone()
            if row is not None:
                return int(row[0])
            return self._insert_voucher_request(db, serial, pvr_sha256, pvr, rvr, nonce,
                                                status, None)

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
        rows = self._read(
            "SELECT id, serial, status, reason, nonce, pvr, rvr FROM voucher_requests "
            "WHERE pvr_sha256 = ? ORDER BY id DESC LIMIT 1", (pvr_sha256,))
        return VoucherRequestRecord(*rows[0]) if rows else None

    def voucher_request(self, request_id: int) -> VoucherRequestRecord | None:
        rows = self._read(
            "SELECT id, serial, status, reason, nonce, pvr, rvr FROM voucher_requests "
            "WHERE id = ?", (request_id,))
        return VoucherRequestRecord(*rows[0]) if rows else None

    def voucher_requests(self, serial: str) -> list[VoucherRequestRecord]:
        rows = self._read(
            "SELECT id, serial, status, reason, nonce, pvr, rvr FROM voucher_requests "
            "WHERE serial = ? ORDER BY id", (serial,))
        return [VoucherRequestRecord(*row) for row in rows]

    def add_voucher(self, serial: str, voucher: bytes, *, request_id: int | None = None,
                    assertion: str | None = None, nonce: str | None = None,
                    domain_id: str | None = None,
                    created_at: datetime.datetime | None = None) -> int:
        """Record a voucher; with ``request_id`` the request is marked vouchered in the same
        transaction, and a request that already has its voucher (two registrars asked the
        MASA for the same retried request) keeps the first: its id is returned."""
        when = utc_text(created_at) if created_at else _now()
        with self.transaction() as db:
            if request_id is not None:
                self._engine.lock(db, _lock_key("voucher", request_id))
                row = db.execute("SELECT id FROM vouchers WHERE request_id = ? ORDER BY id "
                                 "LIMIT 1", (request_id,)).fetchone()
                if row is not None:
                    return int(row[0])
            return self._insert_voucher(db, serial, voucher, request_id, assertion, nonce,
                                        domain_id, when)

    def _insert_voucher(self, db: Transaction, serial: str, voucher: bytes,
                        request_id: int | None, assertion: str | None, nonce: str | None,
                        domain_id: str | None, when: str) -> int:
        voucher_id = self._insert_id(
            db, "INSERT INTO vouchers (serial, request_id, voucher, assertion, nonce, domain_id,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (serial, request_id, voucher, assertion, nonce, domain_id, when))
        if request_id is not None:
            db.execute("UPDATE voucher_requests SET status = 'vouchered', reason = NULL, "
                       "updated_at = ? WHERE id = ?", (when, request_id))
        self._audit(db, "voucher", serial, {"voucher": voucher_id, "request": request_id,
                                            "assertion": assertion, "nonce": nonce,
                                            "domain": domain_id}, when)
        return voucher_id

    def issue_voucher(self, db: Transaction, serial: str, voucher: bytes, *,
                      assertion: str | None, nonce: str | None, domain_id: str | None,
                      created_at: datetime.datetime,
                      claim: tuple[bytes, bytes] | None = None) -> int | None:
        """The MASA's record of a voucher it issues, inside the caller's transaction ``db``
        (one durable commit can carry several). With ``claim`` (SPKI hash, DER of the domain
        CA: trust on first use) the device is claimed for that domain in the same
        transaction; if another domain owns it, nothing is written and None is returned."""
        when = utc_text(created_at)
        if claim is not None and self._claim(db, serial, claim[0], claim[1], when) != claim[0]:
            return None
        return self._insert_voucher(db, serial, voucher, None, assertion, nonce, domain_id,
                                    when)

    def voucher_for_request(self, pvr_sha256: bytes) -> VoucherRecord | None:
        """The voucher already obtained for this exact pledge request (a pledge retrying
        after 202 sends the same signed request, RFC 8995 §5.6)."""
        rows = self._read(
            "SELECT v.id, v.serial, v.request_id, v.voucher, v.assertion, v.nonce, v.domain_id,"
            " v.created_at FROM vouchers v JOIN voucher_requests r ON v.request_id = r.id "
            "WHERE r.pvr_sha256 = ? ORDER BY v.id DESC LIMIT 1", (pvr_sha256,))
        return VoucherRecord(*rows[0]) if rows else None

    def vouchers(self, serial: str | None = None) -> list[VoucherRecord]:
        query = ("SELECT id, serial, request_id, voucher, assertion, nonce, domain_id, "
                 "created_at FROM vouchers")
        rows = (self._read(query + " WHERE serial = ? ORDER BY id", (serial,))
                if serial is not None else self._read(query + " ORDER BY id"))
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
        rows = (self._read(query + " WHERE serial = ? ORDER BY id", (serial,))
                if serial is not None else self._read(query + " ORDER BY id"))
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
        rows = (self._read(query + " WHERE serial = ? ORDER BY issued_at, cert_serial",
                           (serial,))
                if serial is not None else self._read(query + " ORDER BY issued_at, cert_serial"))
        return [CertificateRecord(*row) for row in rows]

    # -- audit ----------------------------------------------------------------------------
    def audit(self, event: str, serial: str | None, **detail: Any) -> None:
        with self.transaction() as db:
            self._audit(db, event, serial, detail, _now())

    def audit_events(self, serial: str | None = None) -> list[AuditRecord]:
        query = "SELECT at, event, serial, detail FROM audit"
        rows = (self._read(query + " WHERE serial = ? ORDER BY id", (serial,))
                if serial is not None else self._read(query + " ORDER BY id"))
        return [AuditRecord(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    # -- MASA ownership (trust on first use) ----------------------------------------------
    def claim_owner(self, serial: str, domain_spki_sha256: bytes,
                    domain_cert: bytes) -> bytes:
        """Record ``domain`` as the owner of ``serial`` unless someone already is; return the
        owner's SPKI hash either way (compare it with yours). Atomic: two domains racing for
        one device cannot both win (the key decides, on either engine)."""
        with self.transaction() as db:
            return self._claim(db, serial, domain_spki_sha256, domain_cert, _now())

    def _claim(self, db: Transaction, serial: str, domain_spki_sha256: bytes,
               domain_cert: bytes, now: str) -> bytes:
        # rowcount, not RETURNING: one step of the statement instead of two (each is a GIL
        # hand-over in the group commit's thread)
        won = db.execute("INSERT INTO owners VALUES (?, ?, ?, ?) ON CONFLICT (serial) "
                         "DO NOTHING",
                         (serial, domain_spki_sha256, domain_cert, now)).rowcount == 1
        if not won:
            row = db.execute("SELECT domain_spki_sha256 FROM owners WHERE serial = ?",
                             (serial,)).fetchone()
            return bytes(row[0])
        self._audit(db, "owner-claimed", serial,
                    {"domain_spki_sha256": domain_spki_sha256.hex()}, now)
        return domain_spki_sha256

    def owner(self, serial: str) -> bytes | None:
        rows = self._read("SELECT domain_spki_sha256 FROM owners WHERE serial = ?", (serial,))
        return bytes(rows[0][0]) if rows else None

    # -- export and import (registrar.store_transfer) -------------------------------------
    def table_rows(self, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and every row of ``table`` (one of ``TABLES``), in key order."""
        if table not in TABLES:
            raise ValueError(f"no table {table!r}")
        with self.transaction() as db:
            cur: Any = db.execute(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")
            columns = [d[0] for d in cur.description]
            return columns, [tuple(r) for r in cur.fetchall()]

    def is_empty(self) -> bool:
        """No record in any table (a new store: the only kind an import goes into)."""
        return all(not self._read(f"SELECT 1 FROM {t} LIMIT 1")
                   for t in TABLES if t != "sequences") and all(
            row[0] == 0 for row in self._read("SELECT value FROM sequences"))

    def load_rows(self, rows: dict[str, tuple[list[str], list[tuple[Any, ...]]]]) -> None:
        """Put exported rows into this empty store, in one transaction; ids are kept and the
        identity counters moved past them."""
        with self.transaction() as db:
            for table in TABLES:
                if table not in rows:
                    continue
                columns, values = rows[table]
                for column in columns:
                    if not column.isidentifier():
                        raise StoreError(f"import: bad column name {column!r} in {table}")
                if table == "sequences":
                    for name, value in values:
                        db.execute("UPDATE sequences SET value = ? WHERE name = ?",
                                   (value, name))
                    continue
                marks = ", ".join("?" * len(columns))
                for value in values:
                    db.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                               tuple(value))
            if self.engine_name == "postgresql":
                for table in IDENTITY_TABLES:
                    db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                               f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")
