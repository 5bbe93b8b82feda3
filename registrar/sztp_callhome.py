"""A small RFC 8071 call-home manager: the NMS side of RESTCONF call home over TLS.

The device opens the TCP connection (to port 4336, restconf-ch-tls, by default) and is then
the TLS *server*; this listener is the TLS client. It validates the device's certificate (the
IDevID) against the manufacturer CAs given (the leaf must be issued by one of them, or by an
intermediate given as an anchor: Python 3.11's ssl shows only the peer's leaf) and, if a list
of serial numbers is given, requires the certificate's serialNumber to be one of them (RFC 8071
§4.1: an expected identifier), presents its own certificate when it has one (the device may
require it), then reads one RESTCONF resource over the connection (``GET /restconf/data/...``)
and reports::

    {"serial": "sn-1", "peer": "[fe80::2%join0]:40412", "ok": true, "status": 200,
     "resource": {...}, "error": null}

Blocking sockets in threads, one per connection: asyncio's streams cannot make an accepted
TCP connection the TLS client side. Python's ssl module offers no TLS heartbeat, which RFC
8071 §4.1 asks the client to advertise: not done (said in the man page).
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from brski import certs
from brski.chain import verify_chain
from brski.errors import BrskiError, SignatureError

RESOURCE = "/restconf/data/ietf-system:system-state/platform"
MAX_RESPONSE = 64 * 1024


@dataclass
class CallHome:
    serial: str | None
    peer: str
    ok: bool
    status: int | None = None
    resource: object = None
    error: str | None = None

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def load_anchors(ca_files: Sequence[Path]) -> list[x509.Certificate]:
    return [c for path in ca_files for c in x509.load_pem_x509_certificates(path.read_bytes())]


def client_context(cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The manager's TLS client side. OpenSSL's own check is off on purpose: it would demand
    id-kp-serverAuth of the device's certificate, and IDevIDs are issued for TLS clients (ours
    carry clientAuth only); ``handle`` checks the path to the manufacturer CAs itself (the
    handshake signature, proving the device holds the key, OpenSSL checks regardless)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The device is named by its certificate's serialNumber, not by a host name (RFC 8071
    # §4.1: issuer path + expected identifier).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def _peer(address: tuple) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def handle(sock: socket.socket, address: tuple, ctx: ssl.SSLContext,
           anchors: Sequence[x509.Certificate], expect: frozenset[str], resource: str,
           timeout: float) -> CallHome:
    peer = _peer(address)
    sock.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(sock, server_side=False)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        return CallHome(None, peer, False, error=f"TLS handshake: {exc}")
    with tls:
        der = tls.getpeercert(binary_form=True)
        if not der:
            return CallHome(None, peer, False, error="device sent no certificate")
        try:
            device = x509.load_der_x509_certificate(der)
            serial = certs.serial_number(device)
        except (ValueError, BrskiError) as exc:
            return CallHome(None, peer, False, error=f"device certificate: {exc}")
        try:
            verify_chain(device, [], anchors, datetime.datetime.now(datetime.UTC))
        except SignatureError as exc:
            return CallHome(serial, peer, False, error=f"device certificate: {exc}")
        if expect and serial not in expect:
            return CallHome(serial, peer, False, error=f"serial {serial!r} is not expected")
        try:
            tls.sendall(f"GET {resource} HTTP/1.1\r\nHost: device\r\n"
                        "Accept: application/yang-data+json\r\nConnection: close\r\n\r\n"
                        .encode())
            data = b""
            while len(data) <= MAX_RESPONSE:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (ssl.SSLError, OSError) as exc:
            return CallHome(serial, peer, False, error=f"reading {resource}: {exc}")
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return CallHome(serial, peer, False, error="device answered no HTTP status line")
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        return CallHome(serial, peer, False, status, error="resource is not JSON")
    return CallHome(serial, peer, status == 200, status, doc,
                    None if status == 200 else f"HTTP {status}")


def serve(host: str, port: int, ctx: ssl.SSLContext, anchors: Sequence[x509.Certificate], *,
          expect: Sequence[str] = (),
          count: int = 0, resource: str = RESOURCE, timeout: float = 10.0,
          report: Callable[[CallHome], None] = lambda c: print(c.line(), flush=True),
          ready: Callable[[], None] = lambda: None) -> int:
    """Accept call homes until ``count`` succeeded (0: forever). Returns how many did."""
    wanted = frozenset(expect)
    done = 0
    lock = threading.Lock()
    finished = threading.Event()
    # getaddrinfo turns "fe80::1%join0" into a scoped (host, port, flow, scope) address
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    try:
        listener = socket.create_server(address, family=family)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {_peer((host, port))}: "
                                 f"{exc.strerror}") from exc
    listener.settimeout(0.5)

    def worker(conn: socket.socket, address: tuple) -> None:
        nonlocal done
        result = handle(conn, address, ctx, anchors, wanted, resource, timeout)
        with lock:
            report(result)
            if result.ok:
                done += 1
                if count and done >= count:
                    finished.set()

    ready()
    with listener:
        while not finished.is_set():
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=worker, args=(conn, address), daemon=True).start()
    return done
