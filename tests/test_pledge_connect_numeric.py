"""pledge-sim connects to a zoned numeric address without a resolver thread.

asyncio takes ``fe80::1%eth0`` for a name and sends it to getaddrinfo in its thread pool,
which cost a pledge-sim 8 % of its CPU through a proxy (issue 18 item 1). Over real TLS on
loopback: a zoned number must connect with the loop's resolver made to fail, a name must
still go through it.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl

import pytest

from brski.pki import create_test_pki
from pledge_sim.http import _numeric_address, connect


@pytest.fixture(scope="module")
def server_context(tmp_path_factory) -> ssl.SSLContext:
    pki = create_test_pki(datetime.datetime.now(datetime.UTC))
    work = tmp_path_factory.mktemp("numeric")
    (work / "r.crt").write_bytes(pki.registrar.cert_pem())
    (work / "r.key").write_bytes(pki.registrar.key_pem())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(work / "r.crt", work / "r.key")
    return ctx


def _client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _attempt(server_context: ssl.SSLContext, host: str) -> list[str]:
    """Connect to ``host`` (TCP and TLS); returns what the loop was asked to resolve
    (anything it is asked is answered as if it were ::1, where the server listens)."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(echo, "::1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    asked: list[str] = []
    real = loop.getaddrinfo

    async def resolver(host: object, *args: object, **kwargs: object) -> object:
        asked.append(str(host))
        return await real("::1", *args, **kwargs)

    loop.getaddrinfo = resolver  # type: ignore[method-assign]
    try:
        conn = await connect(host, port, _client(), timeout=10)  # TCP and the TLS handshake
        await conn.close()
    finally:
        server.close()
        await server.wait_closed()
    return asked


def test_a_zoned_number_connects_without_the_resolver(server_context):
    # (glibc takes a zone name only on link-local addresses; on ::1 the zone is a number)
    zoned = f"::1%{socket.if_nametoindex('lo')}"
    assert asyncio.run(_attempt(server_context, zoned)) == []


def test_a_name_still_goes_through_the_resolver(server_context):
    assert asyncio.run(_attempt(server_context, "registrar.example")) == ["registrar.example"]


def test_what_counts_as_a_number():
    assert _numeric_address("fe80::1%lo", 8443) == (socket.AF_INET6, ("fe80::1", 8443, 0, 1))
    assert _numeric_address("192.0.2.1", 80) == (socket.AF_INET, ("192.0.2.1", 80))
    assert _numeric_address("registrar.example", 443) is None
    assert _numeric_address("fe80::1%no-such-link", 443) is None  # asyncio says why
