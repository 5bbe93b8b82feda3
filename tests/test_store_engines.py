"""The store on both engines (SQLite file, PostgreSQL database of a throw-away cluster):
what must be unique under concurrency comes from the database, a writer killed inside a
transaction leaves nothing, a schema-1 SQLite file (written by the previous release's code,
tests/data/make_store_v1.py) migrates and keeps every record, export/import moves every row
between engines, and the JRC's table works on both."""

from __future__ import annotations

import datetime
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from registrar.cojp_store import CojpStore
from registrar.store import SCHEMA_VERSION, TABLES, Store, StoreError

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
V1_TABLES = ("pledges", "voucher_requests", "vouchers", "telemetry", "certificates", "audit",
             "owners", "cojp_pledges")


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "store.db"
    return request.getfixturevalue("pg_url")


def raw_tables(path: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(path) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in V1_TABLES if t in names}


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "registrar.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, input=stdin)


# -- the previous release's SQLite file ------------------------------------------------------
@pytest.mark.parametrize("role", ["registrar", "masa"])
def test_a_schema_1_sqlite_store_migrates_and_keeps_every_record(tmp_path, role):
    path = tmp_path / f"{role}.db"
    shutil.copy(DATA / f"store-v1-{role}.db", path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    before = raw_tables(path)
    assert sum(len(rows) for rows in before.values()) >= 5
    with Store(path, role) as store:
        after = {t: sorted(store.table_rows(t)[1]) for t in V1_TABLES}
        assert store.next_cert_serial() == 1
    for table in V1_TABLES:
        assert after[table] == sorted(before.get(table, [])), table
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    if role == "registrar":
        with Store(path, role) as store:
            jrc = CojpStore(store).pledge(b"\x01\x02")
            assert (jrc.window_bits, jrc.ssn_reserved, jrc.joins) == (0xFFFFFFFF, 64, 1)
            assert store.pledge("V1-SN0")["state"] == "enrolled"
            assert [v.voucher for v in store.vouchers("V1-SN1")] == [b"voucher1"]


def test_export_then_import_into_each_engine_keeps_every_row(tmp_path, target):
    source = tmp_path / "v1.db"
    shutil.copy(DATA / "store-v1-registrar.db", source)
    out = tmp_path / "export.jsonl"
    done = cli("store", "export", "--store", str(source), str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text().splitlines()[0])["schema_version"] == SCHEMA_VERSION
    done = cli("store", "import", "--store", str(target), str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported ")
    with Store(source, "registrar") as a, Store(target, "registrar") as b:
        for table in TABLES:
            assert a.table_rows(table) == b.table_rows(table), table
        # New rows get ids after the imported ones (PostgreSQL: identity moved past them).
        last = max(r[0] for r in b.table_rows("audit")[1])
        b.audit("after-import", None)
        assert max(r[0] for r in b.table_rows("audit")[1]) == last + 1
    done = cli("store", "check", "--store", str(target))
    assert done.returncode == 0 and f"schema version {SCHEMA_VERSION}" in done.stdout


def test_import_refuses_a_store_with_records_and_a_bad_file(tmp_path, target):
    with Store(target, "registrar") as store:
        store.audit("x", None)
    exported = tmp_path / "e.jsonl"
    assert cli("store", "export", "--store", str(target), str(exported)).returncode == 0
    done = cli("store", "import", "--store", str(target), str(exported))
    assert done.returncode == 1
    assert "is not empty: import only into a new store" in done.stderr
    bad = tmp_path / "bad.jsonl"
    lines = exported.read_text().splitlines()
    bad.write_text(lines[0] + '\n{"table": "nope", "row": {}}\n')
    fresh = tmp_path / "fresh.db"
    done = cli("store", "import", "--store", str(fresh), str(bad))
    assert (done.returncode, done.stderr.strip()) == (
        1, "brski-registrar store: line 2: unknown table 'nope'")
    masa = tmp_path / "masa.db"
    Store(masa, "masa").close()
    done = cli("store", "import", "--store", str(fresh), "-", stdin="{}\n")
    assert "line 1: not a joinproxyd-store-export file" in done.stderr


# -- concurrency: several processes on one store ---------------------------------------------
WORKER = textwrap.dedent("""
    import datetime, hashlib, sys
    from registrar.store import Store
    target, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    later = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    with Store(target, "registrar") as store:
        for i in range(count):
            serial = store.next_cert_serial()
            store.add_certificate(f"{serial:x}", f"{name}-{i}", "CN=x", b"der", later)
            # Every worker sees the same 'retried' pledge requests: one record, one voucher.
            sha = hashlib.sha256(b"pvr%d" % i).digest()
            rid = store.find_or_add_voucher_request(f"SN{i}", sha, b"p", b"r", None, "pending")
            store.add_voucher(f"SN{i}", b"v-" + name.encode(), request_id=rid)
            store.audit("worker", name, i=i)
""")


def test_serials_requests_vouchers_and_audit_are_exact_under_concurrency(target, tmp_path):
    Store(target, "registrar").close()
    workers, count = 3, 40
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(target), f"w{n}", str(count)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
             for n in range(workers)]
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
    with Store(target, "registrar") as store:
        certs = store.certificates()
        assert len(certs) == workers * count
        assert len({c.cert_serial for c in certs}) == workers * count
        assert sorted(int(c.cert_serial, 16) for c in certs) == list(
            range(1, workers * count + 1))
        _, requests = store.table_rows("voucher_requests")
        assert len(requests) == count
        vouchers = store.vouchers()
        assert len(vouchers) == count
        assert len({v.request_id for v in vouchers}) == count
        events = store.audit_events()
        by_event: dict[str, int] = {}
        for e in events:
            by_event[e.event] = by_event.get(e.event, 0) + 1
        assert by_event == {"certificate": workers * count, "voucher-request": count,
                            "voucher": count, "worker": workers * count}
        ids = [r[0] for r in store.table_rows("audit")[1]]
        assert len(set(ids)) == len(ids)


HOLDER = textwrap.dedent("""
    import datetime, sys, time
    from registrar.store import Store
    store = Store(sys.argv[1], "registrar")
    with store.transaction() as db:
        db.execute("INSERT INTO audit (at, event, serial, detail) VALUES ('t', 'half', 'K', '{}')")
        db.execute("UPDATE sequences SET value = value + 1 WHERE name = 'cert_serial'")
        print("inside", flush=True)
        time.sleep(120)
""")


def test_a_writer_killed_inside_a_transaction_leaves_nothing_and_no_lock(target):
    Store(target, "registrar").close()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "inside", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    started = time.monotonic()
    with Store(target, "registrar") as store:
        assert store.audit_events("K") == []
        assert store.next_cert_serial() == 1  # the killed transaction's increment is gone
        store.audit("after", "K")
        assert [e.event for e in store.audit_events("K")] == ["after"]
    assert time.monotonic() - started < 20


def test_two_services_opening_a_new_database_at_once_migrate_it_once(target):
    script = ("import sys; from registrar.store import Store; "
              "Store(sys.argv[1], 'registrar').close()")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    with Store(target, "registrar") as store:
        assert store.table_rows("sequences")[1] == [("cert_serial", 0)]


# -- the JRC's table on both engines ---------------------------------------------------------
def test_the_jrc_table_on_each_engine(target):
    with Store(target, "registrar") as store:
        jrc = CojpStore(store)
        a = jrc.add_pledge(b"\xaa", b"k" * 16)
        b = jrc.add_pledge(b"\xbb", None, edhoc_kid=b"\x2b", edhoc_credential=b"ccs")
        assert a.short_id != b.short_id
        jrc.reserve_ssn(b"\xaa", 96)
        jrc.reserve_ssn(b"\xaa", 64)  # never backwards
        jrc.save_window(b"\xaa", 3, 0xFFFFFFFF)
        jrc.save_join(b"\xaa", b"\x01", b"h" * 32, b"resp", b"\x05", 1)
        got = jrc.pledge(b"\xaa")
        assert (got.ssn_reserved, got.window_bits, got.joins, got.last_response) == (
            96, 0xFFFFFFFF, 1, b"resp")
        assert jrc.pledge_by_edhoc_kid(b"\x2b").pledge_id == b"\xbb"
        assert jrc.remove_pledge(b"\xbb") and not jrc.remove_pledge(b"\xbb")
        assert [e.event for e in store.audit_events()] == [
            "cojp-pledge-added", "cojp-pledge-added", "cojp-join", "cojp-pledge-removed"]


def test_the_cojp_cli_takes_a_store_file_or_url(target):
    """`brski-registrar cojp --store` names either engine, as `store --store` does."""
    added = cli("cojp", "add-pledge", "--store", str(target), "--id", "cc", "--generate-psk")
    assert added.returncode == 0, added.stderr
    listed = cli("cojp", "list", "--store", str(target))
    assert listed.returncode == 0 and "cc" in listed.stdout, listed
    with Store(target, "registrar") as store:
        assert CojpStore(store).pledge(b"\xcc") is not None
    bad = cli("cojp", "list", "--store", "postgresql://nobody@[::1]:1/none")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1, bad


# -- PostgreSQL: what opening checks ---------------------------------------------------------
def test_postgresql_refuses_another_applications_database(pg_cluster):
    import psycopg
    url = pg_cluster.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE things (x int)")
    with pytest.raises(StoreError, match=r"a database of another application \(1 tables"):
        Store(url, "registrar")


def test_postgresql_refuses_the_other_role_and_a_newer_schema(pg_url):
    import psycopg
    Store(pg_url, "masa").close()
    with pytest.raises(StoreError, match="belongs to a masa service, not a registrar"):
        Store(pg_url, "registrar")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    with pytest.raises(StoreError) as info:
        Store(pg_url, "masa")
    assert str(info.value).endswith(
        f"schema version 9 is newer than this masa understands ({SCHEMA_VERSION})")


def test_an_unreachable_server_is_one_line_without_the_password(tmp_path):
    url = f"postgresql://u:secret@/db?host={tmp_path}&port=1&connect_timeout=1"
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        Store(url, "registrar")
    assert str(info.value).startswith("postgresql://(socket)/db: cannot connect to PostgreSQL: ")
    assert "\n" not in str(info.value) and "secret" not in str(info.value)
    assert time.monotonic() - started < 10


def test_the_ca_serial_carries_the_store_sequence(target):
    from registrar.domain_ca import serial_number
    with Store(target, "registrar") as store:
        first, second = store.next_cert_serial(), store.next_cert_serial()
    assert (serial_number(first) >> 64, serial_number(second) >> 64) == (1, 2)
    assert serial_number(1 << 93).bit_length() <= 159
    with pytest.raises(ValueError):
        serial_number(0)


def test_store_url_in_the_configuration(tmp_path):
    from registrar.store_config import load_store_target
    from registrar.tomlconfig import ConfigError, Table
    ok = Table({"store": {"url": "postgresql://brski@db.example/reg"}}, "", tmp_path)
    assert load_store_target(ok, "registrar.db") == "postgresql://brski@db.example/reg"
    both = Table({"store": {"url": "postgresql://x/y", "path": "r.db"}}, "", tmp_path)
    with pytest.raises(ConfigError, match=r"store\.url: give path \(SQLite\) or url"):
        load_store_target(both, "registrar.db")
    mysql = Table({"store": {"url": "mysql://x/y"}}, "", tmp_path)
    with pytest.raises(ConfigError, match=r"store\.url: must start with postgresql://"):
        load_store_target(mysql, "registrar.db")
    assert load_store_target(Table({}, "", tmp_path), "registrar.db") == tmp_path / "registrar.db"


def test_vouchers_without_request_stay_separate(target):
    # The MASA records every voucher it issues (no request id): none is merged away.
    with Store(target, "masa") as store:
        when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        store.add_voucher("S", b"a", created_at=when)
        store.add_voucher("S", b"b", created_at=when)
        assert [v.voucher for v in store.vouchers("S")] == [b"a", b"b"]


def test_a_restarted_server_costs_at_most_one_failed_write(pg_cluster):
    """The pool does not probe connections at checkout: after a server restart a write may
    fail once (rolled back, nothing half-done), a read is retried, and then all works."""
    import psycopg
    url = pg_cluster.new_database()
    with Store(url, "registrar") as store:
        store.audit("before", "R")
        pg_cluster.restart()
        assert [e.event for e in store.audit_events("R")] == ["before"]  # read: retried
        failed = 0
        for i in range(3):
            try:
                store.audit("after", "R", i=i)
            except psycopg.OperationalError:
                failed += 1
        assert failed <= 1
        events = [e.event for e in store.audit_events("R")]
        assert events == ["before"] + ["after"] * (3 - failed)


def test_a_throw_away_cluster_goes_away_with_its_server(monkeypatch):
    import tempfile

    from lab.pgcluster import PgCluster, PgClusterError
    cluster = PgCluster.start()
    pid = int((cluster.data / "postmaster.pid").read_text().splitlines()[0])
    assert Path(f"/proc/{pid}").exists()
    assert (cluster.socket_dir / f".s.PGSQL.{cluster.port}").is_socket()
    cluster.stop()
    assert not cluster.root.exists()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()
    # A failed start (here: initdb refuses an unknown locale) removes its directory too.
    made: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kwargs):
        made.append(Path(real_mkdtemp(**kwargs)))
        return str(made[-1])

    monkeypatch.setattr("lab.pgcluster.tempfile.mkdtemp", mkdtemp)
    real_run = PgCluster._run

    def bad_locale(self, run_as, argv, step):
        return real_run(self, run_as, [a.replace("C.UTF-8", "xx_YY.bogus") for a in argv], step)

    monkeypatch.setattr(PgCluster, "_run", bad_locale)
    with pytest.raises(PgClusterError, match="initdb failed"):
        PgCluster.start()
    assert made and not made[0].exists()


@pytest.mark.parametrize("service", ["registrar", "masa"])
def test_a_service_whose_postgresql_is_unreachable_exits_1_with_one_line(tmp_path, service):
    from lab.registrar_setup import write_configs
    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", "init", str(tmp_path / "pki"),
                           "--serial", "SN-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    url = f"postgresql://brski:hunter2@/brski?host={tmp_path}&port=9"
    tomls = dict(zip(("registrar", "masa"), write_configs(
        tmp_path / "pki", tmp_path / "out", registrar_listen=["[::1]:18443"],
        masa_listen=["[::1]:19443"], store_url=url, masa_store_url=url), strict=True))
    module = "registrar.cli" if service == "registrar" else "registrar.masa_cli"
    done = subprocess.run([sys.executable, "-m", module, "--config", str(tomls[service])],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "postgresql://(socket)/brski: cannot connect to PostgreSQL: " \
        in lines[0], done.stderr
    assert "hunter2" not in done.stderr
    # The store commands say the same, in one line.
    done = subprocess.run([sys.executable, "-m", module, "store", "check", "--config",
                           str(tomls[service])], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 1 and done.stderr.startswith(
        f"brski-{service} store: postgresql://(socket)/brski: cannot connect"), done.stderr


def test_a_voucher_record_claims_once_and_returns_its_row_id_on_each_engine(target):
    """issue_voucher's claim (rowcount) and new row id (lastrowid on SQLite, RETURNING on
    PostgreSQL): the first domain claims and gets ids in order; another domain is refused
    and writes nothing, not even an audit line."""
    when = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
    with Store(target, "masa") as store:
        def issue(body: bytes, spki: bytes) -> int | None:
            with store.transaction() as db:
                return store.issue_voucher(db, "SN-CLAIM", body, assertion="proximity",
                                           nonce="bm9uY2U=", domain_id="d", created_at=when,
                                           claim=(spki, b"cert-" + spki[:1]))
        first = issue(b"v1", b"A" * 32)
        second = issue(b"v2", b"A" * 32)
        assert isinstance(first, int) and second == first + 1
        assert issue(b"v3", b"B" * 32) is None
        assert [v.voucher for v in store.vouchers("SN-CLAIM")] == [b"v1", b"v2"]
        assert [v.id for v in store.vouchers("SN-CLAIM")] == [first, second]
        assert store.owner("SN-CLAIM") == b"A" * 32
        events = [(e.event, e.detail.get("voucher")) for e in store.audit_events("SN-CLAIM")]
        assert events == [("owner-claimed", None), ("voucher", first), ("voucher", second)]
