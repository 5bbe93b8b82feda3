"""The registrar/MASA store: persistence across reopen and kill, file and schema checks.
The engine-independent tests run on SQLite and on PostgreSQL (``target``); the rest check
SQLite's file handling (tests/test_store_engines.py: concurrency, migration, export/import)."""

import datetime
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from registrar.store import APPLICATION_ID, SCHEMA_VERSION, Store, StoreError

NOW = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    """Where a new store goes: an SQLite file, or an empty database of the session's
    throw-away PostgreSQL cluster."""
    if request.param == "sqlite":
        return tmp_path / "store.db"
    return request.getfixturevalue("pg_url")


def fill(store: Store) -> None:
    store.pledge_seen("SN1", b"idevid-der", "voucher-requested")
    rid = store.add_voucher_request("SN1", b"h" * 32, b"pvr", b"rvr", "bm9uY2U=", "pending")
    store.add_voucher("SN1", b"voucher", request_id=rid, assertion="proximity",
                      nonce="bm9uY2U=")
    store.add_telemetry("SN1", "voucher_status", b"{}", version=1, status=True, reason=None,
                        client_cert_matches=True)
    store.add_certificate("abc123", "SN1", "CN=x", b"der", NOW + datetime.timedelta(days=1))


def test_everything_written_is_there_after_reopen(target):
    path = target
    with Store(path, "registrar") as store:
        fill(store)
    with Store(path, "registrar") as store:
        assert store.pledge("SN1")["state"] == "enrolled"
        assert store.voucher_for_request(b"h" * 32).voucher == b"voucher"
        [request] = store.voucher_requests("SN1")
        assert (request.status, request.pvr, request.rvr) == ("vouchered", b"pvr", b"rvr")
        assert [t.kind for t in store.telemetry("SN1")] == ["voucher_status"]
        assert store.certificates("SN1")[0].cert_serial == "abc123"
        events = [e.event for e in store.audit_events("SN1")]
        assert events == ["voucher-request", "voucher", "voucher_status", "certificate"]


def test_a_killed_writer_loses_no_committed_change(target):
    path = target
    # Commit, then die without closing anything (os._exit skips every finaliser).
    script = textwrap.dedent(f"""
        import os
        from registrar.store import Store
        store = Store({str(path)!r}, "registrar")
        store.pledge_seen("SN9", None, "voucher-requested")
        store.add_voucher("SN9", b"v", assertion="logged")
        os._exit(9)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr
    with Store(path, "registrar") as store:
        assert store.pledge("SN9") is not None
        assert [v.voucher for v in store.vouchers("SN9")] == [b"v"]


def test_a_failed_transaction_leaves_nothing(target):
    with Store(target, "registrar") as store:
        with pytest.raises(RuntimeError), store.transaction() as db:
            db.execute("INSERT INTO audit (at, event, serial, detail) VALUES ('t', 'e', 'S', '{}')")
            raise RuntimeError("boom")
        assert store.audit_events("S") == []


def test_newer_schema_is_refused_with_both_versions(tmp_path):
    path = tmp_path / "registrar.db"
    Store(path, "registrar").close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 7")
    with pytest.raises(StoreError) as info:
        Store(path, "registrar")
    assert str(info.value) == (f"registrar.db: schema version 7 is newer than this registrar "
                               f"understands ({SCHEMA_VERSION})")


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "registrar.db"
    path.write_bytes(b"this is a text file, not SQLite" * 10)
    with pytest.raises(StoreError, match=r"registrar.db: not an SQLite database"):
        Store(path, "registrar")


def test_another_applications_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE things (x)")
    with pytest.raises(StoreError, match="another application"):
        Store(path, "registrar")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA application_id = 1234")
    with pytest.raises(StoreError, match="application_id 0x4d2"):
        Store(path, "registrar")


def test_the_masa_file_is_not_opened_by_a_registrar(tmp_path):
    path = tmp_path / "masa.db"
    Store(path, "masa").close()
    with pytest.raises(StoreError, match=r"masa\.db: belongs to a masa service, not a registrar"):
        Store(path, "registrar")


def test_a_new_file_carries_our_application_id_and_version(tmp_path):
    path = tmp_path / "masa.db"
    Store(path, "masa").close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_first_owner_wins_and_is_remembered(target):
    path = target
    with Store(path, "masa") as store:
        assert store.claim_owner("SN1", b"A" * 32, b"certA") == b"A" * 32
        assert store.claim_owner("SN1", b"B" * 32, b"certB") == b"A" * 32
    with Store(path, "masa") as store:
        assert store.owner("SN1") == b"A" * 32
        assert store.owner("SN2") is None


def test_a_directory_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a regular file"):
        Store(tmp_path, "registrar")
