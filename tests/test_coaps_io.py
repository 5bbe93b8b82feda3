"""coaps_io: aiocoap over certificate DTLS on loopback, against itself and against libcoap."""

import asyncio
import datetime
import os
import shutil
import socket
import subprocess

import aiocoap
import aiocoap.resource as resource
import pytest

from brski.dtls import DtlsConfig, DtlsSession
from brski.pki import create_test_pki
from coaps_io.aiocoap_dtls import create_client_context, create_server_context

NOW = datetime.datetime.now(datetime.UTC)
# Deterministic and larger than several 512-byte blocks, so block-wise has to happen.
BIG = bytes((i * 7 + i // 251) % 256 for i in range(3000))


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["P1", "P2"])


@pytest.fixture(scope="module")
def rogue():
    return create_test_pki(NOW, manufacturer="Rogue Manufacturer", serials=["R1"])


class Big(resource.Resource):
    def __init__(self):
        super().__init__()
        self.requests = 0
        self.peers = []

    async def render_get(self, request):
        self.requests += 1
        self.peers.append(request.remote.peer_certificate)
        return aiocoap.Message(payload=BIG, content_format=42)


def site_with_big():
    big = Big()
    site = resource.Site()
    site.add_resource(["big"], big)
    return site, big


def server_config(pki):
    return DtlsConfig(pki.registrar.cert, pki.registrar.key, [pki.manufacturer_ca.cert])


def client_config(pki, idevid):
    return DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert])


async def serve(pki, **kw):
    site, big = site_with_big()
    ctx, endpoint = await create_server_context(site, ("::1", 0), server_config(pki), **kw)
    return ctx, endpoint, big, endpoint.local_address[1]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_aiocoap_client_gets_blockwise_resource_over_certificate_dtls(pki):
    async def main():
        server, endpoint, big, port = await serve(pki)
        client, _ = await create_client_context(client_config(pki, pki.idevids["P1"]),
                                                bind=("::1", 0))
        try:
            request = aiocoap.Message(code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")
            response = await client.request(request).response
            second = await client.request(
                aiocoap.Message(code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")).response
        finally:
            await client.shutdown()
            await server.shutdown()
        return response, second, big, endpoint

    response, second, big, endpoint = run(main())
    assert response.code == aiocoap.CONTENT and response.payload == BIG
    assert second.payload == BIG
    # 3000 bytes in 512-byte blocks: 6 block requests per GET (aiocoap renders once per
    # GET and serves the blocks), all over one session.
    assert big.requests == 2
    assert endpoint.records_received == 12
    assert endpoint.handshakes == 1
    assert big.peers[0] == pki.idevids["P1"].cert


def test_unknown_manufacturer_refused_in_handshake_and_server_keeps_serving(pki, rogue):
    async def main():
        server, endpoint, _, port = await serve(pki)
        bad, _ = await create_client_context(client_config(pki, rogue.idevids["R1"]),
                                             bind=("::1", 0))
        good, _ = await create_client_context(client_config(pki, pki.idevids["P2"]),
                                              bind=("::1", 0))
        try:
            with pytest.raises(aiocoap.error.NetworkError) as refused:
                await bad.request(aiocoap.Message(
                    code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")).response
            # The client learnt why from the server's alert.
            assert "alert unknown ca" in str(refused.value.__cause__)
            ok = await good.request(aiocoap.Message(
                code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")).response
        finally:
            await bad.shutdown()
            await good.shutdown()
            await server.shutdown()
        return ok, endpoint

    ok, endpoint = run(main())
    assert ok.payload == BIG
    assert endpoint.drops["handshake-failed"] == 1
    assert endpoint.handshakes == 1


def raw_client_hellos(pki, count):
    hellos = []
    for _ in range(count):
        (hello,) = DtlsSession.client(client_config(pki, pki.idevids["P1"])).datagrams_to_send()
        hellos.append(hello)
    return hellos


def test_client_hello_flood_and_garbage_leave_no_state(pki):
    async def main():
        server, endpoint, _, port = await serve(pki)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::1", 0))
        sock.settimeout(2)
        answers = []
        try:
            for hello in raw_client_hellos(pki, 40):
                sock.sendto(hello, ("::1", port))
            for junk in (b"", b"\x16\xfe\xfd", os.urandom(300), b"\x17" * 50):
                sock.sendto(junk, ("::1", port))
            await asyncio.sleep(0.5)
            sock.setblocking(False)
            while True:
                try:
                    answers.append(sock.recv(2048))
                except BlockingIOError:
                    break
            peers_after = len(endpoint.peers)
        finally:
            sock.close()
            await server.shutdown()
        return endpoint, answers, peers_after

    endpoint, answers, peers_after = run(main())
    assert peers_after == 0
    assert endpoint.drops["no-cookie"] == 40
    assert endpoint.drops["garbage"] == 4
    # Every ClientHello got a HelloVerifyRequest (handshake type 3) and nothing else.
    assert len(answers) == 40 and all(a[13] == 3 for a in answers)


def test_session_limit_counts_table_full(pki):
    async def main():
        server, endpoint, _, port = await serve(pki, max_sessions=1)
        first, _ = await create_client_context(client_config(pki, pki.idevids["P1"]),
                                               bind=("::1", 0))
        second, second_endpoint = await create_client_context(
            client_config(pki, pki.idevids["P2"]), bind=("::1", 0))
        try:
            ok = await first.request(aiocoap.Message(
                code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")).response
            peer = second_endpoint.connect(("::1", port, 0, 0),
                                           client_config(pki, pki.idevids["P2"]), timeout=2.5)
            with pytest.raises(TimeoutError):
                await peer
        finally:
            await first.shutdown()
            await second.shutdown()
            await server.shutdown()
        return ok, endpoint

    ok, endpoint = run(main())
    assert ok.payload == BIG
    assert endpoint.drops["table-full"] >= 1  # the second client's ClientHello and its resends
    assert endpoint.handshakes == 1


def test_rebooted_client_from_the_same_address_gets_a_new_session(pki):
    """A client that lost its session state handshakes again from the same address."""
    async def main():
        server, endpoint, _, port = await serve(pki)
        client, client_endpoint = await create_client_context(
            client_config(pki, pki.idevids["P1"]), bind=("::1", 0))
        uri = f"coaps://[::1]:{port}/big"
        try:
            first = await client.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
            client_endpoint.peers.clear()  # the "reboot": no close_notify, state gone
            second = await client.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
        finally:
            await client.shutdown()
            await server.shutdown()
        return first, second, endpoint

    first, second, endpoint = run(main())
    assert first.payload == second.payload == BIG
    assert endpoint.handshakes == 2 and endpoint.drops["handshake-failed"] == 0


def test_abandoned_handshake_is_retransmitted_then_expired_and_counted(pki):
    """A client that proves its address and then goes silent: the server resends its flight
    on its DTLS timer, and drops the half-open session after the handshake timeout."""
    async def main():
        server, endpoint, _, port = await serve(pki, handshake_timeout=2.5)
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
            await loop.sock_sendto(sock, hello2, ("::1", port))
            await asyncio.sleep(0.3)
            during = len(endpoint.peers)
            received = []
            for _ in range(20):
                try:
                    received.append(await asyncio.wait_for(loop.sock_recv(sock, 2048), 0.25))
                except TimeoutError:
                    if len(endpoint.peers) == 0:
                        break
            after = len(endpoint.peers)
        finally:
            sock.close()
            await server.shutdown()
        return during, after, received, endpoint

    during, after, received, endpoint = run(main())
    assert (during, after) == (1, 0)
    first_flight = [d for d in received if d[0] == 22]
    # The flight came at least twice: once at once, once after the 1 s DTLS timer.
    server_hellos = [d for d in first_flight if d[13] == 2]
    assert len(server_hellos) >= 2, [d[:14].hex() for d in received]
    assert endpoint.drops["handshake-failed"] == 1 and endpoint.handshakes == 0


def test_idle_sessions_expire(pki):
    async def main():
        server, endpoint, _, port = await serve(pki, idle_timeout=0.4)
        client, _ = await create_client_context(client_config(pki, pki.idevids["P1"]),
                                                bind=("::1", 0))
        try:
            await client.request(aiocoap.Message(
                code=aiocoap.GET, uri=f"coaps://[::1]:{port}/big")).response
            during = len(endpoint.peers)
            await asyncio.sleep(1.0)
            after = len(endpoint.peers)
        finally:
            await client.shutdown()
            await server.shutdown()
        return during, after

    during, after = run(main())
    assert (during, after) == (1, 0)


# --- libcoap's coap-client-openssl as the independent peer ----------------------------------

COAP_CLIENT = shutil.which("coap-client-openssl")


def write_pem(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def libcoap_get(tmp_path, issued, ca, port, *extra):
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    cert = write_pem(tmp_path, "client.pem", issued.cert_pem())
    key = write_pem(tmp_path, "client.key", issued.key_pem())
    anchor = write_pem(tmp_path, "ca.pem", ca.cert_pem())
    out = tmp_path / "out.bin"
    out.unlink(missing_ok=True)
    cmd = [COAP_CLIENT, "-m", "get", "-b", "512", "-B", "20", "-c", cert, "-j", key,
           "-C", anchor, "-o", str(out), *extra, f"coaps://[::1]:{port}/big"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=40), out


@pytest.mark.parametrize("with_rogue", [False, True], ids=["idevid", "unknown-ca"])
def test_libcoap_client_against_aiocoap_server(pki, rogue, tmp_path, with_rogue):
    async def main():
        server, endpoint, big, port = await serve(pki)
        try:
            issued = rogue.idevids["R1"] if with_rogue else pki.idevids["P1"]
            proc, out = await asyncio.to_thread(
                libcoap_get, tmp_path, issued, pki.domain_ca, port)
        finally:
            await server.shutdown()
        return proc, out, endpoint, big

    proc, out, endpoint, big = run(main())
    text = proc.stdout + proc.stderr
    if with_rogue:
        # libcoap exits 0 on many failures: judge by its output and by what the server saw.
        assert not out.exists() or out.read_bytes() == b""
        assert endpoint.drops["handshake-failed"] == 1 and endpoint.handshakes == 0
        assert "alert unknown ca" in text.lower(), text
    else:
        assert out.read_bytes() == BIG, text
        assert endpoint.handshakes == 1 and endpoint.records_received == 6
        assert big.peers[0] == pki.idevids["P1"].cert


COAP_SERVER = shutil.which("coap-server-openssl")


def free_udp_port_pair():
    """A port P with P and P+1 free on ::1 (libcoap serves DTLS on P+1)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as first:
            first.bind(("::1", 0))
            port = first.getsockname()[1]
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as second:
                try:
                    second.bind(("::1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no free UDP port pair on ::1")


def test_aiocoap_client_against_libcoap_server_blockwise_both_ways(pki, tmp_path):
    """PUT 3000 bytes (Block1) to libcoap's server, GET them back (Block2), over our DTLS."""
    assert COAP_SERVER, "coap-server-openssl missing: make setup installs libcoap3-bin"
    cert = write_pem(tmp_path, "registrar.pem", pki.registrar.cert_pem())
    key = write_pem(tmp_path, "registrar.key", pki.registrar.key_pem())
    anchor = write_pem(tmp_path, "manufacturer.pem", pki.manufacturer_ca.cert_pem())
    port = free_udp_port_pair()
    server = subprocess.Popen(
        [COAP_SERVER, "-A", "::1", "-p", str(port), "-d", "4", "-c", cert, "-j", key,
         "-C", anchor],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    async def main():
        ctx, endpoint = await create_client_context(client_config(pki, pki.idevids["P1"]),
                                                    bind=("::1", 0))
        uri = f"coaps://[::1]:{port + 1}/blob"
        try:
            for _ in range(50):  # until libcoap listens
                try:
                    await endpoint.connect(("::1", port + 1, 0, 0),
                                           client_config(pki, pki.idevids["P1"]), timeout=0.5)
                    break
                except TimeoutError:
                    await asyncio.sleep(0.1)
            put = await ctx.request(aiocoap.Message(code=aiocoap.PUT, uri=uri,
                                                    payload=BIG)).response
            got = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
        finally:
            await ctx.shutdown()
        return put, got, endpoint

    try:
        put, got, endpoint = run(main())
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0]
    assert put.code == aiocoap.CREATED, output
    assert got.code == aiocoap.CONTENT and got.payload == BIG, output
    assert endpoint.handshakes == 1
    # Block-wise both ways: 3000 bytes are six 512-byte blocks each way (two messages would
    # mean none); libcoap answers the last Block1 without the option, so not exactly 12.
    assert endpoint.records_sent >= 10 and endpoint.records_received >= 10
