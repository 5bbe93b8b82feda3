"""Certificate-DTLS handshakes per second through our stack, against bare pyOpenSSL.

    .venv/bin/python bench/dtls_handshake.py [--seconds 1.0] [--rounds 3] [--quick]

One handshake = a pledge (its IDevID as client certificate) and a registrar (verifying it against
the manufacturer CA) completing DTLS 1.2 with ``TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8`` on P-256
certificates from ``brski.pki.create_test_pki``, the HelloVerifyRequest cookie round included.
Both ends run in this one process, so every figure is the cost of both sides together.

* ``bare pyOpenSSL``: two ``SSL.Connection`` objects on memory BIOs, configured like
  ``brski.dtls`` (same suite, certificates, anchors, verification, no tickets) but nothing else:
  ``DTLSv1_listen`` with a fixed-key HMAC cookie, each side's output handed whole to the other.
* ``brski.dtls memory``: :class:`brski.dtls.DtlsServer` / :class:`~brski.dtls.DtlsSession`
  pumped in memory: rotating cookie secrets, records split and packed into 1024-byte datagrams.
* ``coaps_io UDP + GET``: an aiocoap server context (``coaps_io.aiocoap_dtls``) on ``[::1]``,
  and per handshake a fresh aiocoap client context that performs one GET of a 2-byte resource
  over a real UDP socket and is shut down: the cost of a short constrained exchange as a pledge
  sees it, CoAP and asyncio included.

Each round runs every case for ``--seconds``, the order rotated between rounds, so a burst of
load from elsewhere on this shared machine hits them alike; the ratios project/bare are paired
within a round and their median (min-max) is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import hmac
import statistics
import sys
import time
from collections.abc import Callable

import aiocoap
import aiocoap.resource as resource
from OpenSSL import SSL, crypto

from brski.dtls import (
    DEFAULT_CIPHERS,
    DEFAULT_MTU,
    DTLS1_2_VERSION,
    DtlsConfig,
    DtlsServer,
    DtlsSession,
)
from brski.pki import TestPki, create_test_pki
from coaps_io.aiocoap_dtls import create_client_context, create_server_context

BARE = "bare pyOpenSSL"
MEMORY = "brski.dtls memory"
COAPS = "coaps_io UDP + GET"
CASES = (BARE, MEMORY, COAPS)
PEER = b"[::1]:40000"
MAX_FLIGHTS = 20
EXPECTED_SUITE = "ECDHE-ECDSA-AES128-CCM8"  # RFC 9148 §4's mandatory suite


def median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    if len(values) == 1:
        return mid
    return f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


# -- bare pyOpenSSL ------------------------------------------------------------------------------

def bare_context(method: int, cert: object, key: object, anchor: object) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    ctx.set_cipher_list((DEFAULT_CIPHERS + ":@SECLEVEL=0").encode())
    ctx.use_certificate(cert)  # type: ignore[arg-type]
    ctx.use_privatekey(key)  # type: ignore[arg-type]
    store = ctx.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(anchor))  # type: ignore[arg-type]
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    return ctx


def drain(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            chunk = conn.bio_read(1 << 17)
        except SSL.WantReadError:
            return out
        if not chunk:
            return out
        out += chunk


def step(conn: SSL.Connection) -> bool:
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        return False
    return True


def bare_handshake_factory(pki: TestPki) -> Callable[[], str | None]:
    secret = b"k" * 32
    server_ctx = bare_context(SSL.DTLS_SERVER_METHOD, pki.registrar.cert, pki.registrar.key,
                              pki.manufacturer_ca.cert)
    server_ctx.set_cookie_generate_callback(
        lambda conn: hmac.new(secret, PEER, hashlib.sha256).digest()[:16])
    server_ctx.set_cookie_verify_callback(
        lambda conn, cookie: hmac.compare_digest(
            hmac.new(secret, PEER, hashlib.sha256).digest()[:16], cookie))
    idevid = next(iter(pki.idevids.values()))
    client_ctx = bare_context(SSL.DTLS_CLIENT_METHOD, idevid.cert, idevid.key, pki.domain_ca.cert)

    def one() -> str | None:
        client = SSL.Connection(client_ctx)
        client.set_connect_state()
        client.set_ciphertext_mtu(DEFAULT_MTU)
        step(client)
        hello = drain(client)
        # The cookie round: a fresh listener per ClientHello, as a stateless server does.
        for _attempt in range(2):
            server = SSL.Connection(server_ctx)
            server.set_accept_state()
            server.set_ciphertext_mtu(DEFAULT_MTU)
            server.bio_write(hello)
            try:
                server.DTLSv1_listen()
                break
            except SSL.WantReadError:
                client.bio_write(drain(server))
                step(client)
                hello = drain(client)
        else:
            raise RuntimeError("bare: the cookie was not accepted")
        server_done = client_done = False
        to_client = b""
        for _ in range(MAX_FLIGHTS):
            server_done = step(server) or server_done
            to_client = drain(server)
            if to_client:
                client.bio_write(to_client)
            client_done = step(client) or client_done
            to_server = drain(client)
            if to_server:
                server.bio_write(to_server)
            if server_done and client_done and not to_server:
                return server.get_cipher_name()
        raise RuntimeError("bare: handshake did not complete")

    return one


# -- brski.dtls in memory ------------------------------------------------------------------------

def memory_handshake_factory(pki: TestPki) -> Callable[[], str | None]:
    server = DtlsServer(DtlsConfig(pki.registrar.cert, pki.registrar.key,
                                   [pki.manufacturer_ca.cert]))
    idevid = next(iter(pki.idevids.values()))
    client_config = DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert])

    def one() -> str | None:
        client = DtlsSession.client(client_config)
        session = None
        to_server = client.datagrams_to_send()
        for _ in range(MAX_FLIGHTS):
            to_client = []
            for datagram in to_server:
                if session is None:
                    accepted = server.accept(PEER, datagram, time.monotonic())
                    session = accepted.session
                    to_client += accepted.replies
                else:
                    session.receive(datagram)
                    to_client += session.datagrams_to_send()
            for datagram in to_client:
                client.receive(datagram)
            to_server = client.datagrams_to_send()
            if (session is not None and session.handshake_complete
                    and client.handshake_complete and not to_server):
                return session.cipher
        raise RuntimeError("brski.dtls: handshake did not complete")

    return one


# -- coaps_io over UDP ---------------------------------------------------------------------------

class Tiny(resource.Resource):
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(payload=b"ok")


class CoapsCase:
    """A server context on [::1]; each handshake is a new client context doing one GET."""

    def __init__(self, pki: TestPki) -> None:
        self.pki = pki
        idevid = next(iter(pki.idevids.values()))
        self.client_config = DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert])
        self.server_config = DtlsConfig(pki.registrar.cert, pki.registrar.key,
                                        [pki.manufacturer_ca.cert])

    async def __aenter__(self) -> CoapsCase:
        site = resource.Site()
        site.add_resource(["t"], Tiny())
        self.server, self.endpoint = await create_server_context(site, ("::1", 0),
                                                                 self.server_config)
        self.uri = f"coaps://[::1]:{self.endpoint.local_address[1]}/t"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.shutdown()

    async def one(self) -> None:
        client, _ = await create_client_context(self.client_config, bind=("::1", 0))
        try:
            response = await client.request(
                aiocoap.Message(code=aiocoap.GET, uri=self.uri)).response
        finally:
            await client.shutdown()
        if response.code != aiocoap.CONTENT or response.payload != b"ok":
            raise RuntimeError(f"coaps_io: GET answered {response.code} {response.payload!r}")


# -- driver --------------------------------------------------------------------------------------

async def measure(pki: TestPki, seconds: float, rounds: int) -> dict[str, list[float]]:
    sync_ops = {BARE: bare_handshake_factory(pki), MEMORY: memory_handshake_factory(pki)}
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    async with CoapsCase(pki) as coaps:
        # Warm-up, and a check that every path works and the memory paths agree on the suite.
        suites = {name: op() for name, op in sync_ops.items()}
        if set(suites.values()) != {EXPECTED_SUITE}:
            raise RuntimeError(f"suites negotiated: {suites}, expected {EXPECTED_SUITE}")
        await coaps.one()
        before = coaps.endpoint.handshakes
        coaps_done = 0
        for r in range(rounds):
            order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
            for name in order:
                done = 0
                start = time.perf_counter()
                while (spent := time.perf_counter() - start) < seconds or done == 0:
                    if name == COAPS:
                        await coaps.one()
                        coaps_done += 1
                    else:
                        sync_ops[name]()
                    done += 1
                rates[name].append(done / spent)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        # Every GET must have cost its own handshake, or the figure would not be handshakes.
        if coaps.endpoint.handshakes - before != coaps_done:
            raise RuntimeError(f"coaps_io: {coaps.endpoint.handshakes - before} server "
                               f"handshakes for {coaps_done} client sessions")
    return rates


def report(rates: dict[str, list[float]], rounds: int, seconds: float) -> None:
    print(f"\ndtls_handshake: medians over {rounds} round(s) of {seconds:g} s, (min-max) when "
          "more than one; both ends in one process")
    for name in CASES:
        print(f"{name:<24} {median_range(rates[name], ',.0f'):>24} handshakes/s")
    print()
    for name in (MEMORY, COAPS):
        paired = [ours / bare for ours, bare in zip(rates[name], rates[BARE], strict=True)]
        print(f"ratio {name + '/bare':<30} {median_range(paired, '.2f')}")
    print(f"(suite {EXPECTED_SUITE}, P-256 certificates, cookie round included)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="time spent on each case a round")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each case")
    p.add_argument("--quick", action="store_true",
                   help="smallest settings, for the smoke test: 1 round of 0.2 s")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.2, 1
    if args.seconds <= 0 or args.rounds < 1:
        print("dtls_handshake: --seconds must be > 0 and --rounds ≥ 1", file=sys.stderr)
        return 2
    pki = create_test_pki(datetime.datetime.now(datetime.UTC), serials=["BENCH1"])
    rates = asyncio.run(measure(pki, args.seconds, args.rounds))
    report(rates, args.rounds, args.seconds)
    from _report import record  # make bench (bench/run_all.py): the same figures

    record(BARE, rates[BARE], "handshakes/s")
    for name in (MEMORY, COAPS):
        record(name, rates[name], "handshakes/s", baseline=BARE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
