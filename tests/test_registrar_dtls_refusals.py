"""Refused DTLS handshakes at the registrar's CoAPS listener (issue 13, house rule "every refusal
logged once with who and why, and counted"), and flood control, against a real registrar with
``[coaps] listen``: libcoap's coap-client-openssl with IDevIDs the registrar must refuse (unknown
manufacturer, expired, not yet valid); a ClientHello and garbage flood while a good pledge is
served."""

import datetime
import logging
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import aiocoap
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from brski.dtls import DtlsConfig, DtlsSession
from brski.pki import issue_idevid
from coaps_io.aiocoap_dtls import create_client_context
from coaps_io.log_limit import LogLimiter
from lab.registrar_testing import load_issued
from registrar.coaps import REFUSAL_LOG_BURST
from tests.test_registrar_coaps import COAP_CLIENT, Lab, exchange, req, run


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("registrar-dtls-refusals"))
    lab.masa.start()
    try:
        lab.reg.start()
        yield lab
    finally:
        lab.reg.stop()
        lab.masa.stop()
    assert "Traceback" not in lab.reg.log(), lab.reg.log()


def reissued_idevid(lab: Lab, tmp_path: Path, name: str, not_before: datetime.datetime,
                    not_after: datetime.datetime) -> tuple[Path, Path, x509.Certificate]:
    """SN-C's IDevID (same key, subject, extensions) with another validity, signed by the
    lab's manufacturer CA: valid in every respect but its dates."""
    ca = load_issued(lab.root / "manufacturer/ca.crt", lab.root / "manufacturer/ca.key")
    base = lab.idevid("SN-C")
    builder = (x509.CertificateBuilder().subject_name(base.cert.subject)
               .issuer_name(ca.cert.subject).public_key(base.key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    for ext in base.cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_file = tmp_path / f"{name}.crt"
    cert_file.write_bytes(cert.public_bytes(Encoding.PEM))
    return cert_file, lab.root / "manufacturer/idevid/SN-C.key", cert


def coap_client(lab: Lab, cert: Path, key: Path, tmp_path: Path) -> tuple[str, Path]:
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    out = tmp_path / "out.bin"
    out.unlink(missing_ok=True)
    done = subprocess.run([COAP_CLIENT, "-B", "10", "-c", str(cert), "-j", str(key), "-C",
                           str(lab.root / "domain/ca.crt"), "-o", str(out), "-m", "get",
                           f"{lab.uri}/.well-known/est/crts"],
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr, out


def refusal_lines(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if ("DTLS handshake" in line and "refused" in line) or "handshake-failed" in line]


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def check_refused(lab: Lab, tmp_path: Path, cert_file: Path, key_file: Path,
                  cert: x509.Certificate, reason: str, alert: str) -> None:
    before = {"refusals": lab.metric("brski_registrar_refusals_total", endpoint="dtls",
                                     reason=reason),
              "drops": lab.metric("brski_registrar_coaps_drops_total",
                                  reason="handshake-failed")}
    log_start = len(lab.reg.log())
    text, out = coap_client(lab, cert_file, key_file, tmp_path)
    # libcoap exits 0 on a refused handshake: its words say what happened.
    assert not out.exists() or out.read_bytes() == b"", text
    assert "alert" in text.lower() and alert in text.lower(), text
    wait_for(lambda: lab.metric("brski_registrar_refusals_total", endpoint="dtls",
                                reason=reason) == before["refusals"] + 1)
    assert lab.metric("brski_registrar_coaps_drops_total",
                      reason="handshake-failed") == before["drops"] + 1
    lines = refusal_lines(lab.reg.log()[log_start:])
    assert len(lines) == 1, lines
    (line,) = lines
    subject = cert.subject.rfc4514_string({x509.NameOID.SERIAL_NUMBER: "serialNumber"})
    assert f"({reason})" in line and f"subject {subject}" in line, line
    assert f"serial {cert.serial_number:x}" in line, line
    assert "issuer " in line and re.search(r"from \[::1\]:\d+", line), line
    assert lab.reg.alive()


def test_unknown_manufacturer_refusal_names_the_idevid_once_and_counts(lab, tmp_path):
    d = lab.foreign_root / "manufacturer/idevid"
    cert = x509.load_pem_x509_certificate((d / "SN-A.crt").read_bytes())
    check_refused(lab, tmp_path, d / "SN-A.crt", d / "SN-A.key", cert, "tls-unknown-ca",
                  "unknown ca")
    line = refusal_lines(lab.reg.log())[-1]
    assert "serialNumber=SN-A" in line and "Rogue Manufacturer" in line, line


def test_expired_idevid_refusal_is_logged_once_and_counted(lab, tmp_path):
    now = datetime.datetime.now(datetime.UTC)
    cert_file, key_file, cert = reissued_idevid(
        lab, tmp_path, "expired", now - datetime.timedelta(days=400),
        now - datetime.timedelta(days=30))
    check_refused(lab, tmp_path, cert_file, key_file, cert, "tls-certificate-expired",
                  "certificate expired")


def test_not_yet_valid_idevid_refusal_is_logged_once_and_counted(lab, tmp_path):
    ca = load_issued(lab.root / "manufacturer/ca.crt", lab.root / "manufacturer/ca.key")
    later = issue_idevid(ca, "SN-FUTURE", "masa.example:9443",
                         datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30))
    cert_file, key_file = tmp_path / "future.crt", tmp_path / "future.key"
    cert_file.write_bytes(later.cert_pem())
    key_file.write_bytes(later.key_pem())
    check_refused(lab, tmp_path, cert_file, key_file, later.cert,
                  "tls-certificate-not-yet-valid", "alert")


def test_refusal_metrics_exist_at_zero_for_dtls(lab):
    with __import__("urllib.request").request.urlopen(
            f"http://[::1]:{lab.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for reason in ("tls-unknown-ca", "tls-certificate-expired", "tls-certificate-not-yet-valid",
                   "tls-bad-certificate", "tls-handshake-failed"):
        assert f'brski_registrar_refusals_total{{endpoint="dtls",reason="{reason}"}}' in text


FLOOD_HELLOS = 400
FLOOD_GARBAGE = 200


def test_hello_and_garbage_flood_keeps_no_state_few_log_lines_and_a_pledge_is_served(lab):
    idevid = lab.idevid("SN-B")
    (hello,) = DtlsSession.client(DtlsConfig(
        idevid.cert, idevid.key, [lab.domain_ca])).datagrams_to_send()
    junk = [b"\x16\xfe\xfd\x00\x00" + os.urandom(40), os.urandom(300), b"\x17\xfe\xfd" + bytes(60)]
    before_hello = lab.metric("brski_registrar_coaps_drops_total", reason="no-cookie")
    before_garbage = lab.metric("brski_registrar_coaps_drops_total", reason="garbage")
    log_start = len(lab.reg.log())
    sent = threading.Event()

    def flood() -> None:
        socks = [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) for _ in range(4)]
        try:
            for i in range(FLOOD_HELLOS + FLOOD_GARBAGE):
                sock = socks[i % len(socks)]
                data = hello if i % 3 != 2 or i >= 3 * FLOOD_GARBAGE else junk[i % 3]
                sock.sendto(data, ("::1", lab.coaps_port))
                time.sleep(0.002)  # paced: loopback must not drop what the counters should see
        finally:
            for sock in socks:
                sock.close()
            sent.set()

    flooder = threading.Thread(target=flood)
    started = time.monotonic()
    flooder.start()
    try:
        answers = run(exchange(lab, idevid, [
            req(lab, aiocoap.GET, "/.well-known/est/crts", accept=287) for _ in range(3)]))
        served_during_flood = not sent.is_set()
    finally:
        flooder.join(30)
    assert time.monotonic() - started < 30
    assert all(a.code == aiocoap.CONTENT for a in answers), answers
    assert served_during_flood, "the flood ended before the pledge was served: make it longer"
    garbage = sum(1 for i in range(FLOOD_HELLOS + FLOOD_GARBAGE)
                  if i % 3 == 2 and i < 3 * FLOOD_GARBAGE)
    hellos = FLOOD_HELLOS + FLOOD_GARBAGE - garbage
    wait_for(lambda: lab.metric("brski_registrar_coaps_drops_total", reason="garbage")
             >= before_garbage + garbage)
    assert lab.metric("brski_registrar_coaps_drops_total", reason="garbage") == (
        before_garbage + garbage)
    # The flood's ClientHellos, and the pledge's own first one (twice if it was retransmitted).
    got = lab.metric("brski_registrar_coaps_drops_total", reason="no-cookie") - before_hello
    assert hellos + 1 <= got <= hellos + 3, got
    wait_for(lambda: lab.metric("brski_registrar_coaps_sessions") == 0)
    log = lab.reg.log()[log_start:]
    # One line for the first garbage datagram; the rest wait for the minute's summary.
    assert len([line for line in log.splitlines() if "DTLS drop" in line]) <= 2, log
    assert lab.reg.alive()


def test_log_limiter_logs_the_first_then_a_summary(caplog):
    clock = [100.0]
    limiter = LogLimiter(logging.getLogger("test.limit"), interval=60, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO, "test.limit"):
        assert limiter.allow("DTLS drop garbage")
        assert not any(limiter.allow("DTLS drop garbage") for _ in range(499))
        limiter.flush()
        assert caplog.records == []  # the window is still open
        clock[0] += 61
        limiter.flush()
        assert [r.getMessage() for r in caplog.records] == [
            "DTLS drop garbage: 499 more in the last 61 s (not logged one by one)"]
        assert limiter.allow("DTLS drop garbage")  # a new window
        limiter.flush()
    assert len(caplog.records) == 1


def test_refusal_names_the_leaf_when_the_client_sends_its_chain(lab):
    """A pledge that sends its manufacturer CA after its IDevID fails verification at depth 1:
    the line must still name the IDevID (from the client's Certificate message), not the CA."""
    d = lab.foreign_root / "manufacturer"
    rogue = lab.idevid("SN-A", foreign=True)
    rogue_ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    log_start = len(lab.reg.log())
    before = lab.metric("brski_registrar_refusals_total", endpoint="dtls", reason="tls-unknown-ca")

    async def attempt() -> None:
        ctx, _ = await create_client_context(
            DtlsConfig(rogue.cert, rogue.key, [lab.domain_ca], chain=[rogue_ca]),
            bind=("::1", 0))
        try:
            await ctx.request(req(lab, aiocoap.GET, "/.well-known/est/crts")).response
        finally:
            await ctx.shutdown()

    with pytest.raises(aiocoap.error.NetworkError):
        run(attempt())
    wait_for(lambda: lab.metric("brski_registrar_refusals_total", endpoint="dtls",
                                reason="tls-unknown-ca") == before + 1)
    (line,) = refusal_lines(lab.reg.log()[log_start:])
    assert f"serial {rogue.cert.serial_number:x}" in line and "serialNumber=SN-A" in line, line
    assert "depth" not in line, line


def test_a_request_flood_in_one_session_is_counted_but_not_logged_line_by_line(lab):
    before = lab.metric("brski_registrar_refusals_total", endpoint="unknown", reason="not-found")
    log_start = len(lab.reg.log())
    answers = run(exchange(lab, lab.idevid("SN-B"), [
        req(lab, aiocoap.GET, f"/.well-known/brski/nothing-{i}") for i in range(30)]))
    assert all(a.code == aiocoap.NOT_FOUND for a in answers)
    assert lab.metric("brski_registrar_refusals_total", endpoint="unknown",
                      reason="not-found") == before + 30
    lines = [line for line in lab.reg.log()[log_start:].splitlines() if "nothing-" in line]
    assert len(lines) == REFUSAL_LOG_BURST, lines  # the rest go into the minute's summary
