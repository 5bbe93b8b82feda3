"""tshark decodes the registrar's CoAPS link (issue 13 acceptance): the DTLS handshake with its
cookie round, and, with the session secrets from ``BRSKI_DTLS_KEYLOG`` (a debugging aid, off by
default), the CoAP messages inside DTLS. Captured on loopback with tcpdump, filtered to the UDP
port of the registrar this module starts, so only this test's traffic is read."""

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import pytest

from brski.dtls import DtlsConfig
from coaps_io import keylog
from lab.capture import settle
from tests.test_registrar_coaps import COAP_CLIENT, Lab, exchange, req, run

TSHARK, TCPDUMP = shutil.which("tshark"), shutil.which("tcpdump")

# DTLS HandshakeType values (RFC 6347 §4.3.2)
CLIENT_HELLO, SERVER_HELLO, HELLO_VERIFY_REQUEST, CERTIFICATE = 1, 2, 3, 11
SERVER_KEY_EXCHANGE, CERTIFICATE_REQUEST, SERVER_HELLO_DONE = 12, 13, 14
CERTIFICATE_VERIFY, CLIENT_KEY_EXCHANGE, FINISHED = 15, 16, 20
CHANGE_CIPHER_SPEC = 20  # record content type
CCM_8 = "0xc0ae"  # TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8, RFC 9148's mandatory suite


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("registrar-coaps-capture"))
    lab.registrar_keylog = lab.work / "registrar.keylog"
    lab.masa.start()
    os.environ[keylog.ENV] = str(lab.registrar_keylog)  # for the registrar process only
    try:
        lab.reg.start()
    finally:
        del os.environ[keylog.ENV]
    try:
        yield lab
    finally:
        lab.reg.stop()
        lab.masa.stop()
    assert "Traceback" not in lab.reg.log(), lab.reg.log()


@contextlib.contextmanager
def capture(port: int, path: Path) -> Iterator[None]:
    """tcpdump on lo for UDP ``port`` while the block runs."""
    assert TCPDUMP and TSHARK, "tcpdump/tshark missing: make setup installs them"
    # --immediate-mode: without it, packets still in the kernel's ring when tcpdump is
    # interrupted are counted but never written.
    dump = subprocess.Popen([TCPDUMP, "-Z", "root", "-i", "lo", "--immediate-mode", "-U", "-w",
                             str(path), f"udp port {port}"], stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        first = dump.stderr.readline()
        assert "listening on lo" in first, first
        yield
        settle(path)
    finally:
        dump.send_signal(signal.SIGINT)
        try:
            dump.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.communicate()


FIELDS = ["frame.number", "dtls.record.content_type", "dtls.handshake.type",
          "dtls.handshake.ciphersuite", "coap.code",
          "coap.opt.uri_path", "coap.opt.ctype", "coap.opt.accept", "coap.opt.block_number",
          "coap.opt.block_mflag", "coap.opt.name", "coap.opt.etag"]


def decode(cap: Path, port: int, keys: Path | None) -> list[dict[str, str]]:
    args = [TSHARK, "-r", str(cap), "-d", f"udp.port=={port},dtls",
            "-d", f"dtls.port=={port},coap", "-T", "fields", "-E", "separator=|",
            "-E", "occurrence=a", "-E", "aggregator=;"]
    if keys is not None:
        args += ["-o", f"tls.keylog_file:{keys}"]
    for field in FIELDS:
        args += ["-e", field]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [dict(zip(FIELDS, line.split("|"), strict=True))
            for line in done.stdout.splitlines() if line]


def handshake_types(frames: list[dict[str, str]]) -> list[int]:
    return [int(t) for f in frames for t in f["dtls.handshake.type"].split(";") if t]


def check_handshake(frames: list[dict[str, str]], *, decrypted: bool) -> None:
    types = handshake_types(frames)
    # The cookie round (RFC 6347 §4.2.1), then the certificate handshake with a client
    # certificate (the IDevID): every message of the full handshake, in order.
    assert types[:3] == [CLIENT_HELLO, HELLO_VERIFY_REQUEST, CLIENT_HELLO], types
    assert types.count(CLIENT_HELLO) == 2 and types.count(HELLO_VERIFY_REQUEST) == 1, types
    rest = [t for t in types[3:] if t != CERTIFICATE]
    # The Finished messages are encrypted: tshark names them only with the secrets.
    assert rest == [SERVER_HELLO, SERVER_KEY_EXCHANGE, CERTIFICATE_REQUEST, SERVER_HELLO_DONE,
                    CLIENT_KEY_EXCHANGE, CERTIFICATE_VERIFY,
                    *([FINISHED, FINISHED] if decrypted else [])], types
    records = [int(t) for f in frames for t in f["dtls.record.content_type"].split(";") if t]
    assert records.count(CHANGE_CIPHER_SPEC) == 2, records
    # Server's Certificate after its Hello, the client's after Hello Done.
    assert types.count(CERTIFICATE) >= 2, types  # a fragmented one is listed per fragment


def coap(frames: list[dict[str, str]]) -> list[dict[str, str]]:
    return [f for f in frames if f["coap.code"]]


def test_tshark_decodes_a_libcoap_exchange_handshake_and_coap_inside_dtls(lab, tmp_path):
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    cap, out = tmp_path / "libcoap.pcap", tmp_path / "crts.p7"
    d = lab.root / "manufacturer/idevid"
    with capture(lab.coaps_port, cap):
        done = subprocess.run([COAP_CLIENT, "-B", "20", "-c", str(d / "SN-B.crt"), "-j",
                               str(d / "SN-B.key"), "-C", str(lab.root / "domain/ca.crt"),
                               "-o", str(out), "-m", "get", "-b", "64", "-A", "281",
                               f"{lab.uri}/.well-known/est/crts"],
                              capture_output=True, timeout=60)
    assert out.exists() and out.stat().st_size > 256, done.stderr
    # Without the secrets the handshake is readable, the CoAP inside is not.
    blind = decode(cap, lab.coaps_port, None)
    check_handshake(blind, decrypted=False)
    assert coap(blind) == []
    frames = decode(cap, lab.coaps_port, lab.registrar_keylog)
    check_handshake(frames, decrypted=True)
    messages = coap(frames)
    requests = [m for m in messages if m["coap.code"] == "1"]  # 0.01 GET
    answers = [m for m in messages if m["coap.code"] == "69"]  # 2.05 Content
    assert len(requests) == len(answers) == out.stat().st_size // 64 + 1, messages
    assert all(r["coap.opt.uri_path"] == ".well-known;est;crts" for r in requests), requests
    assert all(r["coap.opt.accept"].startswith("application/pkcs7-mime") for r in requests)
    # Block2 numbers 0..n, more-flag set on all but the last; ETag and Size2 on the answers.
    assert [int(a["coap.opt.block_number"]) for a in answers] == list(range(len(answers)))
    assert [a["coap.opt.block_mflag"] for a in answers] == ["1"] * (len(answers) - 1) + ["0"]
    assert all(a["coap.opt.ctype"].startswith("application/pkcs7-mime") for a in answers)
    assert all(a["coap.opt.etag"] for a in answers), answers
    assert "Size2" in answers[0]["coap.opt.name"], answers[0]


def test_tshark_decodes_a_coaps_io_client_exchange_with_the_mandatory_suite(
        lab, tmp_path, monkeypatch):
    client_keylog = tmp_path / "client.keylog"
    monkeypatch.setenv(keylog.ENV, str(client_keylog))  # this time the client's secrets
    cap = tmp_path / "aiocoap.pcap"
    with capture(lab.coaps_port, cap):
        (core, crts) = run(exchange(lab, lab.idevid("SN-C"), [
            req(lab, aiocoap.GET, "/.well-known/core"),
            req(lab, aiocoap.GET, "/.well-known/est/crts", accept=287)]))
    assert core.code == crts.code == aiocoap.CONTENT
    assert client_keylog.read_bytes().startswith(b"CLIENT_RANDOM ")
    frames = decode(cap, lab.coaps_port, client_keylog)
    check_handshake(frames, decrypted=True)
    server_hello = next(f for f in frames if str(SERVER_HELLO) in
                        f["dtls.handshake.type"].split(";"))
    assert server_hello["dtls.handshake.ciphersuite"].split(";")[0] == CCM_8, server_hello
    messages = coap(frames)
    paths = [m["coap.opt.uri_path"] for m in messages if m["coap.code"] == "1"]
    assert paths == [".well-known;core", ".well-known;est;crts"], messages
    assert [m["coap.opt.ctype"] for m in messages if m["coap.code"] == "69"] == [
        "application/link-format", "application/pkix-cert"], messages


def test_keylog_is_off_unless_the_variable_is_set(lab, monkeypatch, tmp_path):
    idevid = lab.idevid("SN-A")
    config = DtlsConfig(idevid.cert, idevid.key, [lab.domain_ca])
    monkeypatch.delenv(keylog.ENV, raising=False)
    assert keylog.with_env_keylog(config).keylog is None
    monkeypatch.setenv(keylog.ENV, str(tmp_path / "k"))
    assert keylog.with_env_keylog(config).keylog is not None
    assert f"{keylog.ENV} is set" in lab.reg.log()  # the registrar says so at start
