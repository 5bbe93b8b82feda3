"""The SZTP bootstrap server's tables in the registrar's store: bootstrapping records and the
devices' progress reports (RFC 8572 §7.3).

* ``sztp_records``: what a device is given, looked up by its serial number first, then by the
  ``hw-model`` it sent, then the ``default`` record. ``conveyed`` is the yang-data
  conveyed-information as the operator wrote it (RFC 8572 JSON, validated by brski.sztp when
  added and again when served); ``sign``: "always", "never", or "auto" (signed when the device
  sends signed-data-preferred, the RFC 8572 §7.3 rule for untrusted servers);
  ``reporting_level``: minimal or verbose.
* ``sztp_progress``: every report-progress, with the device's serial (its authenticated
  identity) and address.

Like the JRC's tables (cojp_store), they are created on first use beside the registrar's
versioned schema, which they do not touch.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

from brski import sztp

from .store import Store, utc_text

KINDS = ("serial", "model", "default")
SIGN_POLICIES = ("auto", "always", "never")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sztp_records (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    conveyed BLOB NOT NULL,
    sign TEXT NOT NULL,
    reporting_level TEXT NOT NULL,
    added_at TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS sztp_progress (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    serial TEXT NOT NULL,
    progress_type TEXT NOT NULL,
    message TEXT,
    peer TEXT,
    at TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS sztp_progress_serial ON sztp_progress (serial)
"""


class SztpStoreError(Exception):
    """An operator-level problem with a record (bad conveyed information, unknown policy)."""


@dataclass(frozen=True)
class SztpRecord:
    kind: str
    key: str
    conveyed: bytes  # RFC 8572 JSON conveyed-information
    sign: str
    reporting_level: str
    added_at: str

    @property
    def information(self) -> sztp.ConveyedInformation:
        return sztp.decode_conveyed(self.conveyed, "json")


@dataclass(frozen=True)
class ProgressRecord:
    id: int
    serial: str
    progress_type: str
    message: str | None
    peer: str | None
    at: str
    detail: str | None


def _now() -> str:
    return utc_text(datetime.datetime.now(datetime.UTC))


class SztpStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        with store.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def put_record(self, kind: str, key: str, conveyed: bytes, *, sign: str = "auto",
                   reporting_level: str = "minimal") -> SztpRecord:
        if kind not in KINDS:
            raise SztpStoreError(f"record kind {kind!r}: one of {', '.join(KINDS)}")
        if sign not in SIGN_POLICIES:
            raise SztpStoreError(f"sign {sign!r}: one of {', '.join(SIGN_POLICIES)}")
        if reporting_level not in ("minimal", "verbose"):
            raise SztpStoreError(f"reporting-level {reporting_level!r}: minimal or verbose")
        try:
            info = sztp.decode_conveyed(conveyed, "json")
        except (sztp.DecodeError, sztp.ValidationError) as exc:
            raise SztpStoreError(f"conveyed information: {exc}") from exc
        key = "" if kind == "default" else key
        if kind != "default" and not key:
            raise SztpStoreError(f"a {kind} record needs a key")
        canonical = sztp.encode_conveyed(info, "json")
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO sztp_records VALUES (?, ?, ?, ?, ?, ?)",
                       (kind, key, canonical, sign, reporting_level, _now()))
            self.store._audit(db, "sztp-record", key or None,
                              {"kind": kind, "type": info.TOP, "sign": sign}, _now())
        record = self.record(kind, key)
        assert record is not None
        return record

    def remove_record(self, kind: str, key: str) -> bool:
        with self.store.transaction() as db:
            return bool(db.execute("DELETE FROM sztp_records WHERE kind = ? AND key = ?",
                                   (kind, "" if kind == "default" else key)).rowcount)

    def record(self, kind: str, key: str) -> SztpRecord | None:
        with self.store.transaction() as db:
            row = db.execute("SELECT kind, key, conveyed, sign, reporting_level, added_at "
                             "FROM sztp_records WHERE kind = ? AND key = ?",
                             (kind, key)).fetchone()
        return None if row is None else SztpRecord(*row)

    def records(self) -> list[SztpRecord]:
        with self.store.transaction() as db:
            rows = db.execute("SELECT kind, key, conveyed, sign, reporting_level, added_at "
                              "FROM sztp_records ORDER BY kind, key").fetchall()
        return [SztpRecord(*row) for row in rows]

    def lookup(self, serial: str, hw_model: str | None) -> SztpRecord | None:
        """The device's record: by serial, else by hw-model, else the default."""
        return (self.record("serial", serial)
                or (self.record("model", hw_model) if hw_model else None)
                or self.record("default", ""))

    def add_progress(self, serial: str, report: sztp.ReportProgressInput,
                     peer: str | None) -> None:
        detail = None
        if report.trust_anchor_certs or report.ssh_host_keys:
            detail = json.dumps({"trust-anchor-certs": len(report.trust_anchor_certs),
                                 "ssh-host-keys": [a for a, _ in report.ssh_host_keys]})
        with self.store.transaction() as db:
            db.execute("INSERT INTO sztp_progress (serial, progress_type, message, peer, at, "
                       "detail) VALUES (?, ?, ?, ?, ?, ?)",
                       (serial, report.progress_type, report.message, peer, _now(), detail))

    def progress(self, serial: str | None = None) -> list[ProgressRecord]:
        query = "SELECT id, serial, progress_type, message, peer, at, detail FROM sztp_progress"
        args: tuple[str, ...] = ()
        if serial is not None:
            query += " WHERE serial = ?"
            args = (serial,)
        with self.store.transaction() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [ProgressRecord(*row) for row in rows]
