"""Certificate DTLS over memory BIOs (brski.dtls): client and server pumped against each other."""

import datetime
import time

import pytest

from brski import dtls
from brski.dtls import (
    CertificateRefused,
    CookieSecrets,
    DtlsConfig,
    DtlsError,
    DtlsServer,
    DtlsSession,
)
from brski.errors import DecodeError, UsageError
from brski.pki import create_test_pki

NOW = datetime.datetime.now(datetime.UTC)
PEER = b"[2001:db8::1]:5683"


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["P1"])


@pytest.fixture(scope="module")
def rogue():
    return create_test_pki(NOW, manufacturer="Rogue Manufacturer", serials=["R1"])


def server_config(pki, **kw):
    return DtlsConfig(pki.registrar.cert, pki.registrar.key, [pki.manufacturer_ca.cert], **kw)


def client_config(pki, idevid, **kw):
    return DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert], **kw)


def records_in(datagrams):
    return [r for d in datagrams for r in dtls.split_records(d)]


def handshake(server: DtlsServer, client: DtlsSession, peer=PEER, sizes=None):
    """Runs the cookie round and the handshake; returns (server session, drops seen)."""
    sizes = sizes if sizes is not None else []
    drops = []
    session = None
    to_server = client.datagrams_to_send()
    for _ in range(20):
        to_client = []
        for datagram in to_server:
            sizes.append(len(datagram))
            if session is None:
                accepted = server.accept(peer, datagram, time.monotonic())
                drops.append(accepted.drop)
                session = accepted.session
                to_client += accepted.replies
            else:
                session.receive(datagram)
                to_client += session.datagrams_to_send()
        to_server = []
        for datagram in to_client:
            sizes.append(len(datagram))
            client.receive(datagram)
        to_server = client.datagrams_to_send()
        if session and session.handshake_complete and client.handshake_complete and not to_server:
            return session, drops
    raise AssertionError("handshake did not complete")


def test_full_handshake_cookie_round_app_data_and_fragment_sizes(pki):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    sizes: list[int] = []
    session, drops = handshake(server, client, sizes=sizes)
    # First ClientHello answered with a HelloVerifyRequest and dropped, second one kept.
    assert drops == ["no-cookie", None]
    assert max(sizes) <= 1024
    # The registrar certificate chain plus ECDHE makes flights larger than one datagram:
    # they were fragmented, not just small.
    assert sum(sizes) > 1024
    assert session.peer_certificate == pki.idevids["P1"].cert
    assert session.peer_chain[-1] == pki.manufacturer_ca.cert
    assert client.peer_certificate == pki.registrar.cert
    assert session.version == "DTLSv1.2"
    assert session.cipher == "ECDHE-ECDSA-AES128-CCM8"  # the mandatory suite is preferred

    client.send(b"GET /crts")
    (got,) = [session.receive(d) for d in client.datagrams_to_send()]
    assert got == [b"GET /crts"]
    session.send(b"x" * 900)
    replies = [client.receive(d) for d in session.datagrams_to_send()]
    assert replies == [[b"x" * 900]]
    session.close()
    closing = session.datagrams_to_send()
    assert closing
    client.receive(closing[0])
    assert client.closed


def test_small_mtu_fragments_every_flight(pki):
    server = DtlsServer(server_config(pki, mtu=400))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"], mtu=400))
    sizes: list[int] = []
    handshake(server, client, sizes=sizes)
    assert max(sizes) <= 400


@pytest.mark.parametrize("suite", [
    "ECDHE-ECDSA-AES128-CCM8", "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
])
def test_each_configured_suite_negotiates(pki, suite):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"], ciphers=suite))
    session, _ = handshake(server, client)
    assert session.cipher == client.cipher == suite


def test_cookie_binds_the_peer_address(pki):
    """A cookie earned from one address does not open a session for another."""
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    (hello,) = client.datagrams_to_send()
    first = server.accept(PEER, hello, 0.0)
    assert first.drop == "no-cookie" and first.session is None
    client.receive(first.replies[0])
    (hello2,) = client.datagrams_to_send()
    spoofed = server.accept(b"[2001:db8::66]:5683", hello2, 0.0)
    assert spoofed.session is None and spoofed.drop == "no-cookie"
    good = server.accept(PEER, hello2, 0.0)
    assert good.session is not None and good.drop is None


def test_cookie_secrets_rotate():
    keys = iter(bytes([i]) * 32 for i in range(10))
    secrets = CookieSecrets(lifetime=10, rng=lambda n: next(keys))
    secrets.rotate_if_due(0.0)
    cookie = secrets.make(PEER)
    assert secrets.check(PEER, cookie) and not secrets.check(b"other", cookie)
    secrets.rotate_if_due(10.0)
    assert secrets.check(PEER, cookie)  # previous secret still verifies
    secrets.rotate_if_due(20.0)
    assert not secrets.check(PEER, cookie)  # two rotations later: stale


def test_client_hello_flood_without_cookies_keeps_no_state(pki):
    server = DtlsServer(server_config(pki))
    for i in range(50):
        client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
        (hello,) = client.datagrams_to_send()
        accepted = server.accept(f"[2001:db8::{i:x}]:1".encode(), hello, 0.0)
        assert accepted.session is None and accepted.drop == "no-cookie"
        (hvr,) = accepted.replies
        assert len(hvr) < len(hello)  # no amplification


def test_retransmission_after_a_dropped_flight(pki):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    (hello,) = client.datagrams_to_send()
    client.receive(server.accept(PEER, hello, 0.0).replies[0])
    (hello2,) = client.datagrams_to_send()
    accepted = server.accept(PEER, hello2, 0.0)
    session = accepted.session
    lost = accepted.replies  # the server's flight never arrives
    assert lost
    now = time.monotonic()
    deadline = session.next_timer(now)
    assert deadline is not None and now < deadline <= now + 1.5
    session.handle_timer()  # too early: nothing resent
    assert session.datagrams_to_send() == []
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.05)
    session.handle_timer()
    resent = session.datagrams_to_send()
    assert records_in(resent) and len(records_in(resent)) == len(records_in(lost))
    for datagram in resent:
        client.receive(datagram)
    for datagram in client.datagrams_to_send():
        session.receive(datagram)
    for datagram in session.datagrams_to_send():
        client.receive(datagram)
    assert session.handshake_complete and client.handshake_complete


def test_unknown_manufacturer_refused_with_an_alert(pki, rogue):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, rogue.idevids["R1"]))
    with pytest.raises(CertificateRefused, match="certificate verify failed"):
        handshake(server, client)


def test_unknown_manufacturer_alert_reaches_the_client(pki, rogue):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, rogue.idevids["R1"]))
    (hello,) = client.datagrams_to_send()
    client.receive(server.accept(PEER, hello, 0.0).replies[0])
    (hello2,) = client.datagrams_to_send()
    accepted = server.accept(PEER, hello2, 0.0)
    session = accepted.session
    for datagram in accepted.replies:
        client.receive(datagram)
    with pytest.raises(CertificateRefused):
        for datagram in client.datagrams_to_send():
            session.receive(datagram)
    alert = session.datagrams_to_send()
    assert session.closed
    assert [r[0] for r in records_in(alert)] == [dtls.CONTENT_ALERT]
    with pytest.raises(DtlsError, match="alert"):
        client.receive(alert[0])
    assert client.closed and not client.handshake_complete


def test_client_refuses_a_registrar_outside_its_anchors(pki, rogue):
    server = DtlsServer(DtlsConfig(
        rogue.registrar.cert, rogue.registrar.key, [pki.manufacturer_ca.cert]))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    with pytest.raises(CertificateRefused):
        handshake(server, client)
    assert [r[0] for r in records_in(client.datagrams_to_send())] == [dtls.CONTENT_ALERT]


@pytest.mark.parametrize("garbage", [
    b"\x16", b"\x16\xfe\xfd\0\0", b"\x00" * 40, b"\x17\xfe\xfd" + b"\0" * 60, bytes(range(256)),
    b"\x16\xfe\xfd\0\0\0\0\0\0\0\0\0\x05\x01\0",
])
def test_garbage_to_the_server_is_dropped_cleanly(pki, garbage):
    server = DtlsServer(server_config(pki))
    accepted = server.accept(PEER, garbage, 0.0)
    assert accepted.session is None and accepted.drop == "garbage"


def test_truncated_client_hello_is_dropped(pki):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    (hello,) = client.datagrams_to_send()
    for cut in (14, 30, len(hello) // 2, len(hello) - 1):
        accepted = server.accept(PEER, hello[:cut], 0.0)
        assert accepted.session is None and accepted.drop == "garbage", cut


def test_garbage_inside_a_session_does_not_break_it(pki):
    server = DtlsServer(server_config(pki))
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    session, _ = handshake(server, client)
    for junk in (b"\x17\xfe\xfd" + b"\0" * 30, b"\x01\x02", bytes(200)):
        assert session.receive(junk) == []  # DTLS discards bad records silently
    assert not session.closed
    client.send(b"still here")
    assert [session.receive(d) for d in client.datagrams_to_send()] == [[b"still here"]]


def test_empty_and_oversized_datagrams_are_decode_errors(pki):
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    with pytest.raises(DecodeError):
        client.receive(b"")
    with pytest.raises(DecodeError):
        client.receive(bytes(70000))


def test_split_records_rejects_truncation():
    with pytest.raises(DecodeError):
        dtls.split_records(b"\x16\xfe\xfd" + bytes(8) + b"\x00\x10" + b"abc")
    with pytest.raises(DecodeError):
        dtls.split_records(b"\x16\xfe")


def test_pack_datagrams_never_exceeds_the_mtu():
    records = [bytes(300), bytes(300), bytes(500), bytes(100)]
    packed = dtls.pack_datagrams(records, 700)
    assert [len(d) for d in packed] == [600, 600]


def test_config_errors_name_the_problem(pki):
    with pytest.raises(UsageError, match="anchors"):
        DtlsConfig(pki.registrar.cert, pki.registrar.key, [])
    with pytest.raises(UsageError, match="mtu"):
        server_config(pki, mtu=100)
    with pytest.raises(UsageError, match="does not match"):
        DtlsServer(DtlsConfig(pki.registrar.cert, pki.domain_ca.key, [pki.domain_ca.cert]))
    with pytest.raises(UsageError, match="ciphers"):
        DtlsServer(server_config(pki, ciphers="NO-SUCH-SUITE"))


def test_send_before_handshake_is_a_usage_error(pki):
    client = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    with pytest.raises(UsageError):
        client.send(b"early")


def test_dtls13_answer_is_what_openssl_says():
    # README "Certificate DTLS" records the answer for the OpenSSL pyOpenSSL runs on.
    assert dtls.dtls13_available() is False


def test_a_pledge_offering_its_last_session_gets_a_full_handshake_and_is_identified(pki):
    # A resumed session carries no verified chain, and the registrar identifies a pledge by
    # its chain (registrar.identity.classify): a pledge that offers the session of its last
    # connection must get a full handshake, not an abbreviated one with an empty chain.
    from OpenSSL import SSL
    from OpenSSL._util import lib

    # Today's server context sets no session id context, and OpenSSL then resumes nothing
    # while it verifies peers; setting one (Context.set_session_id) makes this test fail.
    server = DtlsServer(server_config(pki))
    first = DtlsSession.client(client_config(pki, pki.idevids["P1"]))
    served, _ = handshake(server, first)
    first.close()  # a clean close: OpenSSL keeps the session for resumption
    for datagram in first.datagrams_to_send():
        served.receive(datagram)
    served.close()
    offered = first._conn.get_session()
    assert offered is not None
    conn = SSL.Connection(first._conn.get_context())  # same context: set_session requires it
    conn.set_session(offered)
    conn.set_connect_state()
    again = DtlsSession(conn, dtls.DEFAULT_MTU, server=False)
    again._advance()
    session, _ = handshake(server, again, peer=b"[2001:db8::1]:5684")
    assert lib.SSL_session_reused(session._conn._ssl) == 0
    assert lib.SSL_session_reused(again._conn._ssl) == 0
    chain = session.peer_chain
    assert [c.subject for c in chain] == [pki.idevids["P1"].cert.subject,
                                         pki.manufacturer_ca.cert.subject]
