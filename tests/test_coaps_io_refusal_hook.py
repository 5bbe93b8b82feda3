"""coaps_io's ``on_refused`` hook: a server learns of each failed handshake exactly once, with the
session (and so the client's certificate), and the endpoint adds no line of its own."""

import asyncio
import contextlib
import datetime
import logging
import socket

import aiocoap
import pytest

from brski.dtls import DtlsConfig, DtlsSession
from brski.pki import create_test_pki
from coaps_io.aiocoap_dtls import create_client_context, create_server_context

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["P1"])


@pytest.fixture(scope="module")
def rogue():
    return create_test_pki(NOW, manufacturer="Rogue Manufacturer", serials=["R1"])


def client_config(pki, idevid):
    return DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert])


async def serve(pki, refused, **kw):
    config = DtlsConfig(pki.registrar.cert, pki.registrar.key, [pki.manufacturer_ca.cert])
    ctx, endpoint = await create_server_context(None, ("::1", 0), config, **kw)
    endpoint.on_refused = lambda addr, session, detail: refused.append(
        (addr, session.sent_certificate, detail))
    return ctx, endpoint, endpoint.local_address[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def endpoint_lines(caplog, server_port: int) -> list[str]:
    """What the server's endpoint logged (the client's lines name the server's port)."""
    return [r.getMessage() for r in caplog.records if r.name == "coaps_io.endpoint"
            and f"{server_port})" not in r.getMessage()]


def test_unknown_manufacturer_reaches_the_hook_once_with_its_certificate(pki, rogue, caplog):
    refused = []

    async def main():
        server, endpoint, port = await serve(pki, refused)
        client, _ = await create_client_context(client_config(pki, rogue.idevids["R1"]),
                                                bind=("::1", 0))
        try:
            with contextlib.suppress(aiocoap.error.NetworkError):
                await client.request(aiocoap.Message(
                    code=aiocoap.GET, uri=f"coaps://[::1]:{port}/x")).response
            await asyncio.sleep(0.2)
        finally:
            await client.shutdown()
            await server.shutdown()
        return endpoint, port

    with caplog.at_level(logging.INFO, "coaps_io.endpoint"):
        endpoint, port = run(main())
    assert len(refused) == 1 and refused[0][1] == rogue.idevids["R1"].cert, refused
    assert endpoint.drops["handshake-failed"] == 1
    assert endpoint_lines(caplog, port) == []


def test_abandoned_handshake_is_one_refusal_and_no_other_line(pki, caplog):
    refused = []

    async def main():
        server, _, port = await serve(pki, refused, handshake_timeout=1.0)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::1", 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
        try:
            (hello,) = client.datagrams_to_send()
            await loop.sock_sendto(sock, hello, ("::1", port))
            client.receive(await loop.sock_recv(sock, 2048))
            (hello2,) = client.datagrams_to_send()
            await loop.sock_sendto(sock, hello2, ("::1", port))  # then silence
            for _ in range(40):
                await asyncio.sleep(0.1)
                if refused:
                    break
        finally:
            sock.close()
            await server.shutdown()
        return port

    with caplog.at_level(logging.INFO, "coaps_io.endpoint"):
        port = run(main())
    assert len(refused) == 1, refused
    assert endpoint_lines(caplog, port) == []
