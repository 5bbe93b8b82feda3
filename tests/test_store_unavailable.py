"""A store out of reach is the server's passing trouble, not the client's nor a bug: HTTPS
answers 503 with Retry-After, CoAPS 5.03 with Max-Age, SZTP a RESTCONF 503 with Retry-After;
each is logged (a flood only by its first lines) and counted as "store-unavailable". Any
other exception stays a 500. The errors are real ones: a SQLite file locked by another
connection, a PostgreSQL server that does not answer."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from registrar.metrics import ServiceMetrics
from registrar.store import Store, unavailable
from registrar.web import METRICS, RETRY_AFTER, STORE_UNAVAILABLE, new_application


def locked_error(tmp_path: Path) -> sqlite3.OperationalError:
    """What a write meets while another connection holds the file's write lock."""
    path = tmp_path / "locked.db"
    Store(path, "registrar").close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    writer = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        writer.close()
        holder.close()
    raise AssertionError("the second writer was not refused")


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def test_what_counts_as_unavailable(tmp_path: Path) -> None:
    import psycopg
    locked = locked_error(tmp_path)
    assert "locked" in str(locked) and unavailable(locked)
    with pytest.raises(psycopg.OperationalError) as down:  # nothing listens there
        psycopg.connect(f"postgresql://nobody@[::1]:{free_port()}/none", connect_timeout=2)
    assert unavailable(down.value)
    from psycopg_pool import PoolTimeout
    assert unavailable(PoolTimeout("couldn't get a connection after 15.00 sec"))
    # A constraint or a programming error is ours to fix: a 500, not "retry later".
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (k PRIMARY KEY)")
    db.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as dup:
        db.execute("INSERT INTO t VALUES (1)")
    assert not unavailable(dup.value)
    assert not unavailable(psycopg.errors.UndefinedTable("relation does not exist"))
    assert not unavailable(ValueError("store"))


def serve_once(raise_this: BaseException, requests: int = 1,
               retry_after: int | None = None) -> tuple[list[tuple[int, str, str | None]],
                                                          ServiceMetrics]:
    metrics = ServiceMetrics("registrar")

    async def handler(request: web.Request) -> web.Response:
        raise raise_this

    async def run() -> list[tuple[int, str, str | None]]:
        app = new_application()
        app[METRICS] = metrics
        if retry_after is not None:
            app[RETRY_AFTER] = retry_after
        app.router.add_post("/.well-known/est/simpleenroll", handler)
        async with TestClient(TestServer(app)) as client:
            out = []
            for _ in range(requests):
                response = await client.post("/.well-known/est/simpleenroll", data=b"x")
                out.append((response.status, await response.text(),
                            response.headers.get("Retry-After")))
            return out
    return asyncio.run(run()), metrics


def refused(metrics: ServiceMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value(
        "brski_registrar_refusals_total",
        {"endpoint": "simpleenroll", "reason": reason}) or 0.0


def test_https_answers_503_with_retry_after_logged_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="registrar.web")
    answers, metrics = serve_once(locked_error(tmp_path), requests=6, retry_after=7)
    assert answers == [(503, "the store is unavailable; retry in 7 s\n", "7")] * 6
    assert refused(metrics, STORE_UNAVAILABLE) == 6
    lines = [r for r in caplog.records if "store is unavailable" in r.getMessage()]
    assert 1 <= len(lines) <= 3 and lines[0].levelno == logging.ERROR  # a flood: first lines
    assert "OperationalError: database is locked" in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)  # an outage is no traceback


def test_any_other_exception_stays_a_logged_500() -> None:
    answers, metrics = serve_once(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert answers == [(500, "internal error (logged at the server)\n", None)]
    assert refused(metrics, STORE_UNAVAILABLE) == 0


def test_the_default_retry_after_without_the_registrar_config(tmp_path: Path) -> None:
    answers, _ = serve_once(locked_error(tmp_path))  # the MASA's app sets no RETRY_AFTER
    assert answers[0][0] == 503 and answers[0][2] == "5"


def test_coaps_answers_5_03_with_max_age(tmp_path: Path) -> None:
    """The CoAPS front door's own mapping (registrar/coaps.py), on one resource: the
    registrar behind it only needs its configuration for this path."""
    from types import SimpleNamespace

    import aiocoap
    from aiocoap import Code

    from registrar.coaps import CoapsRegistrar
    metrics = ServiceMetrics("registrar")
    registrar = SimpleNamespace(config=SimpleNamespace(retry_after=9, manufacturer_cas=(),
                                                       ca_cert=None), now=lambda: None)
    coaps = CoapsRegistrar(registrar, metrics)  # type: ignore[arg-type]
    enroll = coaps.resources[(".well-known", "est", "sen")]
    error = locked_error(tmp_path)

    async def failing(request: aiocoap.Message, client: object) -> aiocoap.Message:
        raise error

    async def bug(request: aiocoap.Message, client: object) -> aiocoap.Message:
        raise KeyError("a bug")

    answer = asyncio.run(enroll._render(aiocoap.Message(code=Code.POST, payload=b"x"), failing))
    assert (answer.code, answer.opt.max_age) == (Code.SERVICE_UNAVAILABLE, 9)
    assert answer.payload == b"the store is unavailable; retry in 9 s"
    assert metrics.registry.get_sample_value("brski_registrar_refusals_total", {
        "endpoint": "sen", "reason": STORE_UNAVAILABLE}) == 1
    answer = asyncio.run(enroll._render(aiocoap.Message(code=Code.POST, payload=b"x"), bug))
    assert answer.code == Code.INTERNAL_SERVER_ERROR


def test_sztp_answers_a_restconf_503_with_retry_after(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from registrar.sztp_server import SztpServer
    metrics = ServiceMetrics("sztp")
    server = SztpServer(SimpleNamespace(encoding="json"), None, None, metrics)  # type: ignore[arg-type]
    error = locked_error(tmp_path)

    async def failing(request: web.Request) -> web.Response:
        raise error

    async def run() -> tuple[int, str, str | None]:
        app = server.app()
        app.router.add_post("/restconf/operations/ietf-sztp-bootstrap-server:report-progress-x",
                            failing)
        async with TestClient(TestServer(app)) as client:
            response = await client.post(
                "/restconf/operations/ietf-sztp-bootstrap-server:report-progress-x",
                data=b"{}", headers={"Content-Type": "application/yang-data+json"})
            return response.status, await response.text(), response.headers.get("Retry-After")
    status, body, retry = asyncio.run(run())
    assert (status, retry) == (503, "5"), body
    assert "resource-denied" in body and "store is unavailable" in body
