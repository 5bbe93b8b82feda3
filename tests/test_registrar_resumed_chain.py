"""A pledge whose IDevID a manufacturer intermediate CA issued, on a resumed TLS session.

Over real TLS 1.3 (loopback, the registrar's own server context): the first connection is a
full handshake, where the client sends leaf + intermediate; the second resumes its session,
where OpenSSL has no verified chain and the client sends no certificates. The registrar must
still tell the IDevID apart (the path check needs the intermediate), and an intermediate it
only remembers must never make a path that the anchors do not vouch for.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from brski.pki import Issued, create_test_pki, issue_idevid, new_key
from registrar.identity import Kind, classify, ssl_peer_chain
from registrar.web import Refusal, server_ssl_context

NOW = datetime.datetime.now(datetime.UTC)


def _intermediate(root: Issued, name: str) -> Issued:
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Manufacturer"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(root.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(root.key, hashes.SHA256()))
    return Issued(cert, key)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    work: Path = tmp_path_factory.mktemp("resumed")
    pki = create_test_pki(NOW)
    intermediate = _intermediate(pki.manufacturer_ca, "Example Manufacturer Line 7")
    idevid = issue_idevid(intermediate, "LINE7-0001", "masa.example:9443", NOW)
    (work / "registrar.crt").write_bytes(pki.registrar.cert_pem())
    (work / "registrar.key").write_bytes(pki.registrar.key_pem())
    (work / "idevid.pem").write_bytes(idevid.cert_pem() + intermediate.cert_pem())
    (work / "idevid.key").write_bytes(idevid.key_pem())
    server = server_ssl_context(work / "registrar.crt", work / "registrar.key",
                                client_cas=[pki.manufacturer_ca.cert, pki.domain_ca.cert],
                                client_cert=ssl.CERT_OPTIONAL, min_version="1.3")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.load_cert_chain(work / "idevid.pem", work / "idevid.key")
    return pki, intermediate, idevid, server, client


def _connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
             session: ssl.SSLSession | None) -> tuple[list[x509.Certificate], bool,
                                                       ssl.SSLSession | None]:
    """One connection: (the server's ssl_peer_chain, whether the session was reused, the
    client's session to resume next)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
            seen["chain"] = ssl_peer_chain(tls)
            seen["reused"] = tls.session_reused
            tls.sendall(b"y")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, session=session) as tls:
            tls.sendall(b"x")
            assert tls.recv(1) == b"y"  # the server's ticket is read with it
            next_session = tls.session
    finally:
        thread.join(10)
        listener.close()
    return seen["chain"], seen["reused"], next_session  # type: ignore[return-value]


def test_a_resumed_session_keeps_the_idevid_issued_through_an_intermediate(world):
    pki, intermediate, idevid, server, client = world
    anchors = [pki.manufacturer_ca.cert]
    full, reused, session = _connect(server, client, None)
    assert not reused and full == [idevid.cert, intermediate.cert, pki.manufacturer_ca.cert]
    assert classify(full, anchors, pki.domain_ca.cert, NOW).kind is Kind.IDEVID
    chain, reused, _ = _connect(server, client, session)
    assert reused, "the second connection must resume the first one's session"
    # the resumed session alone has the leaf; the CAs above it come from memory
    assert chain == full
    with pytest.raises(Refusal):  # what the leaf alone got before
        classify(chain[:1], anchors, pki.domain_ca.cert, NOW)
    client_info = classify(chain, anchors, pki.domain_ca.cert, NOW)
    assert client_info is not None and client_info.kind is Kind.IDEVID
    assert client_info.serial == "LINE7-0001"


def test_a_remembered_intermediate_vouches_for_nothing_the_anchors_refuse(world):
    pki, intermediate, idevid, _server, _client = world
    # the same intermediate, remembered, but another manufacturer's root as the only anchor
    other = create_test_pki(NOW)
    with pytest.raises(Refusal):
        classify([idevid.cert, intermediate.cert], [other.manufacturer_ca.cert],
                 pki.domain_ca.cert, NOW)
    # an IDevID signed in the intermediate's name by a key that is not the intermediate's
    forged = issue_idevid(Issued(intermediate.cert, new_key()), "LINE7-0002",
                          "masa.example:9443", NOW)
    with pytest.raises(Refusal):
        classify([forged.cert, intermediate.cert], [pki.manufacturer_ca.cert],
                 pki.domain_ca.cert, NOW)


def test_the_memory_is_bounded():
    from registrar.identity import _Intermediates

    pki = create_test_pki(NOW)
    memory = _Intermediates()
    cas = [_intermediate(pki.manufacturer_ca, f"CA {i}").cert for i in range(20)]
    memory.LIMIT = 8
    memory.remember(cas)
    assert len(memory._by_subject) == 8
    leaf = issue_idevid(Issued(cas[-1], new_key()), "B-1", "masa.example", NOW).cert
    assert memory.towards(leaf) == [cas[-1]]  # the newest stay
    assert memory.towards(cas[0]) == []  # the root's is not remembered: nothing above it
