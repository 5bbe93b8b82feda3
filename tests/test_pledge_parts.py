"""pledge-sim's small parts: backoff and Retry-After, addresses and GRASP floods, identities,
the HTTP/TLS client (on loopback, no root needed) and the CLI's one-line errors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import grasp
from brski.cli.pki import write_pki
from brski.errors import ProtocolError
from brski.pki import create_test_pki
from pledge_sim import tls
from pledge_sim.discovery import Candidate, DiscoveryError, candidates_from_flood, parse_address
from pledge_sim.http import ClosedBeforeResponse, HttpError, connect
from pledge_sim.identity import (
    IdentityError,
    identities_from_dir,
    identities_from_pki,
    load_anchors,
    load_identity,
)
from pledge_sim.retry import RETRY_AFTER_CAP, Backoff, retry_after_seconds
from pledge_sim.runner import HANGUPS_MEAN_REFUSAL, EnrollResult, PledgeRunner, Settings

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)

# -- backoff and Retry-After ---------------------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets():
    b = Backoff(lambda: 0.5, initial=1, cap=8, jitter=0.25)  # rng 0.5: no jitter
    assert [b.delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    b.reset()
    assert b.delay() == 1


@pytest.mark.parametrize("r", [0.0, 0.999])
def test_backoff_jitter_stays_within_its_spread_and_the_cap(r):
    b = Backoff(lambda: r, initial=4, cap=100, jitter=0.25)
    assert 3 <= b.delay() <= 5
    capped = Backoff(lambda: r, initial=100, cap=100, jitter=0.25)
    assert capped.delay() <= 100


@pytest.mark.parametrize(("value", "seconds"), [
    ("5", 5), ("0", 0), ("61", RETRY_AFTER_CAP), ("86400", RETRY_AFTER_CAP),
    (None, 1.0), ("soon", 1.0), ("-3", 1.0),
    ("Mon, 01 Jun 2026 12:00:30 GMT", 30), ("Mon, 01 Jun 2026 11:00:00 GMT", 0),
])
def test_retry_after_is_read_and_capped_at_60_seconds(value, seconds):
    assert retry_after_seconds(value, NOW) == seconds


# -- addresses and floods ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "host", "port"), [
    ("[fe80::b:2%eth0]:8443", "fe80::b:2%eth0", 8443),
    ("[fd4a:5044::100]:443", "fd4a:5044::100", 443),
    ("registrar.example:8443", "registrar.example", 8443),
    ("127.0.0.1:9", "127.0.0.1", 9),
])
def test_addresses_are_parsed(text, host, port):
    c = parse_address(text)
    assert (c.host, c.port, c.method) == (host, port, "static")


@pytest.mark.parametrize(("text", "words"), [
    ("[fe80::1]:8443", "needs its interface"),
    ("[fe80::1%eth0]", "expected [ipv6%zone]:port"),
    ("[zz::1]:1", "zz::1"),
    ("host", "expected host:port"),
    ("host:0", "port must be"),
    ("host:99999", "port must be"),
])
def test_bad_addresses_get_a_clear_error(text, words):
    with pytest.raises(DiscoveryError, match=words.replace("[", r"\[")):
        parse_address(text)


def fixed_rng(n: int) -> bytes:
    return b"\x01" * n


def test_proxy_flood_gives_a_zoned_link_local_candidate():
    flood = grasp.proxy_flood(fixed_rng, ipaddress.IPv6Address("fe80::1"), 4443)
    (c,) = candidates_from_flood(flood.encode(), "eth0")
    assert (c.host, c.port, c.method) == ("fe80::1%eth0", 4443, "grasp")
    assert c.label == "[fe80::1%eth0]:4443"
    # Without knowing the link, a link-local locator cannot be used.
    assert candidates_from_flood(flood.encode(), None) == []


def test_registrar_flood_counts_only_when_link_local():
    loc = [grasp.IPv6Locator(ipaddress.IPv6Address("fe80::b:2"), grasp.IPPROTO_TCP, 8443),
           grasp.IPv6Locator(ipaddress.IPv6Address("fd4a:5044::100"), grasp.IPPROTO_TCP, 8443),
           grasp.IPv6Locator(ipaddress.IPv6Address("fe80::b:2"), grasp.IPPROTO_UDP, 5684)]
    flood = grasp.registrar_flood(fixed_rng, ipaddress.IPv6Address("fe80::b:2"), loc)
    found = candidates_from_flood(flood.encode(), "eth0")
    assert [(c.host, c.port, c.method) for c in found] == [
        ("fe80::b:2%eth0", 8443, "grasp-registrar")]


@pytest.mark.parametrize("junk", [b"", b"\xff", b"\x83\x01\x02\x03", b"\x00" * 3000])
def test_junk_floods_raise_only_protocol_errors(junk):
    with pytest.raises(ProtocolError):
        candidates_from_flood(junk, "eth0")


# -- identities ----------------------------------------------------------------------------


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    pki = create_test_pki(NOW, serials=["dev-2", "dev-10", "dev-1"])
    write_pki(root, pki, {"masa_url": "masa.example:9443", "manufacturer": "Example Manufacturer",
                          "domain": "Example Domain"})
    return root


def test_pki_identities_are_picked_in_natural_order_then_issued(pki_dir):
    picked = identities_from_pki(pki_dir, count=2)
    assert [i.serial for i in picked] == ["dev-1", "dev-2"]
    more = identities_from_pki(pki_dir, count=5, prefix="sim-")
    assert [i.serial for i in more] == ["dev-1", "dev-2", "dev-10", "sim-0000", "sim-0001"]
    assert (pki_dir / "manufacturer/idevid/sim-0001.crt").exists()
    assert more[3].masa_url == "masa.example:9443"


def test_pki_identities_by_serial(pki_dir):
    (ident,) = identities_from_pki(pki_dir, serials=["dev-10"])
    assert ident.serial == "dev-10"
    (new,) = identities_from_pki(pki_dir, serials=["brand-new"])
    assert new.serial == "brand-new"


def test_not_a_pki_dir_is_refused(tmp_path):
    with pytest.raises(IdentityError, match="not a PKI"):
        identities_from_pki(tmp_path, count=1)


def test_a_key_that_does_not_match_is_refused(pki_dir):
    d = pki_dir / "manufacturer/idevid"
    with pytest.raises(IdentityError, match="does not belong"):
        load_identity(d / "dev-1.crt", d / "dev-2.key")


def test_identity_dir_needs_pairs(pki_dir, tmp_path):
    assert len(identities_from_dir(pki_dir / "manufacturer/idevid")) == 3
    with pytest.raises(IdentityError, match=r"no NAME\.crt"):
        identities_from_dir(tmp_path)


# -- the HTTP client over real TLS on loopback ---------------------------------------------


class Server:
    """A TLS server on ::1 that answers each request with the next canned reply."""

    def __init__(self, pki_dir: Path, replies: list[bytes]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki_dir / "domain/registrar.crt",
                                     pki_dir / "domain/registrar.key")
        self.replies = replies
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                self.requests.append(head + await reader.readexactly(length))
                writer.write(self.replies.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "::1", 0, ssl=self.context)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def client_context(pki_dir: Path) -> ssl.SSLContext:
    d = pki_dir / "manufacturer/idevid"
    return tls.provisional_context(d / "dev-1.crt", d / "dev-1.key")


def test_client_reads_lengths_chunks_and_keeps_the_connection(pki_dir):
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello",
        b"HTTP/1.1 202 Accepted\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]

    async def go() -> None:
        server = Server(pki_dir, list(replies))
        async with server as port:
            conn = await connect("::1", port, client_context(pki_dir))
            a = await conn.request("POST", "/x", body=b"payload",
                                   headers={"Content-Type": "text/plain"})
            assert (a.status, a.body, a.header("x-a")) == (200, b"hello", "1, 2")
            b = await conn.request("GET", "/y")
            assert (b.status, b.body, b.header("Retry-After")) == (202, b"abcde", "7")
            assert conn.reusable  # one connection for all three requests
            c = await conn.request("GET", "/z")
            assert (c.status, c.body) == (204, b"")
            assert len(server.requests) == 3 and server.requests[0].endswith(b"payload")
            await conn.close()

    asyncio.run(go())


def test_client_keeps_the_servers_certificate(pki_dir):
    registrar = x509.load_pem_x509_certificate((pki_dir / "domain/registrar.crt").read_bytes())

    async def go() -> bytes | None:
        async with Server(pki_dir, []) as port:
            conn = await connect("::1", port, client_context(pki_dir))
            cert = conn.peer_cert_der
            await conn.close()
            return cert

    assert asyncio.run(go()) == registrar.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("reply", [
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
    b"",
])
def test_client_turns_broken_responses_into_http_errors(pki_dir, reply):
    async def go() -> None:
        async with Server(pki_dir, [reply]) as port:
            conn = await connect("::1", port, client_context(pki_dir))
            with pytest.raises(HttpError):
                await conn.request("GET", "/", timeout=3)
            assert not conn.reusable
            await conn.close()

    asyncio.run(go())


def test_pinned_context_refuses_a_server_outside_the_pin(pki_dir, tmp_path):
    other = create_test_pki(NOW, domain="Elsewhere")
    d = pki_dir / "manufacturer/idevid"

    async def go(pin) -> None:  # type: ignore[no-untyped-def]
        async with Server(pki_dir, []) as port:
            conn = await connect("::1", port, tls.pinned_context(
                d / "dev-1.crt", d / "dev-1.key", pin, trusted_clock=True))
            await conn.close()

    domain_ca = x509.load_pem_x509_certificate((pki_dir / "domain/ca.crt").read_bytes())
    registrar = x509.load_pem_x509_certificate((pki_dir / "domain/registrar.crt").read_bytes())
    asyncio.run(go(domain_ca))  # the domain CA as pin: the registrar chains to it
    asyncio.run(go(registrar))  # the registrar's own (non-CA) certificate as pin: also fine
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(go(other.domain_ca.cert))


def test_a_hangup_right_after_the_handshake_is_told_apart(pki_dir):
    async def go() -> None:
        async with Server(pki_dir, []) as port:  # no replies: it closes at once
            conn = await connect("::1", port, client_context(pki_dir))
            with pytest.raises(ClosedBeforeResponse) as caught:
                await conn.request("GET", "/", timeout=3)
            assert caught.value.first
            await conn.close()

    asyncio.run(go())


def test_runner_takes_repeated_hangups_for_a_refusal_not_an_outage(pki_dir, tmp_path):
    (ident,) = identities_from_pki(pki_dir, serials=["dev-1"])
    anchors = load_anchors(pki_dir / "masa/ca.crt")
    settings = Settings(anchors=anchors, out_dir=tmp_path, deadline=20, backoff_initial=0.05,
                        backoff_cap=0.1)

    async def go() -> EnrollResult:
        async with Server(pki_dir, []) as port:
            return await PledgeRunner(ident, [Candidate("::1", port, "static")], settings).run()

    result = asyncio.run(go())
    assert not result.ok and result.code == "tls-refused"
    assert result.attempts == HANGUPS_MEAN_REFUSAL
    assert "does not accept this pledge's IDevID" in result.reason


# -- the command line ----------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pledge_sim.cli", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("args", "line"), [
    (["enroll"], "pledge-sim: give exactly one of --pki, --idevid (with --key), --idevid-dir"),
    (["enroll", "--idevid", "/nonexistent.crt", "--key", "/x", "--masa-ca", "/y"],
     "pledge-sim: /nonexistent.crt: cannot load IDevID"),
    (["enroll", "--pki", "/nonexistent", "--count", "1"],
     "pledge-sim: /nonexistent: not a PKI made by 'brski-pki init'"),
    (["enroll", "--pki", "/nonexistent", "--serial", "a", "--count", "1"],
     "pledge-sim: --serial and --count exclude each other"),
])
def test_cli_usage_errors_are_one_line(args, line):
    done = cli(*args)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(line)
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_bad_registrar_address_is_one_line(pki_dir):
    done = cli("enroll", "--pki", str(pki_dir), "--count", "1", "--registrar", "[fe80::1]:1")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "pledge-sim: '[fe80::1]:1': a link-local address needs its interface, "
        "as in [fe80::1%eth0]:8443"]


def test_cli_unreachable_registrar_fails_with_the_reason(pki_dir, tmp_path):
    # Nothing listens on [::1]:1: the pledge retries until its deadline, then says why.
    done = cli("enroll", "--pki", str(pki_dir), "--count", "1", "--registrar", "[::1]:1",
               "--deadline", "2", "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert "FAILED (deadline)" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pledge-sim: dev-1 failed: gave up after 2 s; last: [::1]:1:")
    assert last.endswith("connection refused")
