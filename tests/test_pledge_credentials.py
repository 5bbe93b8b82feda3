"""Which certificate each of a pledge's connections presents, now that one TLS context serves
them all (issue 18 item 1), and the LDevID files written off the event loop.

The pledge loads its LDevID into the context that already holds its IDevID and the pin, from
memory (pledge_sim.tls.load_credential), instead of building a new context from the files in
--out. Over real TLS on loopback, against a small registrar that issues a real LDevID and
records the client certificate of every connection:

* voucher and EST go with the IDevID, enrollstatus with the LDevID (RFC 8995 §5.9.4);
* an LDevID the registrar refuses: enrollstatus goes again with the IDevID, which the shared
  context must present once more;
* an Ed25519 IDevID and the EC LDevID would both stay in one context (OpenSSL keeps a
  certificate per key type): the LDevID gets a context of its own;
* a credential loaded into a context does not change a connection opened before;
* the files in --out are those of the LDevID presented, the key 0600; an --out that cannot
  be written fails the pledge at once, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from brski import est as codec
from brski import pki as test_pki
from brski.certs import masa_url_extension
from brski.cli.pki import write_pki
from brski.pki import IDEVID_NOT_AFTER, create_test_pki
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, Voucher
from pledge_sim import tls
from pledge_sim.discovery import Candidate
from pledge_sim.identity import PledgeIdentity, identities_from_pki, load_anchors, load_identity
from pledge_sim.runner import EnrollResult, PledgeRunner, Settings
from pledge_sim.session import Trust
from pledge_sim.voucher_check import AcceptedVoucher

NOW = datetime.datetime.now(datetime.UTC)
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
NONCE = b"\x05" * 16


class Registrar:
    """Answers every BRSKI/EST step of one pledge and records, per TLS connection, the client
    certificate (DER) and the request paths. ``ldevid_refused``: client certificates are
    verified against the manufacturer CA only, so an LDevID is refused with an alert (a
    thread per connection on blocking sockets: asyncio's server closes without the alert)."""

    def __init__(self, pki: test_pki.TestPki, work: Path, *, ldevid_refused: bool = False
                 ) -> None:
        self.pki = pki
        chain, key = work / "registrar-chain.pem", work / "registrar.key"
        chain.write_bytes(pki.registrar.cert_pem() + pki.domain_ca.cert_pem())
        key.write_bytes(pki.registrar.key_pem())
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(chain, key)
        self.context.verify_mode = (ssl.CERT_REQUIRED if ldevid_refused
                                    else ssl.CERT_OPTIONAL)
        anchors = [pki.manufacturer_ca.cert] + ([] if ldevid_refused else [pki.domain_ca.cert])
        self.context.load_verify_locations(cadata=b"".join(c.public_bytes(DER)
                                                           for c in anchors))
        # Per connection, in the order accepted: the client certificate (None: refused in the
        # handshake) and the steps asked.
        self.accepted: list[tuple[list[bytes | None], list[str]]] = []
        self.statuses: list[dict[str, object]] = []
        self.listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            peer: list[bytes | None] = [None]
            paths: list[str] = []
            self.accepted.append((peer, paths))
            threading.Thread(target=self._serve, args=(sock, peer, paths), daemon=True).start()

    @property
    def connections(self) -> list[tuple[bytes | None, list[str]]]:
        return [(peer[0], paths) for peer, paths in self.accepted]

    def _serve(self, sock: socket.socket, peer: list[bytes | None], paths: list[str]) -> None:
        with sock:
            try:
                conn = self.context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                # Refused, with an alert sent: read what the client sent meanwhile, so that
                # closing does not reset the connection before the client reads the alert.
                with contextlib.suppress(OSError):
                    sock.settimeout(5)
                    while sock.recv(4096):
                        pass
                return
            with conn:
                peer[0] = conn.getpeercert(binary_form=True)
                stream = conn.makefile("rb")
                try:
                    while head := stream.readline():
                        path = head.split(b" ")[1].decode()
                        length = 0
                        while (line := stream.readline()) not in (b"\r\n", b""):
                            name, _, value = line.partition(b":")
                            if name.strip().lower() == b"content-length":
                                length = int(value)
                        step = path.rsplit("/", 1)[1]
                        paths.append(step)
                        conn.sendall(self.answer(step, stream.read(length)))
                except (ssl.SSLError, OSError):
                    pass

    def answer(self, step: str, body: bytes) -> bytes:
        pki = self.pki
        if step == "requestvoucher":
            voucher = Voucher(serial_number="dev-1", assertion=Assertion.PROXIMITY, nonce=NONCE,
                              created_on=NOW, pinned_domain_cert=der(pki.domain_ca.cert))
            signed = sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)
            return reply("200 OK", signed, "Content-Type: application/voucher-cms+json")
        if step == "cacerts":
            return reply("200 OK", codec.encode_base64(codec.encode_certs_only(
                [pki.domain_ca.cert])), "Content-Type: application/pkcs7-mime")
        if step == "csrattrs":
            return reply("204 No Content")
        if step == "simpleenroll":
            ldevid = issue_ldevid(pki, codec.decode_csr_body(body))
            return reply("200 OK", codec.encode_base64(codec.encode_certs_only([ldevid])),
                         "Content-Type: application/pkcs7-mime")
        if step in ("voucher_status", "enrollstatus"):
            self.statuses.append(json.loads(body))
        return reply("200 OK")


def reply(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def issue_ldevid(pki: test_pki.TestPki, csr: x509.CertificateSigningRequest) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(csr.subject).issuer_name(pki.domain_ca.cert.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=5))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(pki.domain_ca.key, hashes.SHA256()))


@pytest.fixture
def pki(tmp_path: Path) -> test_pki.TestPki:
    made = create_test_pki(NOW, serials=["dev-1", "dev-2"])
    write_pki(tmp_path / "pki", made, {"masa_url": "masa.example:9443",
                                       "manufacturer": "Example Manufacturer",
                                       "domain": "Example Domain"})
    return made


def enroll(tmp_path: Path, registrar: Registrar, identity: PledgeIdentity,
           out: Path) -> EnrollResult:
    settings = Settings(anchors=load_anchors(tmp_path / "pki/masa/ca.crt"), out_dir=out,
                        deadline=20, backoff_initial=0.05, backoff_cap=0.1)
    runner = PledgeRunner(identity, [Candidate("::1", registrar.port, "static")], settings,
                          rng=lambda n: NONCE[:n])
    try:
        return asyncio.run(runner.run())
    finally:
        registrar.close()


def idevid(tmp_path: Path) -> PledgeIdentity:
    (found,) = identities_from_pki(tmp_path / "pki", serials=["dev-1"])
    return found


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


def written_ldevid(out: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((out / "dev-1.crt").read_bytes())


def test_enrollstatus_goes_with_the_ldevid_everything_before_with_the_idevid(pki, tmp_path):
    registrar = Registrar(pki, tmp_path)
    ident, out = idevid(tmp_path), tmp_path / "out"
    result = enroll(tmp_path, registrar, ident, out)
    assert result.ok, result
    assert result.ldevid_path == str(out / "dev-1.crt")
    ldevid = written_ldevid(out)
    assert registrar.connections == [
        (der(ident.cert), ["requestvoucher", "voucher_status", "cacerts", "csrattrs",
                           "simpleenroll"]),
        (der(ldevid), ["enrollstatus"]),
    ]
    assert registrar.statuses[-1]["status"] is True
    # The files are the LDevID presented: its key beside it, readable by the owner only.
    key_file = out / "dev-1.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert key.public_key() == ldevid.public_key()
    # Issued right under the domain CA: the chain above the LDevID is that CA.
    assert (out / "dev-1-chain.pem").read_bytes() == pki.domain_ca.cert_pem()
    assert (out / "cacerts.pem").read_bytes() == pki.domain_ca.cert_pem()


def test_a_refused_ldevid_sends_enrollstatus_with_the_idevid_again(pki, tmp_path):
    registrar = Registrar(pki, tmp_path, ldevid_refused=True)
    ident, out = idevid(tmp_path), tmp_path / "out"
    result = enroll(tmp_path, registrar, ident, out)
    assert result.ok, result
    assert any("LDevID TLS refused" in e for e in result.events)
    # The LDevID was refused in the handshake; the report went with the IDevID, loaded back
    # into the context that had presented the LDevID.
    first, *refused, last = registrar.connections
    assert first[0] == der(ident.cert) and last == (der(ident.cert), ["enrollstatus"])
    assert refused and all(conn == (None, []) for conn in refused)
    assert written_ldevid(out).public_key() != ident.cert.public_key()


def contexts_of(runner: PledgeRunner, pki: test_pki.TestPki
                ) -> tuple[ssl.SSLContext, Client, ssl.SSLContext]:
    """The runner's pinned context, a client made from it then, and its LDevID context, as if
    its voucher (pinning the domain CA) and its LDevID had just come."""
    runner.session.accepted = AcceptedVoucher(voucher=None, signer=pki.domain_ca.cert,
                                              pinned=pki.domain_ca.cert)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "dev-1")])).sign(key, hashes.SHA256()))
    runner.session.ldevid_key, runner.session.ldevid = key, issue_ldevid(pki, csr)
    runner.session.ldevid_chain = [runner.session.ldevid, pki.domain_ca.cert]

    async def both() -> tuple[ssl.SSLContext, Client, ssl.SSLContext]:
        pinned = runner._context(Trust.PINNED)
        client = Client(pinned)  # made before the LDevID is loaded: it keeps the IDevID
        ldevid = runner._context(Trust.LDEVID)  # and starts writing the files
        await runner._save_ldevid()
        return pinned, client, ldevid

    return asyncio.run(both())


def test_the_ldevid_is_loaded_into_the_pinned_context_and_the_idevid_back(pki, tmp_path):
    registrar = Registrar(pki, tmp_path)
    ident = idevid(tmp_path)
    settings = Settings(anchors=[], out_dir=tmp_path / "out")
    runner = PledgeRunner(ident, [], settings)
    pinned, pinned_client, ldevid = contexts_of(runner, pki)
    assert ldevid is pinned  # one context: no second context nor pin to build
    assert ldevid.verify_mode is ssl.CERT_REQUIRED
    assert [c for c in ldevid.get_ca_certs(binary_form=True)] == [der(pki.domain_ca.cert)]
    server = registrar.context
    assert presented(pinned_client, server) == der(ident.cert)
    assert presented(Client(ldevid), server) == der(runner.session.ldevid)
    assert written_ldevid(tmp_path / "out") == runner.session.ldevid
    back = runner._context(Trust.PINNED)
    assert back is pinned and presented(Client(back), server) == der(ident.cert)
    assert presented(Client(runner._context(Trust.PROVISIONAL)), server) == der(ident.cert)
    registrar.close()


def test_an_ed25519_idevid_and_the_ec_ldevid_are_not_mixed_in_one_context(pki, tmp_path):
    """OpenSSL keeps a certificate per key type: loading the EC LDevID into a context with an
    Ed25519 IDevID would leave both there, and the handshake could show either."""
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "dev-1"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "pledge dev-1")])
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(pki.manufacturer_ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(minutes=5))
            .not_valid_after(IDEVID_NOT_AFTER)
            .add_extension(masa_url_extension("masa.example:9443"), critical=False)
            .sign(pki.manufacturer_ca.key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "ed.crt", tmp_path / "ed.key"
    cert_file.write_bytes(cert.public_bytes(PEM))
    key_file.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    registrar = Registrar(pki, tmp_path)
    runner = PledgeRunner(load_identity(cert_file, key_file), [],
                          Settings(anchors=[], out_dir=tmp_path / "out"))
    pinned, _, ldevid = contexts_of(runner, pki)
    assert ldevid is not pinned
    assert [c for c in ldevid.get_ca_certs(binary_form=True)] == [der(pki.domain_ca.cert)]
    server = registrar.context
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        server.maximum_version = version
        assert presented(Client(ldevid), server) == der(runner.session.ldevid)
        assert presented(Client(runner._context(Trust.PINNED)), server) == der(cert)
    registrar.close()


def test_a_loaded_credential_is_for_later_connections_only(pki, tmp_path):
    ident = idevid(tmp_path)
    context = tls.make_provisional(tls.idevid_context(ident.cert_path, ident.key_path))
    server = Registrar(pki, tmp_path).context
    before = Client(context)
    other = pki.idevids["dev-2"]
    tls.load_credential(context, other.cert_pem(), other.key_pem())
    after = Client(context)
    assert presented(before, server) == der(ident.cert)
    assert presented(after, server) == der(other.cert)
    with pytest.raises(ssl.SSLError):  # a key that is not the certificate's
        tls.load_credential(context, other.cert_pem(), pki.registrar.key_pem())


class Client:
    """A client TLS object over memory, made (and so given its certificate) now."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=None)


def presented(client: Client, server_context: ssl.SSLContext) -> bytes | None:
    """Run the handshake in memory; the client certificate the server saw."""
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    c_in, c_out = client.incoming, client.outgoing
    for _ in range(10):
        for side in (client.tls, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    server.write(b"x")  # TLS 1.3: the client's certificate is read with its Finished
    c_in.write(s_out.read())
    return server.getpeercert(binary_form=True)


def test_an_out_directory_that_cannot_be_written_fails_the_pledge_at_once(pki, tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where --out should be")
    result = enroll(tmp_path, Registrar(pki, tmp_path), idevid(tmp_path), blocked)
    assert not result.ok and result.code == "ldevid-files", result
    assert str(blocked) in result.reason
    assert result.attempts == 1  # no retries until the deadline: a disk is not an outage
