"""cBRSKI at the MASA (issue 13 item 3): COSE registrar voucher-requests over HTTPS to a real
MASA process, built by the registrar's own function, and the COSE vouchers that come back;
every refusal with its status, plain-text reason, log line and metric."""

import asyncio
import base64
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from brski import certs, cose
from brski.pki import Issued, create_test_pki
from brski.signed_voucher import sign_voucher_cose, verify_voucher_cose
from brski.voucher import Assertion, VoucherRequest, WireForm, decode_cbor
from lab.registrar_setup import write_configs
from lab.registrar_testing import ServiceProcess, call, free_port, load_issued
from registrar.config import load_registrar_config
from registrar.constrained_voucher import (
    check_pledge_request_cose,
    obtain_voucher_cose,
    request_voucher_cose,
    sign_rvr_cose,
)
from registrar.context import Registrar
from registrar.domain_ca import DomainCA
from registrar.masa_client import MasaClient, MasaUnreachable
from registrar.store import Store
from registrar.voucher_request import PledgeRequest
from registrar.web import MAX_BODY, Refusal
from tests.test_masa import brski_pki

VCH = "application/voucher+cose"
RV = "/.well-known/brski/requestvoucher"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Lab:
    def __init__(self, work: Path) -> None:
        self.root = work / "pki"
        brski_pki("init", str(self.root), "--serial", "SN-A", "--serial", "SN-B",
                  "--serial", "SN-C")
        # Same names, another manufacturer CA: a device this MASA did not make.
        self.foreign_root = work / "foreign"
        brski_pki("init", str(self.foreign_root), "--serial", "SN-A")
        self.registrar = load_issued(self.root / "domain/registrar.crt",
                                     self.root / "domain/registrar.key")
        self.domain_ca = x509.load_pem_x509_certificate(
            (self.root / "domain/ca.crt").read_bytes())
        self.masa_ca = x509.load_pem_x509_certificate((self.root / "masa/ca.crt").read_bytes())
        self.manufacturer_ca = x509.load_pem_x509_certificate(
            (self.root / "manufacturer/ca.crt").read_bytes())
        self.masa_port, self.metrics_port = free_port(), free_port()
        registrar_toml, masa_toml = write_configs(
            self.root, work, masa_listen=[f"[::1]:{self.masa_port}"], devices=["SN-A", "SN-B"],
            masa_timeout=5)
        self.masa_signer = x509.load_pem_x509_certificates(
            (work / "masa-signer-chain.pem").read_bytes())[0]
        self.registrar_config = load_registrar_config(registrar_toml)
        self.masa = ServiceProcess("registrar.masa_cli", masa_toml, work / "masa.log")
        self.masa.argv += ["--metrics", f"[::1]:{self.metrics_port}"]

    @property
    def registrar_chain(self) -> list[x509.Certificate]:
        return [self.registrar.cert, self.domain_ca]

    def idevid(self, serial: str, *, foreign: bool = False) -> Issued:
        d = (self.foreign_root if foreign else self.root) / "manufacturer/idevid"
        return load_issued(d / f"{serial}.crt", d / f"{serial}.key")

    def refusals(self, reason: str) -> float:
        url = f"http://[::1]:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        match = re.search(rf'^brski_masa_refusals_total\{{endpoint="requestvoucher",'
                          rf'reason="{reason}"\}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("masa-cose"))
    lab.masa.start()
    yield lab
    lab.masa.stop()
    assert "Traceback" not in lab.masa.log(), lab.masa.log()


def cose_pvr(idevid: Issued, serial: str, seen: x509.Certificate, *,
             nonce: bytes | None = None, extra: tuple = ()) -> bytes:
    """A pledge's COSE PVR as cBRSKI §9.2 shows it: proximity-registrar-pubk, no x5bag."""
    request = VoucherRequest(
        assertion=Assertion.PROXIMITY, created_on=now(), serial_number=serial,
        nonce=nonce if nonce is not None else os.urandom(8),
        proximity_registrar_pubk=certs.spki_der(seen),
        wire=WireForm(unknown_cbor=extra))
    return sign_voucher_cose(request, idevid.key)


def obtain(lab: Lab, pvr: bytes, idevid_chain: list[x509.Certificate]):
    """The registrar's function, end to end, against the running MASA."""
    async def run():
        client = MasaClient(lab.registrar_config)
        await client.start()
        try:
            req = check_pledge_request_cose(pvr, idevid_chain, lab.registrar.cert,
                                            [lab.manufacturer_ca], now())
            return await obtain_voucher_cose(client, req, lab.registrar.key,
                                             lab.registrar_chain, idevid_chain, now())
        finally:
            await client.close()
    return asyncio.run(run())


def rvr_for(lab: Lab, pvr: bytes, idevid: x509.Certificate, *, serial: str | None = None,
            registrar: Issued | None = None) -> bytes:
    """An RVR signed as the registrar signs it, bypassing the registrar's own checks (to
    show the MASA makes them too)."""
    decoded = decode_cbor(cose.decode(pvr).payload, VoucherRequest)
    req = PledgeRequest(decoded, pvr, idevid, serial or certs.serial_number(idevid))
    registrar = registrar or lab.registrar
    return sign_rvr_cose(req, registrar.key, [registrar.cert, lab.domain_ca], [idevid], now())


def post(lab: Lab, body: bytes, content_type: str = VCH, **headers: str):
    return call("::1", lab.masa_port, "POST", RV, body=body, content_type=content_type,
                headers=headers)


def flip_signature(data: bytes) -> bytes:
    item = cbor2.loads(data)
    item.value[3] = bytes([item.value[3][0] ^ 1]) + item.value[3][1:]
    return cbor2.dumps(item)


# --- the good path ---------------------------------------------------------------------------


def test_registrar_function_gets_a_cose_voucher_from_the_masa(lab):
    idevid = lab.idevid("SN-A")
    nonce = os.urandom(8)
    got = obtain(lab, cose_pvr(idevid, "SN-A", lab.registrar.cert, nonce=nonce), [idevid.cert])
    # As the MASA sent it: SID-keyed CBOR in COSE, its signing chain in x5bag, and it
    # verifies up to the MASA CA.
    sent = cose.decode(got.from_masa)
    assert sent.x5bag and sent.x5bag[0] == lab.masa_signer
    assert next(iter(cbor2.loads(sent.payload))) == 2451
    voucher, signer = verify_voucher_cose(got.from_masa, [lab.masa_ca], now(),
                                          serial_number="SN-A", nonce=nonce)
    assert signer == lab.masa_signer
    assert voucher.assertion is Assertion.PROXIMITY
    assert voucher.pinned_domain_cert == lab.domain_ca.public_bytes(Encoding.DER)
    assert voucher.nonce == nonce and voucher.expires_on is None
    # What the pledge gets: x5bag stripped, same signature, verifies with the MASA signer.
    for_pledge = cose.decode(got.for_pledge)
    assert for_pledge.x5bag == () and cose.X5BAG not in for_pledge.unprotected
    assert for_pledge.signature == sent.signature and for_pledge.payload == sent.payload
    verify_voucher_cose(got.for_pledge, [lab.masa_signer], now(), serial_number="SN-A",
                        nonce=nonce)
    # The RVR carried both chains (cBRSKI §9.2) and names the IDevID's serial.
    bag = cose.decode(got.rvr).x5bag
    assert lab.registrar.cert in bag and lab.domain_ca in bag and idevid.cert in bag


def test_voucher_only_leaf_in_the_pvr_is_ignored(lab):
    """RFC 8995 §3.4: pinned-domain-cert (voucher-request delta 8) in a PVR is not read."""
    idevid = lab.idevid("SN-B")
    pvr = cose_pvr(idevid, "SN-B", lab.registrar.cert, extra=((8, b"not a certificate"),))
    assert 8 in cbor2.loads(cose.decode(pvr).payload)[2501]
    got = obtain(lab, pvr, [idevid.cert])
    assert got.voucher.pinned_domain_cert == lab.domain_ca.public_bytes(Encoding.DER)


def test_cose_request_with_a_cms_accept_gets_406(lab):
    idevid = lab.idevid("SN-A")
    body = rvr_for(lab, cose_pvr(idevid, "SN-A", lab.registrar.cert), idevid.cert)
    answer = post(lab, body, Accept="application/voucher-cms+json")
    assert answer.status == 406, answer.text


# --- refusals --------------------------------------------------------------------------------


def refused(lab: Lab, body: bytes, status: int, reason: str, words: str,
            content_type: str = VCH, logged_as: str | None = None) -> str:
    before = lab.refusals(reason)
    answer = post(lab, body, content_type)
    assert answer.status == status, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert words in answer.text, answer.text
    assert lab.refusals(reason) == before + 1
    # logged once with the reason (aiohttp's own refusals with its reason phrase)
    assert lab.masa.log().count(logged_as or answer.text.strip()) >= 1
    return answer.text


def test_bad_pledge_signature_is_refused(lab):
    idevid = lab.idevid("SN-A")
    pvr = flip_signature(cose_pvr(idevid, "SN-A", lab.registrar.cert))
    refused(lab, rvr_for(lab, pvr, idevid.cert), 403, "forbidden",
            "no certificate in the x5bag verifies its signature")


def test_bad_registrar_signature_is_refused(lab):
    idevid = lab.idevid("SN-A")
    body = flip_signature(rvr_for(lab, cose_pvr(idevid, "SN-A", lab.registrar.cert),
                                  idevid.cert))
    text = refused(lab, body, 403, "forbidden", "registrar voucher-request")
    (log_line,) = [ln for ln in lab.masa.log().splitlines() if text.strip() in ln]
    assert "WARNING" in log_line and "claims device SN-A" in log_line, log_line
    assert "x5bag" in log_line, log_line


def test_pvr_serial_other_than_the_idevid_is_refused(lab):
    idevid = lab.idevid("SN-A")
    pvr = cose_pvr(idevid, "SN-B", lab.registrar.cert)  # SN-A's key, SN-B's name
    refused(lab, rvr_for(lab, pvr, idevid.cert, serial="SN-A"), 403, "forbidden",
            "pledge voucher-request names serial 'SN-B' but its IDevID is 'SN-A'")


def test_rvr_serial_other_than_the_idevid_is_refused(lab):
    idevid = lab.idevid("SN-A")
    pvr = cose_pvr(idevid, "SN-A", lab.registrar.cert)
    refused(lab, rvr_for(lab, pvr, idevid.cert, serial="SN-B"), 403, "forbidden",
            "registrar voucher-request names serial 'SN-B'")


def test_unknown_manufacturer_is_refused(lab):
    idevid = lab.idevid("SN-A", foreign=True)
    pvr = cose_pvr(idevid, "SN-A", lab.registrar.cert)
    refused(lab, rvr_for(lab, pvr, idevid.cert), 403, "forbidden",
            "prior-signed voucher-request:")


def test_registrar_of_another_domain_is_refused(lab):
    other = create_test_pki(now())
    idevid = lab.idevid("SN-A")
    pvr = cose_pvr(idevid, "SN-A", other.registrar.cert)
    body = rvr_for(lab, pvr, idevid.cert, registrar=other.registrar)
    refused(lab, body, 403, "forbidden", "belongs to another domain")


def test_proximity_to_the_pledges_own_cert_is_refused(lab):
    """The x5bag holds the IDevID chain too; it is not the registrar's chain."""
    idevid = lab.idevid("SN-A")
    pvr = cose_pvr(idevid, "SN-A", idevid.cert)
    refused(lab, rvr_for(lab, pvr, idevid.cert), 403, "forbidden",
            "not in the registrar's certificate chain")


def test_json_body_with_the_cose_type_is_refused(lab):
    refused(lab, b'{"ietf-voucher-request:voucher": {"serial-number": "SN-A"}}', 400,
            "malformed", "not a valid COSE registrar voucher-request")


def test_garbage_cbor_is_refused_and_the_masa_keeps_serving(lab):
    refused(lab, b"\xd2\x84\x43\xa1\x01\x26\xa0\xff", 400, "malformed",
            "not a valid COSE registrar voucher-request")
    refused(lab, cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"x", b"y"])), 400, "malformed",
            "alg")
    idevid = lab.idevid("SN-B")
    assert obtain(lab, cose_pvr(idevid, "SN-B", lab.registrar.cert), [idevid.cert]).voucher


def test_oversized_body_is_refused(lab):
    refused(lab, b"\xd2" + b"\x00" * MAX_BODY, 413, "too-large", "too large",
            logged_as=": 413 Request Entity Too Large")


def test_other_content_type_names_both(lab):
    text = refused(lab, b"{}", 415, "wrong-media-type", "application/voucher+cose",
                   content_type="application/cbor")
    assert "application/voucher-cms+json" in text


# --- the registrar function's own refusals ---------------------------------------------------


def test_registrar_function_passes_the_masa_404_on(lab):
    idevid = lab.idevid("SN-C")  # made, never sold: not in the MASA's table
    with pytest.raises(Refusal) as caught:
        obtain(lab, cose_pvr(idevid, "SN-C", lab.registrar.cert), [idevid.cert])
    assert caught.value.status == 404 and "SN-C" in caught.value.reason


def test_registrar_refuses_a_pvr_for_another_registrar(lab):
    idevid = lab.idevid("SN-A")
    stranger = create_test_pki(now()).registrar.cert
    with pytest.raises(Refusal) as caught:
        check_pledge_request_cose(cose_pvr(idevid, "SN-A", stranger), [idevid.cert],
                                  lab.registrar.cert, [lab.manufacturer_ca], now())
    assert caught.value.status == 401


def test_registrar_refuses_a_pvr_not_signed_by_the_dtls_idevid(lab):
    pvr = cose_pvr(lab.idevid("SN-B"), "SN-A", lab.registrar.cert)
    with pytest.raises(Refusal) as caught:
        check_pledge_request_cose(pvr, [lab.idevid("SN-A").cert], lab.registrar.cert,
                                  [lab.manufacturer_ca], now())
    assert caught.value.status == 403


def test_registrar_accepts_the_pubk_sha256_form(lab):
    idevid = lab.idevid("SN-A")
    request = VoucherRequest(
        assertion=Assertion.PROXIMITY, created_on=now(), serial_number="SN-A",
        nonce=os.urandom(8),
        proximity_registrar_pubk_sha256=hashlib.sha256(
            certs.spki_der(lab.registrar.cert)).digest())
    req = check_pledge_request_cose(sign_voucher_cose(request, idevid.key), [idevid.cert],
                                    lab.registrar.cert, [lab.manufacturer_ca], now())
    assert req.serial == "SN-A"


# --- brski-voucher makes the PVR and verifies the answer (the acceptance path) -------


def voucher_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brski.cli.voucher", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_brski_voucher_makes_a_cose_pvr_and_verifies_the_answer(lab, tmp_path):
    idevid_crt = lab.root / "manufacturer/idevid/SN-A.crt"
    nonce = base64.b64encode(os.urandom(8)).decode()
    pvr_json = tmp_path / "pvr.json"
    pvr_json.write_text(json.dumps({"ietf-voucher-request:voucher": {
        "assertion": "proximity", "created-on": "2026-01-01T00:00:00Z",
        "serial-number": "SN-A", "nonce": nonce,
        "proximity-registrar-pubk": base64.b64encode(
            certs.spki_der(lab.registrar.cert)).decode()}}))
    pvr = tmp_path / "pvr.vch"
    done = voucher_cli("sign", "--in", pvr_json, "--key",
                       lab.root / "manufacturer/idevid/SN-A.key", "--format", "cose",
                       "--out", pvr)
    assert done.returncode == 0, done.stderr
    assert cose.decode(pvr.read_bytes()).x5bag == ()  # cBRSKI §9.2: a PVR has no x5bag
    done = voucher_cli("verify", pvr, "--trust", idevid_crt, "--serial", "SN-A")
    assert done.returncode == 0 and "valid COSE voucher-request" in done.stdout, done.stderr

    got = obtain(lab, pvr.read_bytes(), [lab.idevid("SN-A").cert])
    answer = tmp_path / "voucher.vch"
    answer.write_bytes(got.for_pledge)
    signer = tmp_path / "masa-signer.pem"
    signer.write_bytes(lab.masa_signer.public_bytes(Encoding.PEM))
    done = voucher_cli("verify", answer, "--trust", signer, "--serial", "SN-A",
                       f"--nonce={nonce}")
    assert done.returncode == 0 and "valid COSE voucher" in done.stdout, done.stderr
    # Stripped of its x5bag, the voucher cannot be chained to the MASA CA by itself.
    done = voucher_cli("verify", answer, "--trust", lab.root / "masa/ca.crt")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = voucher_cli("verify", answer, "--trust", signer, "--nonce=AAAAAAAAAAA=")
    assert done.returncode == 1 and "nonce" in done.stderr, done.stderr


def test_brski_voucher_cms_still_needs_a_certificate(lab, tmp_path):
    pvr_json = tmp_path / "pvr.json"
    pvr_json.write_text(json.dumps({"ietf-voucher-request:voucher": {
        "assertion": "proximity", "serial-number": "SN-A", "nonce": "AAAA"}}))
    done = voucher_cli("sign", "--in", pvr_json, "--key",
                       lab.root / "manufacturer/idevid/SN-A.key", "--out", tmp_path / "x")
    assert done.returncode == 2 and "--cert" in done.stderr, done.stderr


# --- the whole registrar step, with its store (what the CoAPS rv resource calls) -------------


def run_registrar(config, store_path: Path, pvrs: list[tuple[bytes, list[x509.Certificate]]]):
    """``request_voucher_cose`` for each PVR in turn on one registrar; answers or exceptions."""
    async def run():
        client = MasaClient(config)
        await client.start()
        reg = Registrar(config, Store(store_path, "registrar"), client,
                        DomainCA(config.ca_cert, config.ca_key))  # type: ignore[arg-type]
        out: list[object] = []
        try:
            for pvr, chain in pvrs:
                try:
                    out.append(await request_voucher_cose(reg, pvr, chain))
                except (Refusal, MasaUnreachable) as exc:
                    out.append(exc)
        finally:
            await client.close()
        return reg.store, out
    return asyncio.run(run())


def test_registrar_step_stores_and_answers_a_retry_from_the_store(lab, tmp_path):
    idevid = lab.idevid("SN-B")
    pvr = cose_pvr(idevid, "SN-B", lab.registrar.cert)
    issued = lab.masa.log().count("voucher issued: serial SN-B")
    store, (first, again) = run_registrar(lab.registrar_config, tmp_path / "r.db",
                                          [(pvr, [idevid.cert]), (pvr, [idevid.cert])])
    assert isinstance(first, bytes) and first == again
    assert lab.masa.log().count("voucher issued: serial SN-B") == issued + 1  # asked once
    assert cose.decode(first).x5bag == ()
    record = store.find_voucher_request(hashlib.sha256(pvr).digest())
    assert record is not None and record.status == "vouchered" and record.pvr == pvr
    assert record.rvr is not None and idevid.cert in cose.decode(record.rvr).x5bag
    (stored,) = store.vouchers("SN-B")
    assert cose.decode(stored.voucher).x5bag  # kept as the MASA sent it
    assert cose.without_x5(stored.voucher) == first


def test_registrar_step_records_a_masa_refusal(lab, tmp_path):
    idevid = lab.idevid("SN-C")
    pvr = cose_pvr(idevid, "SN-C", lab.registrar.cert)
    store, (answer,) = run_registrar(lab.registrar_config, tmp_path / "r.db",
                                     [(pvr, [idevid.cert])])
    assert isinstance(answer, Refusal) and answer.status == 404
    record = store.find_voucher_request(hashlib.sha256(pvr).digest())
    assert record is not None and record.status == "refused" and "SN-C" in record.reason
    assert store.vouchers("SN-C") == []


def test_registrar_step_with_the_masa_down_leaves_the_request_pending(lab, tmp_path):
    toml, _ = write_configs(lab.root, tmp_path, masa_listen=[f"[::1]:{free_port()}"],
                            masa_timeout=2)
    idevid = lab.idevid("SN-A")
    pvr = cose_pvr(idevid, "SN-A", lab.registrar.cert)
    store, (answer,) = run_registrar(load_registrar_config(toml), tmp_path / "r.db",
                                     [(pvr, [idevid.cert])])
    assert isinstance(answer, MasaUnreachable)
    record = store.find_voucher_request(hashlib.sha256(pvr).digest())
    assert record is not None and record.status == "pending"
    assert "MASA unreachable" in (record.reason or "") and store.vouchers("SN-A") == []


def test_nonceless_cose_request_is_refused_by_a_masa_without_nonceless(lab):
    """No prior-signed-voucher-request: this MASA (nonceless = false) says why."""
    request = VoucherRequest(assertion=Assertion.PROXIMITY, created_on=now(),
                             serial_number="SN-A")
    body = sign_voucher_cose(request, lab.registrar.key,
                             x5bag=[lab.registrar.cert, lab.domain_ca])
    refused(lab, body, 403, "forbidden", "does not issue nonceless vouchers")
