"""Issue 11, defect 4: the registrar refuses out loud.

The registrar and the MASA run as processes on loopback, with their Prometheus endpoints.
Independent peers (curl and openssl s_client, TLS 1.2 and 1.3) present an IDevID from a
manufacturer the registrar does not know: they must receive a TLS alert naming the cause, and
the refusal must be in the registrar's log once, with the certificate's subject, serial number
and issuer, and in its /metrics by reason. Refused requests (voucher request, EST enroll,
MASA) name the client's certificate and are counted by endpoint and reason too.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from coaps_io.log_limit import REFUSAL_LOG_BURST
from lab import wait_for
from lab.registrar_setup import write_configs
from lab.registrar_testing import ServiceProcess, call, client_context, free_port
from registrar.tls_server import name_text


def counted(read, expected: float) -> None:
    """The refusal counter reaches `expected`: the alert leaves before the server counts, so
    a client that reads /metrics right after its refused handshake may be early."""
    wait_for(lambda: read() == expected, 10, f"the refusal counted ({expected:g})")

RV = "/.well-known/brski/requestvoucher"
ENROLL = "/.well-known/est/simpleenroll"
VCJ = "application/voucher-cms+json"


def brski_pki(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


class Services:
    def __init__(self, work: Path) -> None:
        self.pki = work / "pki"
        brski_pki("init", str(self.pki), "--serial", "SN-1")
        # Same names, another manufacturer CA: what the registrar must refuse.
        self.foreign = work / "foreign"
        brski_pki("init", str(self.foreign), "--serial", "SN-F")
        self.port, self.masa_port = free_port(), free_port()
        self.metrics_port, self.masa_metrics_port = free_port(), free_port()
        registrar_toml, masa_toml = write_configs(
            self.pki, work, registrar_listen=[f"[::1]:{self.port}", f"127.0.0.1:{self.port}"],
            masa_listen=[f"[::1]:{self.masa_port}"], masa_timeout=5)
        self.masa = ServiceProcess("registrar.masa_cli", masa_toml, work / "masa.log")
        self.masa.argv += ["--metrics", f"[::1]:{self.masa_metrics_port}"]
        self.registrar = ServiceProcess("registrar.cli", registrar_toml, work / "registrar.log")
        self.registrar.argv += ["--metrics", f"[::1]:{self.metrics_port}"]

    def idevid(self, pki: Path, serial: str) -> tuple[Path, Path]:
        d = pki / "manufacturer/idevid"
        return d / f"{serial}.crt", d / f"{serial}.key"

    def metrics(self, port: int | None = None) -> str:
        url = f"http://[::1]:{port or self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.read().decode()

    def refusals(self, endpoint: str, reason: str, *, port: int | None = None,
                 program: str = "registrar") -> float:
        match = re.search(rf'^brski_{program}_refusals_total\{{endpoint="{endpoint}",'
                          rf'reason="{reason}"\}} (\S+)$', self.metrics(port), re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    s = Services(tmp_path_factory.mktemp("refusals"))
    s.masa.start()
    s.registrar.start()
    yield s
    s.registrar.stop()
    s.masa.stop()
    for service in (s.registrar, s.masa):
        assert "Traceback" not in service.log(), service.log()


def foreign_cert(services: Services) -> x509.Certificate:
    cert_file, _ = services.idevid(services.foreign, "SN-F")
    return x509.load_pem_x509_certificate(cert_file.read_bytes())


def assert_refusal_logged_with_identity(services: Services, cert: x509.Certificate,
                                        before: str) -> None:
    new = services.registrar.log()[len(before):]
    lines = [line for line in new.splitlines() if "TLS handshake" in line]
    assert len(lines) == 1, new  # once per refusal
    line = lines[0]
    assert "WARNING" in line and "tls-unknown-ca" in line, line
    assert f"subject {name_text(cert.subject)}," in line, line
    assert "serialNumber=SN-F" in line, line  # the device's serial, spelt out
    assert f"serial {cert.serial_number:x}" in line, line
    assert f"issuer {name_text(cert.issuer)}" in line, line


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_with_an_unknown_manufacturer_gets_an_unknown_ca_alert(
        services, version):
    cert_file, key_file = services.idevid(services.foreign, "SN-F")
    before_log = services.registrar.log()
    before = services.refusals("tls", "tls-unknown-ca")
    # stdin held open for a second: with TLS 1.3 the client's handshake is over before the
    # server has read its certificate, and the alert arrives on the first read.
    done = subprocess.run(
        ["sh", "-c", "(printf 'GET /.well-known/est/cacerts HTTP/1.1\\r\\nHost: r\\r\\n\\r\\n';"
         " sleep 1) | openssl s_client -connect \"$0\" \"$1\" -cert \"$2\" -key \"$3\" -ign_eof",
         f"[::1]:{services.port}", version, str(cert_file), str(key_file)],
        capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert re.search(r"alert unknown ca.*SSL alert number 48", output), output[-3000:]
    assert "HTTP/1.1" not in done.stdout
    counted(lambda: services.refusals("tls", "tls-unknown-ca"), before + 1)
    assert_refusal_logged_with_identity(services, foreign_cert(services), before_log)


@pytest.mark.parametrize(("host", "tls"), [("[::1]", ["--tlsv1.3"]),
                                           ("127.0.0.1", ["--tlsv1.2", "--tls-max", "1.2"])])
def test_curl_with_an_unknown_manufacturer_gets_an_alert_not_an_empty_reply(
        services, host, tls):
    cert_file, key_file = services.idevid(services.foreign, "SN-F")
    before_log = services.registrar.log()
    before = services.refusals("tls", "tls-unknown-ca")
    done = subprocess.run(["curl", "-sS", "-k", *tls, "--cert", str(cert_file), "--key",
                           str(key_file), f"https://{host}:{services.port}"
                           "/.well-known/est/cacerts"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "alert unknown ca" in done.stderr, done.stderr
    assert "Empty reply" not in done.stderr
    counted(lambda: services.refusals("tls", "tls-unknown-ca"), before + 1)
    assert_refusal_logged_with_identity(services, foreign_cert(services), before_log)


def test_plain_http_to_the_tls_port_is_counted_and_harmless(services):
    before = services.refusals("tls", "tls-handshake-failed")
    with socket.create_connection(("::1", services.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.recv(100)  # OpenSSL sends no alert to a peer that does not speak TLS at all
    counted(lambda: services.refusals("tls", "tls-handshake-failed"), before + 1)
    cert_file, key_file = services.idevid(services.pki, "SN-1")
    assert call("::1", services.port, "GET", "/.well-known/est/cacerts",
                ctx=client_context(cert_file, key_file)).status == 200


def test_a_connect_and_close_probe_is_not_a_refusal(services):
    """joinproxyd's health check connects and closes without a byte: nobody was refused."""
    before_log = services.registrar.log()
    before = services.refusals("tls", "tls-handshake-failed")
    for _ in range(5):
        socket.create_connection(("::1", services.port), timeout=10).close()
    # A refusal after the probes: once it is counted, the probes have been handled too.
    with socket.create_connection(("::1", services.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.recv(100)
    counted(lambda: services.refusals("tls", "tls-handshake-failed"), before + 1)
    new = services.registrar.log()[len(before_log):]
    lines = [line for line in new.splitlines() if "TLS handshake from" in line]
    assert len(lines) == 1 and "http request" in lines[0], new  # the probes left no line


def test_a_flood_of_bad_handshakes_is_counted_in_full_and_logged_in_brief(services):
    before_log = services.registrar.log()
    before = services.refusals("tls", "tls-handshake-failed")
    flood = REFUSAL_LOG_BURST + 15
    for _ in range(flood):
        with socket.create_connection(("::1", services.port), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a handshake record, not TLS
            sock.recv(100)
    counted(lambda: services.refusals("tls", "tls-handshake-failed"), before + flood)
    lines = [line for line in services.registrar.log()[len(before_log):].splitlines()
             if "TLS handshake from" in line]
    assert 1 <= len(lines) <= REFUSAL_LOG_BURST, lines


def test_a_refused_voucher_request_names_the_pledge_and_is_counted(services):
    cert_file, key_file = services.idevid(services.pki, "SN-1")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    before_log = services.registrar.log()
    before = services.refusals("requestvoucher", "wrong-media-type")
    answer = call("::1", services.port, "POST", RV, body=b"{}", content_type="text/plain",
                  ctx=client_context(cert_file, key_file))
    assert answer.status == 415
    counted(lambda: services.refusals("requestvoucher", "wrong-media-type"), before + 1)
    [line] = [x for x in services.registrar.log()[len(before_log):].splitlines()
              if RV in x and "415" in x and "registrar.web" in x]
    assert f"subject {name_text(cert.subject)}," in line and "serialNumber=SN-1" in line
    assert f"serial {cert.serial_number:x}" in line
    # Through a join proxy the TCP peer is the proxy: the certificate is what names the pledge.
    assert "[::1]:" in line


def test_a_refused_enrollment_is_counted_and_names_the_client(services):
    before_log = services.registrar.log()
    before = services.refusals("simpleenroll", "unauthenticated")
    answer = call("::1", services.port, "POST", ENROLL, body=b"x",
                  content_type="application/pkcs10", ctx=client_context())
    assert answer.status == 401
    counted(lambda: services.refusals("simpleenroll", "unauthenticated"), before + 1)
    [line] = [x for x in services.registrar.log()[len(before_log):].splitlines()
              if ENROLL in x and "401" in x and "registrar.web" in x]
    assert "no client certificate" in line


def test_unknown_paths_share_one_series(services):
    before = services.refusals("unknown", "not-found")
    for path in ("/a", "/b/c", "/.well-known/brski/nothing"):
        assert call("::1", services.port, "GET", path).status == 404
    counted(lambda: services.refusals("unknown", "not-found"), before + 3)
    assert '{endpoint="/a"' not in services.metrics()


def test_masa_refusals_are_counted_by_reason(services):
    port = services.masa_metrics_port
    before = services.refusals("requestvoucher", "malformed", port=port, program="masa")
    answer = call("::1", services.masa_port, "POST", RV, body=b"not cms", content_type=VCJ)
    assert answer.status == 400
    assert services.refusals("requestvoucher", "malformed", port=port,
                             program="masa") == before + 1
    assert f"{RV} from [::1]:" in services.masa.log()


def test_metrics_address_is_a_config_key_too(services, tmp_path):
    """[metrics] listen in the file; a bad value is a configuration error with the key."""
    toml = Path(services.registrar.argv[services.registrar.argv.index("--config") + 1])
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text() + '\n[metrics]\nlisten = "nowhere"\n')
    done = subprocess.run([sys.executable, "-m", "registrar.cli", "--config", str(bad),
                           "--check-config"], capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_CONFIG
    assert "metrics.listen: 'nowhere'" in done.stderr


def test_ready_is_sent_to_systemd_once_listening(services, tmp_path):
    """Type=notify: READY=1 on $NOTIFY_SOCKET after the listeners are bound."""
    port = free_port()
    toml = Path(services.masa.argv[services.masa.argv.index("--config") + 1])
    config = tmp_path / "masa.toml"
    config.write_text(toml.read_text().replace(f"[::1]:{services.masa_port}", f"[::1]:{port}")
                      .replace(str(toml.parent / "masa.db"), str(tmp_path / "masa.db")))
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        proc = subprocess.Popen([sys.executable, "-m", "registrar.masa_cli", "--config",
                                 str(config)], env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            message = sock.recv(4096).decode()
            assert message.startswith("READY=1\n"), message
            assert f"[::1]:{port}" in message
            with socket.create_connection(("::1", port), timeout=5):
                pass  # already listening when READY=1 arrived
        finally:
            proc.terminate()
            assert proc.wait(15) == 0
        assert sock.recv(4096) == b"STOPPING=1"


def test_ldevid_from_another_domain_is_refused_with_an_alert_too(services, tmp_path):
    """The same path for any certificate that does not chain: an expired-looking or foreign
    LDevID gets the alert and the log line, never an empty reply."""
    now = datetime.datetime.now(datetime.UTC)
    from brski.pki import create_test_pki

    other = create_test_pki(now, serials=["SN-X"])
    issued = other.idevids["SN-X"]
    (tmp_path / "x.crt").write_bytes(issued.cert_pem())
    (tmp_path / "x.key").write_bytes(issued.key_pem())
    before = services.refusals("tls", "tls-unknown-ca")
    with pytest.raises(OSError, match=r"UNKNOWN_CA|unknown ca"):
        call("::1", services.port, "GET", "/.well-known/est/cacerts",
             ctx=client_context(tmp_path / "x.crt", tmp_path / "x.key"))
    counted(lambda: services.refusals("tls", "tls-unknown-ca"), before + 1)


def test_a_masa_refusal_names_the_device_the_request_claims(services):
    """The MASA's client is a registrar without a client certificate: the log names the
    device and the signer the refused request claims."""
    from lab.registrar_testing import load_issued, make_pvr

    cert_file, key_file = services.idevid(services.pki, "SN-1")
    idevid = load_issued(cert_file, key_file)
    # A pledge voucher-request sent straight to the MASA: not a registrar's, refused.
    body = make_pvr(idevid, "SN-1", idevid.cert.public_bytes(Encoding.DER),
                    datetime.datetime.now(datetime.UTC))
    before_log = services.masa.log()
    answer = call("::1", services.masa_port, "POST", RV, body=body, content_type=VCJ)
    assert 400 <= answer.status < 500, answer.text
    [line] = [x for x in services.masa.log()[len(before_log):].splitlines()
              if RV in x and "registrar.web" in x]
    assert "claims device SN-1, signed by " in line, line
    assert "serialNumber=SN-1" in line, line


def test_a_not_yet_valid_idevid_gets_its_own_alert_and_reason(services, tmp_path):
    """A certificate of a known manufacturer that is not valid yet (a pledge with a wrong
    clock's twin: a registrar with a wrong clock) is told so, and counted apart."""
    from brski.pki import issue_idevid
    from lab.registrar_testing import load_issued

    ca = load_issued(services.pki / "manufacturer/ca.crt", services.pki / "manufacturer/ca.key")
    future = issue_idevid(ca, "SN-LATER", "masa.example:9443",
                          datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30))
    (tmp_path / "l.crt").write_bytes(future.cert_pem())
    (tmp_path / "l.key").write_bytes(future.key_pem())
    before_log = services.registrar.log()
    before = services.refusals("tls", "tls-certificate-not-yet-valid")
    done = subprocess.run(["curl", "-sS", "-k", "--cert", str(tmp_path / "l.crt"), "--key",
                           str(tmp_path / "l.key"),
                           f"https://[::1]:{services.port}/.well-known/est/cacerts"],
                          capture_output=True, text=True, timeout=30)
    assert "alert bad certificate" in done.stderr, done.stderr
    counted(lambda: services.refusals("tls", "tls-certificate-not-yet-valid"), before + 1)
    [line] = [x for x in services.registrar.log()[len(before_log):].splitlines()
              if "TLS handshake" in x]
    assert "not yet valid" in line and "serialNumber=SN-LATER" in line, line
