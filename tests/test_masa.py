"""The MASA as a real process over TLS: vouchers that verify, and every refusal RFC 8995 §5.6
names, with its status and plain-text reason."""

import datetime
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from brski import cms
from brski.pki import Issued, create_test_pki, new_key
from brski.signed_voucher import (
    sign_voucher_cms,
    verify_voucher_cms,
    verify_voucher_request_cms,
)
from brski.telemetry import AuditLog
from brski.voucher import Assertion, VoucherRequest, decode_json
from lab.registrar_setup import write_configs
from lab.registrar_testing import (
    ServiceProcess,
    call,
    client_context,
    free_port,
    load_issued,
    make_pvr,
)
from registrar.voucher_request import PledgeRequest, build_rvr

VCJ = "application/voucher-cms+json"
RV = "/.well-known/brski/requestvoucher"
AUDIT = "/.well-known/brski/requestauditlog"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def brski_pki(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


class Lab:
    """A PKI on disk and what tests need from it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.registrar = load_issued(root / "domain/registrar.crt", root / "domain/registrar.key")
        self.domain_ca = load_issued(root / "domain/ca.crt", root / "domain/ca.key")
        self.masa_ca = x509.load_pem_x509_certificate((root / "masa/ca.crt").read_bytes())

    def idevid(self, serial: str) -> Issued:
        d = self.root / "manufacturer/idevid"
        return load_issued(d / f"{serial}.crt", d / f"{serial}.key")


def registrar_without_cmc_ra(domain_ca: Issued) -> Issued:
    key = new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not an RA")]))
        .issuer_name(domain_ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - datetime.timedelta(minutes=5))
        .not_valid_after(now() + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(domain_ca.key, hashes.SHA256())
    )
    return Issued(cert, key)


def rvr(lab: Lab, serial: str, *, registrar: Issued | None = None,
        chain: list[x509.Certificate] | None = None, idevid: Issued | None = None,
        proximity_cert: bytes | None = None) -> bytes:
    """A registrar voucher-request as our registrar builds it (build_rvr), signed."""
    registrar = registrar or lab.registrar
    chain = chain if chain is not None else [registrar.cert, lab.domain_ca.cert]
    idevid = idevid or lab.idevid(serial)
    t = now()
    seen = proximity_cert if proximity_cert is not None else registrar.cert.public_bytes(
        Encoding.DER)
    pvr_bytes = make_pvr(idevid, serial, seen, t)
    pvr, _ = verify_voucher_request_cms(pvr_bytes, None, t)
    request = build_rvr(PledgeRequest(pvr, pvr_bytes, idevid.cert, serial), t)
    return sign_voucher_cms(request, registrar.key, chain, t)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    root = tmp_path_factory.mktemp("masa") / "pki"
    brski_pki("init", str(root), "--serial", "SN-A", "--serial", "SN-B", "--serial", "SN-C")
    return Lab(root)


def start_masa(lab: Lab, work: Path, **options) -> tuple[ServiceProcess, int]:
    port = free_port()
    _, masa_toml = write_configs(lab.root, work, masa_listen=[f"[::1]:{port}"], **options)
    masa = ServiceProcess("registrar.masa_cli", masa_toml, work / "masa.log").start()
    return masa, port


@pytest.fixture(scope="module")
def masa(lab, tmp_path_factory):
    work = tmp_path_factory.mktemp("masa-table")
    # Table mode with SN-A and SN-B only: SN-C is a device of ours that nobody bought.
    process, port = start_masa(lab, work, devices=["SN-A", "SN-B"])
    yield port
    process.stop()
    assert "Traceback" not in process.log(), process.log()


def post(port: int, path: str, body: bytes, content_type: str = VCJ, **headers: str):
    return call("::1", port, "POST", path, body=body, content_type=content_type,
                headers=headers)


def test_good_request_gets_a_voucher_that_verifies(lab, masa):
    answer = post(masa, RV, rvr(lab, "SN-A"))
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"] == VCJ
    voucher, signer = verify_voucher_cms(answer.body, [lab.masa_ca], now(),
                                         serial_number="SN-A")
    assert voucher.assertion is Assertion.PROXIMITY
    assert voucher.pinned_domain_cert == lab.domain_ca.cert.public_bytes(Encoding.DER)
    assert voucher.nonce is not None and voucher.expires_on is None
    assert signer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.endswith(
        "voucher signer")


def test_voucher_keeps_the_pledge_nonce_text(lab, masa):
    body = rvr(lab, "SN-B")
    answer = post(masa, RV, body)
    assert answer.status == 200, answer.text
    sent = decode_json(cms.parse(body).content, VoucherRequest)
    got = decode_json(cms.parse(answer.body).content)
    assert got.wire_text("nonce") == sent.wire_text("nonce")


def test_registrar_without_cmc_ra_gets_403(lab, masa):
    weak = registrar_without_cmc_ra(lab.domain_ca)
    answer = post(masa, RV, rvr(lab, "SN-A", registrar=weak))
    assert answer.status == 403
    assert "id-kp-cmcRA" in answer.text
    assert answer.headers["content-type"].startswith("text/plain")


def test_unknown_serial_gets_404(lab, masa):
    answer = post(masa, RV, rvr(lab, "SN-C"))
    assert answer.status == 404
    assert "SN-C" in answer.text and "not known" in answer.text


def test_wrong_content_type_gets_415(lab, masa):
    answer = post(masa, RV, rvr(lab, "SN-A"), content_type="application/json")
    assert answer.status == 415
    assert "application/voucher-cms+json" in answer.text


def test_accept_without_cms_vouchers_gets_406(lab, masa):
    answer = post(masa, RV, rvr(lab, "SN-A"), Accept="application/voucher+cose")
    assert answer.status == 406


def test_tampered_request_gets_403(lab, masa):
    body = bytearray(rvr(lab, "SN-A"))
    at = bytes(body).index(b'"serial-number":"SN-A"') + len('"serial-number":"SN-')
    body[at] = ord("B")  # the signed JSON now names SN-B; its digest no longer matches
    answer = post(masa, RV, bytes(body))
    assert answer.status == 403
    assert "messageDigest" in answer.text


def test_garbage_gets_400_and_the_masa_keeps_serving(lab, masa):
    answer = post(masa, RV, b"\x30\x03\x02\x01")
    assert answer.status == 400
    assert post(masa, RV, rvr(lab, "SN-A")).status == 200


def test_proximity_cert_outside_the_registrar_chain_gets_403(lab, masa):
    stranger = create_test_pki(now()).registrar.cert
    answer = post(masa, RV, rvr(lab, "SN-A", proximity_cert=stranger.public_bytes(
        Encoding.DER)))
    assert answer.status == 403
    assert "proximity-registrar-cert" in answer.text


def test_registrar_of_another_domain_gets_403(lab, masa):
    other = create_test_pki(now())
    answer = post(masa, RV, rvr(lab, "SN-A", registrar=other.registrar,
                                chain=[other.registrar.cert, other.domain_ca.cert]))
    assert answer.status == 403
    assert "another domain" in answer.text


def test_pledge_of_another_manufacturer_gets_403(lab, masa):
    foreign = create_test_pki(now(), serials=["SN-A"]).idevids["SN-A"]
    answer = post(masa, RV, rvr(lab, "SN-A", idevid=foreign))
    assert answer.status == 403
    assert "prior-signed voucher-request" in answer.text


def test_nonceless_request_is_refused_by_default(lab, masa):
    t = now()
    request = VoucherRequest(serial_number="SN-A", created_on=t)
    body = sign_voucher_cms(request, lab.registrar.key, [lab.registrar.cert,
                                                          lab.domain_ca.cert], t)
    answer = post(masa, RV, body)
    assert answer.status == 403
    assert "nonceless" in answer.text


def test_audit_log_lists_the_vouchers_issued(lab, masa):
    assert post(masa, RV, rvr(lab, "SN-B")).status == 200
    answer = post(masa, AUDIT, rvr(lab, "SN-B"))
    assert answer.status == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    log = AuditLog.decode_json(answer.body, lenient_numbers=False)
    assert log.events and all(e.assertion == "proximity" for e in log.events)
    assert all(e.nonce for e in log.events)
    assert len({e.domain_id for e in log.events}) == 1


@pytest.mark.parametrize("path", [RV, AUDIT])
def test_junk_never_gets_a_500(lab, masa, path):
    rng = random.Random(path)
    good = rvr(lab, "SN-A")
    bodies = [b"", b"\x30\x80", good[:100], good[: len(good) // 2], good + b"\x00"]
    bodies += [rng.randbytes(rng.randrange(1, 4000)) for _ in range(10)]
    for body in bodies:
        answer = post(masa, path, body)
        assert 400 <= answer.status < 500, (body[:40], answer.status, answer.text)
    assert post(masa, RV, good).status == 200


def test_unknown_paths_and_methods_get_plain_text(masa):
    assert call("::1", masa, "GET", RV).status == 405
    missing = call("::1", masa, "POST", "/.well-known/brski/nothing", body=b"x")
    assert missing.status == 404 and "no such endpoint" in missing.text


def test_trust_on_first_use_remembers_the_owner_across_restarts(lab, tmp_path):
    process, port = start_masa(lab, tmp_path, ownership="tofu", devices=[])
    try:
        assert post(port, RV, rvr(lab, "SN-C")).status == 200  # first domain claims SN-C
        other = create_test_pki(now())
        second = rvr(lab, "SN-C", registrar=other.registrar,
                     chain=[other.registrar.cert, other.domain_ca.cert])
        refused = post(port, RV, second)
        assert refused.status == 403 and "already owned" in refused.text
        process.stop()
        process.start()
        assert post(port, RV, second).status == 403
        assert post(port, RV, rvr(lab, "SN-C")).status == 200
    finally:
        process.stop()


def test_nonceless_vouchers_expire_when_allowed(lab, tmp_path):
    process, port = start_masa(lab, tmp_path, nonceless=True)
    try:
        t = now()
        request = VoucherRequest(serial_number="SN-A", created_on=t)
        body = sign_voucher_cms(request, lab.registrar.key,
                                [lab.registrar.cert, lab.domain_ca.cert], t)
        answer = post(port, RV, body)
        assert answer.status == 200, answer.text
        voucher, _ = verify_voucher_cms(answer.body, [lab.masa_ca], now())
        assert voucher.nonce is None
        assert voucher.assertion is Assertion.LOGGED
        assert voucher.expires_on is not None
        assert datetime.timedelta(minutes=19) < voucher.expires_on - t \
            <= datetime.timedelta(minutes=21)
    finally:
        process.stop()


def test_masa_tls_certificate_is_checked_by_clients(lab, masa):
    ctx = client_context(ca_file=lab.root / "masa/ca.crt")
    assert call("::1", masa, "POST", RV, body=rvr(lab, "SN-A"), content_type=VCJ,
                ctx=ctx).status == 200
    wrong = client_context(ca_file=lab.root / "domain/ca.crt")
    with pytest.raises(OSError):
        call("::1", masa, "POST", RV, body=b"x", content_type=VCJ, ctx=wrong)


def test_every_voucher_answered_is_on_disk_after_kill_9(lab, tmp_path):
    # Requests in flight together share the group commit's transactions; each answer leaves
    # after its commit, so SIGKILL right after the last answer loses none of them. Trust on
    # first use: the ownership claims ride in the same transactions.
    from concurrent.futures import ThreadPoolExecutor

    from registrar.store import Store

    process, port = start_masa(lab, tmp_path, ownership="tofu", devices=[])
    bodies = [rvr(lab, serial) for serial in ("SN-A", "SN-B", "SN-C") for _ in range(4)]
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda body: post(port, RV, body), bodies))
    finally:
        process.kill()
    assert [a.status for a in answers] == [200] * len(bodies), [a.text for a in answers]
    with Store(tmp_path / "masa.db", "masa") as store:
        stored = {bytes(v.voucher) for v in store.vouchers()}
        owners = {serial: store.owner(serial) for serial in ("SN-A", "SN-B", "SN-C")}
    assert {a.body for a in answers} <= stored
    assert all(owners.values())
