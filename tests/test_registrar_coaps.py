"""The registrar's CoAPS front door (issue 13 item 2), against real registrar and MASA processes:
an aiocoap client over coaps_io with a pledge IDevID, and libcoap's coap-client-openssl as the
independent peer. Every answer checked for what it carries; refusals in the log and metrics."""

import asyncio
import base64
import datetime
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiocoap
import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from brski import certs, coap_formats, cose
from brski.dtls import DtlsConfig, DtlsSession
from brski.pki import Issued
from brski.signed_voucher import verify_voucher_cose
from brski.telemetry import StatusReport
from coaps_io.aiocoap_dtls import create_client_context
from lab.registrar_setup import write_configs
from lab.registrar_testing import ServiceProcess, free_port, load_issued
from registrar.store import Store
from tests.test_masa import brski_pki
from tests.test_masa_cose import cose_pvr

COAP_CLIENT = shutil.which("coap-client-openssl")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


class Lab:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.root = work / "pki"
        brski_pki("init", str(self.root), "--serial", "SN-A", "--serial", "SN-B",
                  "--serial", "SN-C", "--serial", "SN-D")
        self.foreign_root = work / "foreign"
        brski_pki("init", str(self.foreign_root), "--manufacturer", "Rogue Manufacturer",
                  "--serial", "SN-A")
        self.registrar = load_issued(self.root / "domain/registrar.crt",
                                     self.root / "domain/registrar.key")
        self.domain_ca = x509.load_pem_x509_certificate(
            (self.root / "domain/ca.crt").read_bytes())
        self.masa_port, self.https_port = free_port(), free_port()
        self.coaps_port, self.metrics_port = free_udp_port(), free_port()
        registrar_toml, masa_toml = write_configs(
            self.root, work, masa_listen=[f"[::1]:{self.masa_port}"],
            registrar_listen=[f"[::1]:{self.https_port}"], masa_timeout=5,
            coaps_listen=f"[::1]:{self.coaps_port}")
        self.masa_signer = work / "masa-signer.pem"
        self.masa_signer.write_bytes(x509.load_pem_x509_certificates(
            (work / "masa-signer-chain.pem").read_bytes())[0].public_bytes(Encoding.PEM))
        self.masa = ServiceProcess("registrar.masa_cli", masa_toml, work / "masa.log")
        self.reg = ServiceProcess("registrar.cli", registrar_toml, work / "registrar.log")
        self.reg.argv += ["--metrics", f"[::1]:{self.metrics_port}"]

    def idevid(self, serial: str, *, foreign: bool = False) -> Issued:
        d = (self.foreign_root if foreign else self.root) / "manufacturer/idevid"
        return load_issued(d / f"{serial}.crt", d / f"{serial}.key")

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://[::1]:{self.metrics_port}/metrics",
                                    timeout=10) as answer:
            text = answer.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        match = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def store(self) -> Store:
        return Store(self.work / "registrar.db", "registrar")

    @property
    def uri(self) -> str:
        return f"coaps://[::1]:{self.coaps_port}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("registrar-coaps"))
    lab.masa.start()
    try:
        lab.reg.start()
        yield lab
    finally:
        lab.reg.stop()
        lab.masa.stop()
    assert "Traceback" not in lab.reg.log(), lab.reg.log()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


async def exchange(lab: Lab, idevid: Issued, requests: list[aiocoap.Message]):
    """One DTLS session with ``idevid``; the responses to ``requests`` in turn."""
    ctx, _ = await create_client_context(
        DtlsConfig(idevid.cert, idevid.key, [lab.domain_ca]), bind=("::1", 0))
    try:
        return [await ctx.request(r).response for r in requests]
    finally:
        await ctx.shutdown()


def req(lab: Lab, method, path: str, payload: bytes = b"", **opts) -> aiocoap.Message:
    return aiocoap.Message(code=method, uri=f"{lab.uri}{path}", payload=payload, **opts)


def csr_for(idevid: Issued) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(idevid.cert.subject).sign(key, hashes.SHA256()))
    return csr.public_bytes(Encoding.DER), key


def openssl_verify(tmp_path: Path, lab: Lab, cert: x509.Certificate) -> str:
    leaf = tmp_path / "ldevid.pem"
    leaf.write_bytes(cert.public_bytes(Encoding.PEM))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(lab.root / "domain/ca.crt"),
                           str(leaf)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def test_pledge_enrolls_over_coaps(lab, tmp_path):
    idevid = lab.idevid("SN-A")
    nonce = os.urandom(8)
    pvr = cose_pvr(idevid, "SN-A", lab.registrar.cert, nonce=nonce)
    der, key = csr_for(idevid)
    telemetry = StatusReport(True).encode_cbor()
    rv, sen, crts, vs, es = run(exchange(lab, idevid, [
        req(lab, aiocoap.POST, "/.well-known/brski/rv", pvr, content_format=836),
        req(lab, aiocoap.POST, "/.well-known/est/sen", der, content_format=286, accept=287),
        # Block2 with 64-byte blocks: the client asks small, aiocoap reassembles.
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=62, block2=(0, False, 2)),
        req(lab, aiocoap.POST, "/.well-known/brski/vs", telemetry, content_format=60),
        req(lab, aiocoap.POST, "/.well-known/brski/es", telemetry, content_format=60),
    ]))
    assert rv.code == aiocoap.CHANGED and rv.opt.content_format == 836, rv
    assert cose.decode(rv.payload).x5bag == ()  # stripped (cBRSKI §6.8)
    signer = x509.load_pem_x509_certificate(lab.masa_signer.read_bytes())
    voucher, _ = verify_voucher_cose(rv.payload, [signer], now(), serial_number="SN-A",
                                     nonce=nonce)
    assert voucher.pinned_domain_cert == lab.domain_ca.public_bytes(Encoding.DER)

    assert sen.code == aiocoap.CHANGED and sen.opt.content_format == 287, sen
    ldevid = x509.load_der_x509_certificate(sen.payload)
    assert ldevid.subject == idevid.cert.subject
    assert ": OK" in openssl_verify(tmp_path, lab, ldevid)

    assert crts.code == aiocoap.CONTENT and crts.opt.content_format == 62
    assert coap_formats.decode_certs(crts.payload, 62) == [lab.domain_ca]
    assert crts.opt.etag is not None and crts.opt.size2 == len(crts.payload)
    assert crts.opt.block2 is not None and crts.opt.block2.size_exponent == 2
    assert vs.code == aiocoap.CHANGED and vs.payload == b""
    assert es.code == aiocoap.CHANGED and es.payload == b""

    # Re-enrollment with the LDevID just issued, over a session it authenticates.
    der2, _ = csr_for(idevid)
    (sren,) = run(exchange(lab, Issued(ldevid, key), [
        req(lab, aiocoap.POST, "/.well-known/est/sren", der2, content_format=286)]))
    assert sren.code == aiocoap.CHANGED and sren.opt.content_format == 281, sren.payload
    renewed = coap_formats.decode_certs(sren.payload, 281)[0]
    assert renewed.subject == ldevid.subject and renewed.serial_number != ldevid.serial_number
    assert ": OK" in openssl_verify(tmp_path, lab, renewed)

    with lab.store() as store:
        assert [v.nonce for v in store.vouchers("SN-A")]  # the MASA's voucher, stored
        kinds = sorted(t.kind for t in store.telemetry("SN-A"))
        assert kinds == ["enrollstatus", "voucher_status"]
        assert any(c.der == ldevid.public_bytes(Encoding.DER)
                   for c in store.certificates("SN-A"))


def test_crts_formats_and_att(lab):
    idevid = lab.idevid("SN-B")
    p7, pkix, default, att, bad = run(exchange(lab, idevid, [
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=281),
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=287),
        req(lab, aiocoap.GET, "/.well-known/est/crts"),
        req(lab, aiocoap.GET, "/.well-known/est/att"),
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=50),
    ]))
    assert coap_formats.decode_certs(p7.payload, 281) == [lab.domain_ca]
    assert pkix.opt.content_format == 287 and pkix.payload == lab.domain_ca.public_bytes(
        Encoding.DER)
    assert default.opt.content_format == 281  # RFC 9148 §5.3: no Accept -> 281
    assert att.code == aiocoap.CONTENT and att.opt.content_format == 285
    assert bad.code == aiocoap.NOT_ACCEPTABLE
    assert len({p7.opt.etag, pkix.opt.etag}) == 2 and default.opt.etag == p7.opt.etag
    valid, changed = run(exchange(lab, idevid, [
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=287, etags=[pkix.opt.etag]),
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=62, etags=[pkix.opt.etag])]))
    assert valid.code == aiocoap.VALID and valid.payload == b""
    assert valid.opt.etag == pkix.opt.etag
    assert changed.code == aiocoap.CONTENT and changed.opt.content_format == 62


def test_well_known_core_and_uri_path_abbrev(lab):
    idevid = lab.idevid("SN-B")
    brski, est, abbrev = run(exchange(lab, idevid, [
        req(lab, aiocoap.GET, "/.well-known/core?rt=brski*"),
        req(lab, aiocoap.GET, "/.well-known/core?rt=ace.est*"),
        aiocoap.Message(code=aiocoap.GET, uri=lab.uri, uri_path_abbrev=301, accept=287),
    ]))
    text = brski.payload.decode()
    for short in ("rv", "vs", "es"):
        assert f"</.well-known/brski/{short}>;" in text and f"rt=brski.{short}" in text, text
    assert "est" not in text
    text = est.payload.decode()
    for short in ("crts", "sen", "sren", "att"):
        assert f"rt=ace.est.{short}" in text, text
    assert "brski" not in text
    assert abbrev.code == aiocoap.CONTENT
    assert abbrev.payload == lab.domain_ca.public_bytes(Encoding.DER)


def test_refusals_get_coap_codes_logged_and_counted(lab):
    idevid = lab.idevid("SN-C")
    good = cose_pvr(idevid, "SN-C", lab.registrar.cert)
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    other = cose_pvr(idevid, "SN-C", lab.idevid("SN-D").cert)  # another "registrar"
    json_body = json.dumps({"ietf-voucher-request:voucher": {"serial-number": "SN-C"}}).encode()
    before = lab.metric("brski_registrar_refusals_total", endpoint="rv", reason="forbidden")
    with lab.store() as store:
        known = len(store.voucher_requests("SN-C"))
    answers = run(exchange(lab, idevid, [
        req(lab, aiocoap.POST, "/.well-known/brski/rv", tampered, content_format=836),
        req(lab, aiocoap.POST, "/.well-known/brski/rv", other, content_format=836),
        req(lab, aiocoap.POST, "/.well-known/brski/rv", json_body, content_format=836),
        req(lab, aiocoap.POST, "/.well-known/brski/rv", good, content_format=50),
        req(lab, aiocoap.POST, "/.well-known/brski/rv", b"\xd2" + bytes(20000),
            content_format=836),
        req(lab, aiocoap.POST, "/.well-known/brski/rv", good, content_format=836, accept=50),
        req(lab, aiocoap.POST, "/.well-known/est/sren", b"", content_format=286),
        req(lab, aiocoap.GET, "/.well-known/brski/nothing"),
        req(lab, aiocoap.POST, "/.well-known/est/sen", b"\x30\x03abc", content_format=286),
        req(lab, aiocoap.PUT, "/.well-known/est/crts", b"x"),
        aiocoap.Message(code=aiocoap.GET, uri=lab.uri, uri_path_abbrev=999),
    ]))
    codes = [a.code for a in answers]
    assert codes == [aiocoap.FORBIDDEN, aiocoap.UNAUTHORIZED, aiocoap.UNSUPPORTED_CONTENT_FORMAT,
                     aiocoap.UNSUPPORTED_CONTENT_FORMAT, aiocoap.REQUEST_ENTITY_TOO_LARGE,
                     aiocoap.NOT_ACCEPTABLE, aiocoap.FORBIDDEN, aiocoap.NOT_FOUND,
                     aiocoap.BAD_REQUEST, aiocoap.METHOD_NOT_ALLOWED, aiocoap.BAD_OPTION], [
                         str(c) for c in codes]
    assert b"signature" in answers[0].payload
    assert lab.metric("brski_registrar_refusals_total", endpoint="rv",
                      reason="forbidden") == before + 1
    assert lab.metric("brski_registrar_refusals_total", endpoint="request",
                      reason="too-large") >= 1
    assert lab.metric("brski_registrar_refusals_total", endpoint="unknown",
                      reason="not-found") >= 1
    assert lab.metric("brski_registrar_refusals_total", endpoint="crts",
                      reason="method-not-allowed") >= 1
    log = lab.reg.log()
    line = [ln for ln in log.splitlines() if "CoAPS" in ln and "signature" in ln]
    assert len(line) == 1 and "serialNumber=SN-C" in line[0], line
    with lab.store() as store:
        # Refused before the MASA was asked: nothing pending, nothing half-written.
        assert len(store.voucher_requests("SN-C")) == known
        assert store.vouchers("SN-C") == []


def test_wrong_nonce_voucher_request_is_refused(lab):
    """A PVR signed by the pledge whose nonce is 2 bytes (8..32 required): 4.00, no voucher."""
    idevid = lab.idevid("SN-D")
    # SID-keyed PVR by hand (the library refuses to sign it): 1 assertion proximity, 7 nonce,
    # 12 proximity-registrar-pubk, 13 serial-number (cBRSKI §9.1).
    payload = cbor2.dumps({2501: {1: 2, 7: b"\x01\x02", 12: certs.spki_der(lab.registrar.cert),
                                  13: "SN-D"}})
    pvr = cose.sign(payload, idevid.key)
    (answer,) = run(exchange(lab, idevid, [
        req(lab, aiocoap.POST, "/.well-known/brski/rv", pvr, content_format=836)]))
    assert answer.code == aiocoap.BAD_REQUEST and b"nonce" in answer.payload, answer.payload
    with lab.store() as store:
        assert store.vouchers("SN-D") == []


def test_voucher_only_leaf_in_pvr_is_ignored(lab):
    idevid = lab.idevid("SN-B")
    nonce = os.urandom(8)
    # 2451 + 8 = pinned-domain-cert, a voucher leaf a voucher-request does not have: as the
    # absolute SID of another module's leaf, it is an unknown key to ignore (RFC 8995 §3.4).
    pvr = cose_pvr(idevid, "SN-B", lab.registrar.cert, nonce=nonce,
                   extra=((2459, b"\x01\x02"),))
    (answer,) = run(exchange(lab, idevid, [
        req(lab, aiocoap.POST, "/.well-known/brski/rv", pvr, content_format=836)]))
    assert answer.code == aiocoap.CHANGED, answer.payload
    signer = x509.load_pem_x509_certificate(lab.masa_signer.read_bytes())
    verify_voucher_cose(answer.payload, [signer], now(), serial_number="SN-B", nonce=nonce)


def test_unknown_manufacturer_is_refused_in_the_handshake(lab):
    before = lab.metric("brski_registrar_coaps_drops_total", reason="handshake-failed")
    rogue = lab.idevid("SN-A", foreign=True)
    with pytest.raises(aiocoap.error.NetworkError):
        run(exchange(lab, rogue, [req(lab, aiocoap.GET, "/.well-known/est/crts")]))
    assert lab.metric("brski_registrar_coaps_drops_total",
                      reason="handshake-failed") == before + 1
    assert lab.reg.alive()


def test_garbage_datagrams_are_counted_and_the_registrar_keeps_serving(lab):
    before = lab.metric("brski_registrar_coaps_drops_total", reason="garbage")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        for junk in (b"", b"\x00" * 13, os.urandom(200), b"\x17\xfe\xfd" + os.urandom(40)):
            sock.sendto(junk, ("::1", lab.coaps_port))
    idevid = lab.idevid("SN-B")
    (answer,) = run(exchange(lab, idevid, [
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=287)]))
    assert answer.code == aiocoap.CONTENT
    assert lab.metric("brski_registrar_coaps_drops_total", reason="garbage") >= before + 3
    assert lab.reg.alive()


def test_masa_down_gets_5_03_with_max_age_then_the_same_pvr_succeeds(lab):
    idevid = lab.idevid("SN-D")
    nonce = os.urandom(8)
    pvr = cose_pvr(idevid, "SN-D", lab.registrar.cert, nonce=nonce)
    rv = (lab, aiocoap.POST, "/.well-known/brski/rv", pvr)
    lab.masa.stop()
    try:
        (answer,) = run(exchange(lab, idevid, [req(*rv, content_format=836)]))
    finally:
        lab.masa.start()
    # RFC 9148 §5.7: the HTTPS side's 202 + Retry-After is 5.03 + Max-Age here.
    assert answer.code == aiocoap.SERVICE_UNAVAILABLE and answer.opt.max_age == 5, answer
    with lab.store() as store:
        assert [r.status for r in store.voucher_requests("SN-D")][-1] == "pending"
    (answer,) = run(exchange(lab, idevid, [req(*rv, content_format=836)]))
    assert answer.code == aiocoap.CHANGED, answer.payload
    signer = x509.load_pem_x509_certificate(lab.masa_signer.read_bytes())
    verify_voucher_cose(answer.payload, [signer], now(), serial_number="SN-D", nonce=nonce)


def test_client_hello_flood_without_cookies_is_counted_and_keeps_no_session(lab):
    idevid = lab.idevid("SN-B")
    before = lab.metric("brski_registrar_coaps_drops_total", reason="no-cookie")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        for _ in range(30):
            (hello,) = DtlsSession.client(DtlsConfig(
                idevid.cert, idevid.key, [lab.domain_ca])).datagrams_to_send()
            sock.sendto(hello, ("::1", lab.coaps_port))
    (answer,) = run(exchange(lab, idevid, [
        req(lab, aiocoap.GET, "/.well-known/est/crts", accept=287)]))
    assert answer.code == aiocoap.CONTENT
    # 30 from the flood, and the served client's own first ClientHello.
    assert lab.metric("brski_registrar_coaps_drops_total", reason="no-cookie") == before + 31
    assert lab.metric("brski_registrar_coaps_sessions") <= 1


@pytest.mark.parametrize("value, message", [
    ('"[::1]"', "listen"), ('"[::1]:99999"', "listen"), ("5684", "listen")])
def test_coaps_listen_errors_name_the_key(lab, tmp_path, value, message):
    text = (lab.work / "registrar.toml").read_text().replace(
        f'listen = "[::1]:{lab.coaps_port}"', f"listen = {value}")
    bad = tmp_path / "registrar.toml"
    bad.write_text(text)
    done = subprocess.run([sys.executable, "-m", "registrar.cli", "--config", str(bad),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stderr
    assert "[coaps]" in done.stderr or "coaps" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_random_bodies_never_get_an_internal_error(lab):
    """Mutated PVRs, CSRs and reports on every POST resource: 4.xx each, never 5.00."""
    rng = random.Random(13)
    idevid = lab.idevid("SN-C")
    seeds = {"/.well-known/brski/rv": (cose_pvr(idevid, "SN-C", lab.registrar.cert), 836),
             "/.well-known/est/sen": (csr_for(idevid)[0], 286),
             "/.well-known/brski/vs": (StatusReport(False, "x").encode_cbor(), 60),
             "/.well-known/brski/es": (b'{"version":1,"status":true}', 50)}
    requests = []
    for path, (seed, form) in seeds.items():
        for _ in range(12):
            body = bytearray(seed)
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            requests.append(req(lab, aiocoap.POST, path, bytes(body[:rng.randint(1, len(body))]),
                                content_format=form))
    answers = run(exchange(lab, idevid, requests))
    assert all(a.code.class_ == 4 for a in answers), [str(a.code) for a in answers]
    assert "internal error" not in lab.reg.log()
    with lab.store() as store:
        assert store.vouchers("SN-C") == []


# --- libcoap's coap-client-openssl as the independent peer ----------------------------------


def libcoap(lab: Lab, tmp_path: Path, serial: str, *args: str) -> tuple[str, Path]:
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    d = lab.root / "manufacturer/idevid"
    out = tmp_path / "out.bin"
    out.unlink(missing_ok=True)
    cmd = [COAP_CLIENT, "-B", "20", "-c", str(d / f"{serial}.crt"), "-j",
           str(d / f"{serial}.key"), "-C", str(lab.root / "domain/ca.crt"), "-o", str(out),
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr, out


@pytest.mark.parametrize("accept", [281, 287, 62])
def test_libcoap_gets_crts_blockwise(lab, tmp_path, accept):
    text, out = libcoap(lab, tmp_path, "SN-B", "-m", "get", "-b", "64", "-A", str(accept),
                        f"{lab.uri}/.well-known/est/crts")
    assert out.exists(), text
    assert coap_formats.decode_certs(out.read_bytes(), accept) == [lab.domain_ca], text


def test_libcoap_posts_brski_voucher_pvr_and_the_answer_verifies(lab, tmp_path):
    nonce = base64.b64encode(os.urandom(8)).decode()
    pvr_json = tmp_path / "pvr.json"
    pvr_json.write_text(json.dumps({"ietf-voucher-request:voucher": {
        "assertion": "proximity", "created-on": "2026-01-01T00:00:00Z",
        "serial-number": "SN-B", "nonce": nonce,
        "proximity-registrar-pubk": base64.b64encode(
            certs.spki_der(lab.registrar.cert)).decode()}}))
    pvr = tmp_path / "pvr.vch"
    done = subprocess.run([sys.executable, "-m", "brski.cli.voucher", "sign", "--in",
                           str(pvr_json), "--key", str(lab.root / "manufacturer/idevid/SN-B.key"),
                           "--format", "cose", "--out", str(pvr)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text, out = libcoap(lab, tmp_path, "SN-B", "-m", "post", "-t", "836", "-f", str(pvr),
                        f"{lab.uri}/.well-known/brski/rv")
    assert out.exists() and out.stat().st_size > 64, text
    done = subprocess.run([sys.executable, "-m", "brski.cli.voucher", "verify", str(out),
                           "--trust", str(lab.masa_signer), "--serial", "SN-B",
                           f"--nonce={nonce}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "valid COSE voucher" in done.stdout, done.stderr


def test_libcoap_with_unknown_manufacturer_gets_an_alert(lab, tmp_path):
    d = lab.foreign_root / "manufacturer/idevid"
    out = tmp_path / "out.bin"
    done = subprocess.run([COAP_CLIENT, "-B", "10", "-c", str(d / "SN-A.crt"), "-j",
                           str(d / "SN-A.key"), "-C", str(lab.root / "domain/ca.crt"),
                           "-o", str(out), "-m", "get", f"{lab.uri}/.well-known/est/crts"],
                          capture_output=True, text=True, timeout=60)
    text = done.stdout + done.stderr
    assert not out.exists() or out.read_bytes() == b""
    assert "alert" in text.lower() and "unknown ca" in text.lower(), text


