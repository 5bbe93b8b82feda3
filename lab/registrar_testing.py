"""Client-side helpers for tests and the demo: a minimal pledge voucher-request and an HTTPS
call with a client certificate. Not a pledge: the real one is ``pledge_sim``.
"""

from __future__ import annotations

import datetime
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski.pki import Issued
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, VoucherRequest

from .registrar_setup import wait_ready


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    server_cert: bytes | None  # DER of the TLS server certificate the client saw

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def load_issued(cert_file: Path, key_file: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    return Issued(cert, key)  # type: ignore[arg-type]


def client_context(cert_file: Path | None = None, key_file: Path | None = None,
                   *, ca_file: Path | None = None) -> ssl.SSLContext:
    """A TLS client context. Without ``ca_file`` it accepts any server certificate, as a
    pledge does before it has a voucher (RFC 8995 §5.1, provisional TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.check_hostname = False
    if cert_file is not None:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


def call(host: str, port: int, method: str, path: str, *, body: bytes | None = None,
         content_type: str | None = None, ctx: ssl.SSLContext | None = None,
         headers: dict[str, str] | None = None, timeout: float = 20) -> Answer:
    conn = http.client.HTTPSConnection(host, port, context=ctx or client_context(),
                                       timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        conn.request(method, path, body=body, headers=hdrs)
        response = conn.getresponse()
        data = response.read()
        sock = conn.sock
        server_cert = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) \
            else None
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                      server_cert)
    finally:
        conn.close()


def server_certificate(host: str, port: int, ctx: ssl.SSLContext | None = None) -> bytes:
    """The DER of the TLS server certificate (what a pledge puts in proximity-registrar-cert)."""
    answer = call(host, port, "GET", "/.well-known/est/cacerts", ctx=ctx)
    assert answer.server_cert is not None
    return answer.server_cert


def make_pvr(idevid: Issued, serial: str, registrar_cert: bytes, now: datetime.datetime, *,
             nonce: bytes | None = None, assertion: Assertion = Assertion.PROXIMITY) -> bytes:
    """A CMS-signed pledge voucher-request, as RFC 8995 §5.2 describes it."""
    request = VoucherRequest(
        assertion=assertion,
        created_on=now,
        serial_number=serial,
        nonce=nonce if nonce is not None else os.urandom(16),
        proximity_registrar_cert=registrar_cert,
    )
    return sign_voucher_cms(request, idevid.key, [idevid.cert], now)


# --- running the services as processes ----------------------------------------------------


def free_port(host: str = "::1") -> int:
    """A TCP port free right now on ``host`` (tests start a server on it just after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``brski-registrar`` or ``brski-masa`` run as an operator would, its log in a file."""

    def __init__(self, module: str, config: Path, log_path: Path) -> None:
        self.argv = [sys.executable, "-m", module, "--config", str(config)]
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self, timeout: float = 20) -> ServiceProcess:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        # The log file is appended to across restarts: count ready lines, wait for one more.
        wait_ready(self.log, timeout, alive=self.alive, count=self._starts + 1)
        self._starts += 1
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.popen is None:
            return None
        if self.alive():
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (for restart-loses-nothing tests)."""
        self.stop(signal.SIGKILL)
