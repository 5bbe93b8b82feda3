"""What a DTLS server knows about a client it refused (brski.dtls, sans-IO): the verify error
and the client's leaf certificate, also when verification stops above the leaf and when the
Certificate message arrives in fragments."""

import contextlib
import datetime

import pytest

from brski import dtls
from brski.dtls import CertificateRefused, DtlsConfig, DtlsServer, DtlsSession
from brski.pki import create_test_pki
from brski.tls_certificate import CERTIFICATE

NOW = datetime.datetime.now(datetime.UTC)
PEER = b"[2001:db8::1]:5683"


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["P1"])


@pytest.fixture(scope="module")
def rogue():
    return create_test_pki(NOW, manufacturer="Rogue Manufacturer", serials=["R1"])


def refused_session(pki, client_config: DtlsConfig, mtu: int = 1024) -> DtlsSession:
    server = DtlsServer(DtlsConfig(pki.registrar.cert, pki.registrar.key,
                                   [pki.manufacturer_ca.cert], mtu=mtu))
    client = DtlsSession.client(client_config)
    (hello,) = client.datagrams_to_send()
    client.receive(server.accept(PEER, hello, 0.0).replies[0])
    (hello2,) = client.datagrams_to_send()
    accepted = server.accept(PEER, hello2, 0.0)
    session = accepted.session
    assert session is not None
    for datagram in accepted.replies:
        client.receive(datagram)
    flight = client.datagrams_to_send()
    with pytest.raises(CertificateRefused):
        for datagram in flight:
            session.receive(datagram)
    return session


def test_unknown_leaf_is_seen_by_the_verify_callback(pki, rogue):
    idevid = rogue.idevids["R1"]
    session = refused_session(pki, DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert]))
    notes = session.verification
    assert notes is not None and notes.verify_error == 20  # unable to get local issuer
    assert notes.leaf == idevid.cert == session.sent_certificate
    assert session.peer_certificate is None  # OpenSSL itself keeps nothing


def test_chain_failing_above_the_leaf_still_names_the_leaf(pki, rogue):
    idevid = rogue.idevids["R1"]
    ca = rogue.manufacturer_ca.cert
    session = refused_session(pki, DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert],
                                              chain=[ca]))
    notes = session.verification
    assert notes is not None and notes.verify_error == 19 and notes.failed_depth == 1
    assert notes.leaf is None and notes.failed_certificate == ca
    assert session.sent_certificate == idevid.cert  # from the client's Certificate message


def test_fragmented_certificate_message_is_reassembled(pki, rogue):
    idevid = rogue.idevids["R1"]
    config = DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert],
                        chain=[rogue.manufacturer_ca.cert], mtu=dtls.MIN_MTU)
    session = refused_session(pki, config, mtu=dtls.MIN_MTU)
    assert session.sent_certificate == idevid.cert


def test_junk_certificate_fragments_are_ignored(pki):
    idevid = pki.idevids["P1"]
    session = refused_session.__wrapped__ if False else None
    server = DtlsServer(DtlsConfig(pki.registrar.cert, pki.registrar.key,
                                   [pki.manufacturer_ca.cert]))
    client = DtlsSession.client(DtlsConfig(idevid.cert, idevid.key, [pki.domain_ca.cert]))
    (hello,) = client.datagrams_to_send()
    client.receive(server.accept(PEER, hello, 0.0).replies[0])
    accepted = server.accept(PEER, client.datagrams_to_send()[0], 0.0)
    session = accepted.session
    # A Certificate "fragment" claiming a huge message, and one whose list does not frame.
    for length, body in ((1 << 20, b"x" * 10), (8, b"\0\0\x09abcde")):
        header = (bytes([CERTIFICATE]) + length.to_bytes(3, "big")
                  + b"\0\1" + (0).to_bytes(3, "big") + len(body).to_bytes(3, "big"))
        record = (bytes([dtls.CONTENT_HANDSHAKE]) + b"\xfe\xfd" + b"\0\0" + b"\0\0\0\0\0\x09"
                  + (len(header) + len(body)).to_bytes(2, "big") + header + body)
        with contextlib.suppress(dtls.DtlsError):  # OpenSSL may refuse it too: not the point
            session.receive(record)
    assert session.sent_certificate is None
