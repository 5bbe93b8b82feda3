"""The kept provisional connection, authenticated after the voucher (RFC 8995 §5.6.2).

``pledge_sim.pin_check`` judges the chain a TLS server sent against the pinned-domain-cert;
here with real certificates (a root, a sub-CA, a registrar), the chain as read off real TLS
handshakes run in memory (``ssl.MemoryBIO``, no sockets) with the pledge's own context, and
the runner against a canned registrar over TLS on loopback: which connection carries what.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from brski import pki as test_pki
from brski.cli.pki import write_pki
from brski.pki import create_test_pki
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, Voucher
from pledge_sim import tls
from pledge_sim.discovery import Candidate
from pledge_sim.http import sent_chain
from pledge_sim.identity import identities_from_pki, load_anchors
from pledge_sim.pin_check import MAX_CHAIN, PinMismatch, check_server_chain
from pledge_sim.runner import EnrollResult, PledgeRunner, Settings

NOW = datetime.datetime(2026, 6, 1, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
DER = serialization.Encoding.DER


class Made:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert, self.key = cert, key

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(DER)


def make(name: str, issuer: Made | None = None, *, ca: bool = False,
         start: datetime.datetime = NOW - DAY, end: datetime.datetime = NOW + 365 * DAY,
         ekus: list[x509.ObjectIdentifier] | None = None, basic: bool = True) -> Made:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end))
    if basic:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), False)
    return Made(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki() -> dict[str, Made]:
    root = make("Domain Root", ca=True)
    sub = make("Domain Sub-CA", root, ca=True)
    registrar = make("registrar", sub, ekus=[ExtendedKeyUsageOID.SERVER_AUTH,
                                             ExtendedKeyUsageOID.CLIENT_AUTH])
    other = make("Domain Root", ca=True)  # same name as the real root, another key
    return {"root": root, "sub": sub, "registrar": registrar, "other": other,
            "impostor": make("registrar", other, ekus=[ExtendedKeyUsageOID.SERVER_AUTH])}


def check(chain: list[Made], pinned: Made, now: datetime.datetime | None = NOW
          ) -> list[x509.Certificate]:
    return check_server_chain(chain[0].der, [m.der for m in chain], pinned.cert, now)


# -- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("now", [NOW, None], ids=["trusted-clock", "no-clock"])
@pytest.mark.parametrize("pin", ["root", "sub", "registrar"])
def test_a_chain_to_the_pin_is_accepted_whatever_the_pin_is(pki, pin, now):
    # The pin may be the domain's root, an intermediate (a partial chain), or the
    # registrar's own end-entity certificate.
    path = check([pki["registrar"], pki["sub"]], pki[pin], now)
    assert path[0] == pki["registrar"].cert and path[-1] == pki[pin].cert


def test_a_pinned_intermediate_needs_nothing_above_it(pki):
    assert check([pki["registrar"]], pki["sub"]) == [pki["registrar"].cert, pki["sub"].cert]


def test_intermediates_in_another_order_and_extra_certificates_are_tolerated(pki):
    # RFC 8446 §4.4.2: after the sender's own certificate, a client should accept any order
    # and ignore what it does not need; OpenSSL's pinned handshake did the same.
    unrelated = make("unrelated", ca=True)
    chain = [pki["registrar"], pki["root"], unrelated, pki["other"], pki["sub"]]
    assert check(chain, pki["root"])[-1] == pki["root"].cert


def test_without_a_clock_junk_valid_only_later_does_not_move_the_check_off_the_path(pki):
    # The clockless time is a notBefore of the path, not of whatever else was sent.
    later = make("from the future", ca=True, start=NOW + 400 * DAY, end=NOW + 800 * DAY)
    assert check([pki["registrar"], later, pki["sub"]], pki["root"], None)


def test_without_a_clock_an_expired_registrar_certificate_is_accepted(pki):
    # RFC 8995 §2.6.1: a pledge without a trusted clock MAY ignore validity periods.
    root = make("Domain Root", ca=True, start=NOW - 60 * DAY)
    sub = make("Domain Sub-CA", root, ca=True, start=NOW - 50 * DAY)
    old = make("registrar", sub, start=NOW - 30 * DAY, end=NOW - 2 * DAY)
    assert check([old, sub], root, None)[0] == old.cert
    with pytest.raises(PinMismatch, match="expired or not yet valid"):
        check([old, sub], root, NOW)


def test_without_a_clock_a_path_never_valid_at_one_time_is_refused(pki):
    # A known limit: the check runs at one time, and no time suits a registrar certificate
    # that expired before the pinned CA began. No CA issues such a thing.
    old = make("registrar", pki["sub"], start=NOW - 30 * DAY, end=NOW - 2 * DAY)
    with pytest.raises(PinMismatch, match="never valid at the same time"):
        check([old, pki["sub"]], pki["root"], None)


# -- refused ----------------------------------------------------------------------------------


@pytest.mark.parametrize("now", [NOW, None], ids=["trusted-clock", "no-clock"])
def test_a_chain_that_does_not_reach_the_pin_is_refused(pki, now):
    with pytest.raises(PinMismatch, match="does not chain"):
        check([pki["impostor"], pki["other"]], pki["root"], now)
    with pytest.raises(PinMismatch, match="does not chain"):
        check([pki["registrar"], pki["sub"]], pki["other"], now)  # same name, other key
    with pytest.raises(PinMismatch, match="does not chain"):
        check([pki["registrar"]], pki["root"], now)  # the sub-CA is neither sent nor pinned


def test_a_pinned_end_entity_certificate_pins_only_itself(pki):
    sibling = make("registrar-2", pki["sub"], ekus=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(PinMismatch):
        check([sibling, pki["sub"]], pki["registrar"])


def test_an_expired_registrar_certificate_is_refused_with_a_clock(pki):
    old = make("registrar", pki["sub"], start=NOW - 30 * DAY, end=NOW - 2 * DAY)
    with pytest.raises(PinMismatch, match="expired or not yet valid"):
        check([old, pki["sub"]], pki["root"])


def test_an_expired_pinned_intermediate_is_refused_with_a_clock(pki):
    sub = make("Old Sub-CA", pki["root"], ca=True, start=NOW - 30 * DAY, end=NOW - DAY)
    leaf = make("registrar", sub, start=NOW - 20 * DAY)
    with pytest.raises(PinMismatch):
        check([leaf], sub)


def test_the_chain_must_start_with_the_certificate_the_handshake_proved(pki):
    chain = [pki["sub"].der, pki["registrar"].der]  # wrong order: the sub-CA first
    with pytest.raises(PinMismatch, match="does not start with"):
        check_server_chain(pki["registrar"].der, chain, pki["root"].cert, NOW)
    with pytest.raises(PinMismatch, match="no certificate"):
        check_server_chain(None, [], pki["root"].cert, NOW)


def test_an_issuer_that_is_not_a_ca_is_refused(pki):
    not_ca = make("not a CA", pki["root"], ca=False)
    no_constraints = make("no constraints", pki["root"], basic=False)
    for issuer in (not_ca, no_constraints):
        leaf = make("registrar", issuer, ekus=[ExtendedKeyUsageOID.SERVER_AUTH])
        with pytest.raises(PinMismatch, match="basicConstraints"):
            check([leaf, issuer], pki["root"])


def test_a_certificate_not_for_tls_servers_is_refused(pki):
    client_only = make("client", pki["sub"], ekus=[ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(PinMismatch, match="serverAuth"):
        check([client_only, pki["sub"]], pki["root"])


def test_junk_in_the_chain_and_overlong_chains_are_refused(pki):
    chain = [pki["registrar"].der, b"\x30\x03\x02\x01\x00", pki["sub"].der]
    with pytest.raises(PinMismatch, match="not a usable DER certificate"):
        check_server_chain(pki["registrar"].der, chain, pki["root"].cert, NOW)
    long = [pki["registrar"].der] + [pki["sub"].der] * MAX_CHAIN
    with pytest.raises(PinMismatch, match="at most"):
        check_server_chain(pki["registrar"].der, long, pki["root"].cert, NOW)


# -- the chain as read off a real TLS handshake, in memory -------------------------------------


def handshake(tmp_path: Path, sent: list[Made], key: ec.EllipticCurvePrivateKey,
              version: ssl.TLSVersion) -> ssl.SSLObject:
    """A handshake between a server sending ``sent`` and the pledge's provisional context;
    the client's SSLObject afterwards."""
    chain_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain_file.write_bytes(b"".join(m.cert.public_bytes(serialization.Encoding.PEM)
                                    for m in sent))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain_file, key_file)
    server_ctx.maximum_version = version
    idevid = make("pledge", make("Manufacturer", ca=True))
    idevid_file = tmp_path / "idevid.pem"
    idevid_file.write_bytes(idevid.cert.public_bytes(serialization.Encoding.PEM) +
                            idevid.key.private_bytes(serialization.Encoding.PEM,
                                                     serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    client_ctx = tls.provisional_context(idevid_file, idevid_file)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=None)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side, out, peer_in in (("client", client, c_out, s_in),
                                         ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_the_chain_is_read_leaf_first_as_sent(pki, tmp_path, version):
    sent = [pki["registrar"], pki["root"], pki["sub"]]  # intermediates out of order
    client = handshake(tmp_path, sent, pki["registrar"].key, version)
    chain = sent_chain(client)
    assert chain == [m.der for m in sent]
    peer = client.getpeercert(binary_form=True)
    assert check_server_chain(peer, chain, pki["root"].cert, NOW)[-1] == pki["root"].cert
    with pytest.raises(PinMismatch):
        check_server_chain(peer, chain, pki["other"].cert, NOW)


def test_an_impostor_handshake_is_refused_against_the_pin(pki, tmp_path):
    # A man in the middle with a certificate of its own: fine for the provisional handshake,
    # refused once the voucher's pin is known.
    client = handshake(tmp_path, [pki["impostor"], pki["other"]], pki["impostor"].key,
                       ssl.TLSVersion.TLSv1_3)
    with pytest.raises(PinMismatch, match="does not chain"):
        check_server_chain(client.getpeercert(binary_form=True), sent_chain(client) or [],
                           pki["root"].cert, NOW)


def test_the_pledge_refuses_renegotiation(pki, tmp_path):
    # TLS 1.2 renegotiation could show another certificate after the chain was checked.
    client = handshake(tmp_path, [pki["registrar"], pki["sub"]], pki["registrar"].key,
                       ssl.TLSVersion.TLSv1_2)
    assert client.context.options & ssl.OP_NO_RENEGOTIATION
    assert not ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).options & ssl.OP_NO_RENEGOTIATION


def test_sent_chain_is_none_when_the_tls_layer_cannot_tell():
    class Opaque:
        pass

    assert sent_chain(Opaque()) is None  # type: ignore[arg-type]


# -- the runner over real TLS on loopback: which connection carries what ----------------------


class Registrar:
    """A TLS server on ::1 answering each request with the next canned reply; it records the
    requests per connection."""

    def __init__(self, cert: Path, key: Path, replies: list[bytes]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.replies = replies
        self.connections: list[list[bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine: list[bytes] = []
        self.connections.append(mine)
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                mine.append(head.split(b" ")[1] + b" " + await reader.readexactly(length))
                reply = self.replies.pop(0)
                writer.write(reply)
                await writer.drain()
                if b"Connection: close" in reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def paths(self) -> list[list[str]]:
        return [[r.split(b" ")[0].decode().rsplit("/", 1)[1] for r in c]
                for c in self.connections]


def reply(status: str, body: bytes = b"", *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


NONCE = b"\x07" * 16


def enroll_against(tmp_path: Path, replies: list[bytes], *, keep: bool = True
                   ) -> tuple[EnrollResult, Registrar]:
    async def go() -> tuple[EnrollResult, Registrar]:
        registrar = Registrar(tmp_path / "pki/domain/registrar.crt",
                              tmp_path / "pki/domain/registrar.key", replies)
        server = await asyncio.start_server(registrar.handle, "::1", 0,
                                            ssl=registrar.context)
        port = server.sockets[0].getsockname()[1]
        (ident,) = identities_from_pki(tmp_path / "pki", serials=["dev-1"])
        settings = Settings(anchors=load_anchors(tmp_path / "pki/masa/ca.crt"),
                            out_dir=tmp_path / "out", deadline=20, backoff_initial=0.05,
                            backoff_cap=0.1, keep_connection=keep)
        runner = PledgeRunner(ident, [Candidate("::1", port, "static")], settings,
                              rng=lambda n: NONCE[:n])
        try:
            return await runner.run(), registrar
        finally:
            server.close()

    return asyncio.run(go())


@pytest.fixture
def lab_pki(tmp_path: Path) -> test_pki.TestPki:
    pki = create_test_pki(NOW, serials=["dev-1"])
    write_pki(tmp_path / "pki", pki, {"masa_url": "masa.example:9443",
                                      "manufacturer": "Example Manufacturer",
                                      "domain": "Example Domain"})
    return pki


def voucher_reply(pki: test_pki.TestPki, pinned: x509.Certificate, *headers: str) -> bytes:
    voucher = Voucher(serial_number="dev-1", assertion=Assertion.PROXIMITY, nonce=NONCE,
                      created_on=NOW, pinned_domain_cert=pinned.public_bytes(DER))
    body = sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    return reply("200 OK", body, "Content-Type: application/voucher-cms+json", *headers)


# After the voucher: voucher_status, then cacerts refused with 404, reported in enrollstatus.
AFTER_VOUCHER = [reply("200 OK"), reply("404 Not Found"), reply("200 OK")]


def test_the_runner_keeps_the_provisional_connection_when_the_chain_holds(lab_pki, tmp_path):
    result, registrar = enroll_against(
        tmp_path, [voucher_reply(lab_pki, lab_pki.domain_ca.cert), *AFTER_VOUCHER])
    assert result.code == "http-404", result
    assert registrar.paths() == [["requestvoucher", "voucher_status", "cacerts",
                                  "enrollstatus"]]
    assert any("kept" in e for e in result.events)


def test_the_runner_reconnects_when_told_to_or_when_the_registrar_closes(lab_pki, tmp_path):
    old, registrar = enroll_against(
        tmp_path, [voucher_reply(lab_pki, lab_pki.domain_ca.cert), *AFTER_VOUCHER],
        keep=False)
    assert old.code == "http-404"
    assert registrar.paths() == [["requestvoucher"],
                                 ["voucher_status", "cacerts", "enrollstatus"]]
    closed, registrar = enroll_against(
        tmp_path, [voucher_reply(lab_pki, lab_pki.domain_ca.cert, "Connection: close"),
                   *AFTER_VOUCHER])
    assert closed.code == "http-404"
    assert registrar.paths() == [["requestvoucher"],
                                 ["voucher_status", "cacerts", "enrollstatus"]]
    assert not any("kept" in e for e in closed.events)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "new-connection"])
def test_the_runner_refuses_a_registrar_outside_the_pin_and_reports_it(lab_pki, tmp_path,
                                                                       keep):
    elsewhere = create_test_pki(NOW, domain="Elsewhere")
    result, registrar = enroll_against(
        tmp_path, [voucher_reply(lab_pki, elsewhere.domain_ca.cert), reply("200 OK")],
        keep=keep)
    assert result.code == "tls-pin", result
    assert "does not chain to the pinned-domain-cert" in result.reason
    # Nothing went over the refused connection; voucher_status went over a new provisional
    # one, saying why; no other proxy is left to try.
    assert registrar.paths() == [["requestvoucher"], ["voucher_status"]]
    status = registrar.connections[1][0].split(b" ", 1)[1]
    report = json.loads(status)
    assert report["status"] is False and "pinned-domain-cert" in report["reason"]
    assert not any("kept" in e for e in result.events)
