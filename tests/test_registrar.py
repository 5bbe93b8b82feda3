"""The registrar with a real MASA, both as processes over TLS on loopback: the voucher flow
with its refusals, EST enrollment checked by openssl, telemetry, and restarts."""

import datetime
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from brski import est
from brski.chain import verify_chain
from brski.pki import create_test_pki
from brski.signed_voucher import verify_voucher_cms
from brski.voucher import Assertion
from lab.registrar_setup import write_configs
from lab.registrar_testing import (
    Answer,
    ServiceProcess,
    call,
    client_context,
    free_port,
    load_issued,
    make_pvr,
)
from registrar.store import Store

VCJ = "application/voucher-cms+json"
RV = "/.well-known/brski/requestvoucher"
EST = "/.well-known/est"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Setup:
    """A PKI, a MASA and a registrar (each started on demand)."""

    def __init__(self, pki: Path, work: Path, *, masa_port: int | None = None,
                 **options) -> None:
        self.pki = pki
        self.work = work
        self.port = free_port()
        self.masa_port = masa_port or free_port()
        self.registrar_toml, self.masa_toml = write_configs(
            pki, work, registrar_listen=[f"[::1]:{self.port}", f"127.0.0.1:{self.port}"],
            masa_listen=[f"[::1]:{self.masa_port}"], retry_after=2, masa_timeout=5, **options)
        self.masa = ServiceProcess("registrar.masa_cli", self.masa_toml, work / "masa.log")
        self.registrar = ServiceProcess("registrar.cli", self.registrar_toml,
                                        work / "registrar.log")
        self.masa_ca = x509.load_pem_x509_certificate((pki / "masa/ca.crt").read_bytes())
        self.domain_ca = x509.load_pem_x509_certificate((pki / "domain/ca.crt").read_bytes())

    def stop(self) -> None:
        self.registrar.stop()
        self.masa.stop()
        for service in (self.registrar, self.masa):
            assert "Traceback" not in service.log(), service.log()

    def pledge_ctx(self, serial: str):
        d = self.pki / "manufacturer/idevid"
        return client_context(d / f"{serial}.crt", d / f"{serial}.key")

    def call(self, method: str, path: str, *, serial: str | None = None, ctx=None,
             host: str = "::1", **kw) -> Answer:
        if ctx is None and serial is not None:
            ctx = self.pledge_ctx(serial)
        return call(host, self.port, method, path, ctx=ctx, **kw)

    def pvr(self, serial: str, *, registrar_cert: bytes | None = None, **kw) -> bytes:
        d = self.pki / "manufacturer/idevid"
        idevid = load_issued(d / f"{serial}.crt", d / f"{serial}.key")
        if registrar_cert is None:
            registrar_cert = self.call("GET", f"{EST}/cacerts", serial=serial).server_cert
        return make_pvr(idevid, serial, registrar_cert, now(), **kw)

    def request_voucher(self, serial: str, body: bytes | None = None, **kw) -> Answer:
        return self.call("POST", RV, serial=serial, body=body or self.pvr(serial),
                         content_type=VCJ, **kw)

    def enroll(self, serial: str, key=None, *, ctx=None, path: str = "simpleenroll") -> Answer:
        key = key or ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
            key, hashes.SHA256())
        return self.call("POST", f"{EST}/{path}", serial=serial, ctx=ctx,
                         body=est.encode_csr_body(csr), content_type=est.MEDIA_PKCS10)


def brski_pki(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registrar") / "pki"
    brski_pki("init", str(root), *[a for s in ("SN-1", "SN-2", "SN-3", "SN-4", "SN-5")
                                   for a in ("--serial", s)])
    return root


@pytest.fixture(scope="module")
def up(pki, tmp_path_factory):
    setup = Setup(pki, tmp_path_factory.mktemp("up"))
    setup.masa.start()
    setup.registrar.start()
    yield setup
    setup.stop()


def ldevid_of(answer: Answer) -> x509.Certificate:
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"] == est.MEDIA_CERTS_ONLY
    [cert] = est.decode_certs_only(est.decode_base64(answer.body))
    return cert


# --- the voucher -----------------------------------------------------------------------------


def test_pledge_gets_a_voucher_pinning_the_domain_that_signs_the_tls_cert(up):
    answer = up.request_voucher("SN-1")
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"] == VCJ
    voucher, _ = verify_voucher_cms(answer.body, [up.masa_ca], now(), serial_number="SN-1")
    assert voucher.assertion is Assertion.PROXIMITY
    pinned = x509.load_der_x509_certificate(voucher.pinned_domain_cert)
    # RFC 8995 §5.6.2: the registrar's TLS certificate chains to the pinned-domain-cert.
    tls = x509.load_der_x509_certificate(answer.server_cert)
    verify_chain(tls, [], [pinned], now())


def test_the_same_request_again_gets_the_same_voucher(up):
    body = up.pvr("SN-2")
    first = up.request_voucher("SN-2", body)
    again = up.request_voucher("SN-2", body)
    assert first.status == again.status == 200
    assert first.body == again.body


def test_proximity_cert_of_another_registrar_gets_401_and_a_closed_connection(up):
    other = create_test_pki(now()).registrar.cert.public_bytes(Encoding.DER)
    answer = up.request_voucher("SN-1", up.pvr("SN-1", registrar_cert=other))
    assert answer.status == 401
    assert "proximity-registrar-cert" in answer.text
    assert answer.headers.get("connection", "").lower() == "close"


def test_assertion_other_than_proximity_gets_401(up):
    answer = up.request_voucher("SN-1", up.pvr("SN-1", assertion=Assertion.LOGGED))
    assert answer.status == 401


def test_request_signed_by_another_idevid_gets_403(up):
    answer = up.request_voucher("SN-1", up.pvr("SN-2"))  # TLS as SN-1, PVR from SN-2
    assert answer.status == 403
    assert "IDevID that authenticated" in answer.text


def test_unknown_manufacturer_is_refused_in_the_tls_handshake(up, tmp_path):
    foreign = create_test_pki(now(), serials=["SN-1"]).idevids["SN-1"]
    (tmp_path / "f.crt").write_bytes(foreign.cert_pem())
    (tmp_path / "f.key").write_bytes(foreign.key_pem())
    ctx = client_context(tmp_path / "f.crt", tmp_path / "f.key")
    with pytest.raises(OSError):
        up.call("POST", RV, ctx=ctx, body=b"x", content_type=VCJ)


def test_no_client_certificate_gets_401(up):
    answer = up.call("POST", RV, ctx=client_context(), body=up.pvr("SN-1"), content_type=VCJ)
    assert answer.status == 401


def test_wrong_content_type_gets_415(up):
    answer = up.call("POST", RV, serial="SN-1", body=up.pvr("SN-1"),
                     content_type="application/json")
    assert answer.status == 415


def test_garbage_gets_400_over_ipv4_too(up):
    answer = up.call("POST", RV, serial="SN-1", body=b"not cms", content_type=VCJ,
                     host="127.0.0.1")
    assert answer.status == 400
    assert answer.headers["content-type"].startswith("text/plain")


def test_masa_refusal_is_passed_on_with_its_reason(up):
    brski_pki("idevid", str(up.pki), "--serial", "SN-LATE")  # not in the MASA's table
    try:
        answer = up.request_voucher("SN-LATE")
    finally:
        for ext in ("crt", "key"):
            (up.pki / f"manufacturer/idevid/SN-LATE.{ext}").unlink()
    assert answer.status == 404
    assert "MASA refused" in answer.text and "not known" in answer.text


# --- EST -------------------------------------------------------------------------------------


def test_cacerts_answers_without_a_client_certificate(up):
    answer = up.call("GET", f"{EST}/cacerts", ctx=client_context())
    assert answer.status == 200
    assert est.decode_certs_only(est.decode_base64(answer.body)) == [up.domain_ca]


def test_csrattrs_asks_for_ecdsa_with_sha256(up):
    answer = up.call("GET", f"{EST}/csrattrs", serial="SN-1")
    assert answer.status == 200
    assert answer.headers["content-type"] == est.MEDIA_CSRATTRS
    attrs = est.decode_csrattrs(est.decode_base64(answer.body))
    assert [a.oid for a in attrs] == [est.OID_ECDSA_WITH_SHA256]


def test_enroll_gives_an_ldevid_openssl_accepts(up, tmp_path):
    cert = ldevid_of(up.enroll("SN-3"))
    idevid = x509.load_pem_x509_certificate(
        (up.pki / "manufacturer/idevid/SN-3.crt").read_bytes())
    assert cert.subject == idevid.subject
    (tmp_path / "ldevid.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(up.pki / "domain/ca.crt"),
                           str(tmp_path / "ldevid.pem")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(": OK")
    refused = subprocess.run(["openssl", "verify", "-CAfile",
                              str(up.pki / "manufacturer/ca.crt"), str(tmp_path / "ldevid.pem")],
                             capture_output=True, text=True)
    assert refused.returncode != 0


def test_reenroll_with_the_ldevid_keeps_the_subject(up, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    first = ldevid_of(up.enroll("SN-4", key))
    (tmp_path / "l.crt").write_bytes(first.public_bytes(Encoding.PEM))
    (tmp_path / "l.key").write_bytes(key.private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ldevid_ctx = client_context(tmp_path / "l.crt", tmp_path / "l.key")
    second = ldevid_of(up.enroll("SN-4", ctx=ldevid_ctx, path="simplereenroll"))
    assert second.subject == first.subject
    assert second.serial_number != first.serial_number
    # ...and an LDevID cannot do what needs the IDevID, nor the other way round.
    assert up.enroll("SN-4", ctx=ldevid_ctx).status == 403
    assert up.enroll("SN-4", path="simplereenroll").status == 403


def test_csr_with_a_bad_signature_gets_400(up):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    der = bytearray(csr.public_bytes(Encoding.DER))
    der[-4] ^= 0x10
    answer = up.call("POST", f"{EST}/simpleenroll", serial="SN-5",
                     body=est.encode_base64(bytes(der)), content_type=est.MEDIA_PKCS10)
    assert answer.status == 400
    assert "signature" in answer.text


def test_enroll_needs_pkcs10_and_a_client_certificate(up):
    assert up.call("POST", f"{EST}/simpleenroll", serial="SN-5", body=b"AAAA",
                   content_type="text/plain").status == 415
    assert up.enroll("SN-5", ctx=client_context()).status == 401


@pytest.mark.parametrize("path", [RV, "/.well-known/brski/voucher_status",
                                  "/.well-known/brski/enrollstatus", f"{EST}/simpleenroll",
                                  f"{EST}/simplereenroll"])
def test_junk_never_gets_a_500_and_the_server_keeps_serving(up, path):
    rng = random.Random(path)
    types = [VCJ, "application/json", est.MEDIA_PKCS10, "text/plain"]
    pvr = up.pvr("SN-1")
    bodies = [b"", b"{}", b"\x30\x80", pvr[: len(pvr) // 2], pvr + b"\x00"]
    bodies += [rng.randbytes(rng.randrange(1, 3000)) for _ in range(10)]
    for i, body in enumerate(bodies):
        answer = up.call("POST", path, serial="SN-1", body=body, content_type=types[i % 4])
        assert 400 <= answer.status < 500, (path, body[:40], answer.status, answer.text)
        assert answer.headers["content-type"].startswith("text/plain")
    assert up.registrar.alive()
    assert "Traceback" not in up.registrar.log()


def test_a_body_over_the_limit_gets_413(up):
    answer = up.call("POST", RV, serial="SN-1", body=b"\x30" * (300 * 1024), content_type=VCJ)
    assert answer.status == 413
    assert "too large" in answer.text


# --- telemetry -------------------------------------------------------------------------------


def test_status_reports_are_recorded_and_bad_ones_refused(up):
    ok = up.call("POST", "/.well-known/brski/voucher_status", serial="SN-1",
                 body=b'{"version":1,"status":false,"reason":"pin mismatch"}',
                 content_type="application/json")
    assert ok.status == 200
    bad = up.call("POST", "/.well-known/brski/enrollstatus", serial="SN-1",
                  body=b'{"status":true}', content_type="application/json")
    assert bad.status == 400 and "version" in bad.text
    assert "voucher_status from SN-1" in up.registrar.log()
    assert "pin mismatch" in up.registrar.log()


# --- policy, MASA outages and restarts -----------------------------------------------------


def test_allowlist_refuses_other_devices(pki, tmp_path):
    setup = Setup(pki, tmp_path, enroll_serials=["SN-1"])
    setup.masa.start()
    setup.registrar.start()
    try:
        assert setup.request_voucher("SN-1").status == 200
        refused = setup.request_voucher("SN-2")
        assert refused.status == 403 and "allowlist" in refused.text
        assert setup.enroll("SN-2").status == 403
    finally:
        setup.stop()


def test_masa_down_gives_202_retry_after_then_the_voucher(pki, tmp_path):
    setup = Setup(pki, tmp_path)
    setup.registrar.start()  # the MASA is not running yet
    try:
        body = setup.pvr("SN-1")
        waiting = setup.request_voucher("SN-1", body)
        assert waiting.status == 202, waiting.text
        assert waiting.headers["retry-after"] == "2"
        setup.masa.start()
        done = setup.request_voucher("SN-1", body)  # RFC 8995 §5.6: the same request again
        assert done.status == 200, done.text
        verify_voucher_cms(done.body, [setup.masa_ca], now(), serial_number="SN-1")
    finally:
        setup.stop()


def test_killed_registrar_keeps_its_records(pki, tmp_path):
    setup = Setup(pki, tmp_path)
    setup.masa.start()
    setup.registrar.start()
    try:
        body = setup.pvr("SN-5")
        voucher = setup.request_voucher("SN-5", body)
        assert voucher.status == 200
        cert = ldevid_of(setup.enroll("SN-5"))
        setup.masa.stop()
        setup.registrar.kill()  # SIGKILL: nothing gets to flush or close
        setup.registrar.start()
        # The voucher was kept: the same request is answered without the MASA.
        again = setup.request_voucher("SN-5", body)
        assert again.status == 200 and again.body == voucher.body
    finally:
        setup.stop()
    with Store(tmp_path / "registrar.db", "registrar") as store:
        assert store.pledge("SN-5") is not None
        assert [c.der for c in store.certificates("SN-5")] == [cert.public_bytes(Encoding.DER)]
        assert [v.voucher for v in store.vouchers("SN-5")] == [voucher.body]


def test_the_registrar_stops_cleanly_on_sigterm(pki, tmp_path):
    setup = Setup(pki, tmp_path)
    setup.registrar.start()
    assert setup.registrar.stop() == 0
    assert "stopping" in setup.registrar.log()
