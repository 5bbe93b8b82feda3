"""``pledge-sim sztp``: SZTP devices (RFC 8572 §5) that end with an RFC 8071 call home.

A device looks at its sources in order (§5.1): removable media, DHCPv6 option 136 (§8.3), then
its preconfigured bootstrap servers. For each server (§5.5):

* TLS with the IDevID as client certificate; with a trust anchor for the server the
  connection is trusted, otherwise provisional (any server certificate; trust-state FALSE);
* get-bootstrapping-data: all inputs to a trusted server; to an untrusted one only
  signed-data-preferred and a fresh nonce (App. B: reveal nothing to an unknown server);
* the answer is checked by ``sztp_verify.accept`` (voucher -> owner certificate -> conveyed
  information, §5.4); a redirect is followed (its trust anchors kept only from a trusted or
  signed source), up to ``MAX_REDIRECT_DEPTH`` and never to a server already on the path
  (a loop is refused as such);
* signed data makes trust-state TRUE. The server is then also treated as trusted for progress
  reports when its TLS certificate chains to the voucher's pinned-domain-cert: the owner's own
  server (our inference; §5.6 says reports go to trusted servers only);
* onboarding (§5.6): boot image (download from the given URIs, file:// or https://, sha-256
  checked, "installed", then a simulated reboot that starts bootstrapping again), pre-script,
  configuration (merge into / replace the state directory's config.json, atomically),
  post-script, bootstrap-complete; each failure is reported with its exact reason and leaves
  the configuration as it was.

Call home (RFC 8071): the configuration names the manager (``{"call-home": {"address":
"fe80::1%eth0", "port": 4336}}``). The device connects to it over TCP and is the TLS server
there, with its IDevID; it requires the manager's certificate to chain to the owner's domain
trust anchor (the pinned-domain-cert, or the trusted server's anchor) and answers one RESTCONF
GET of ``/restconf/data/ietf-system:system-state/platform``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import secrets
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import dhcpv6, sztp
from brski.chain import verify_chain
from brski.errors import DecodeError, SignatureError, ValidationError

from . import http
from .identity import PledgeIdentity
from .sztp_verify import Refused, accept, trust_anchors

log = logging.getLogger("pledge_sim.sztp")
PLATFORM = "/restconf/data/ietf-system:system-state/platform"
MAX_REBOOTS = 2
SCRIPT_TIMEOUT = 20.0
MAX_IMAGE = 64 * 1024 * 1024
MEDIA_FILES = ("conveyed-information.cms", "owner-certificate.cms", "ownership-voucher.cms")


@dataclass(frozen=True)
class Server:
    address: str
    port: int
    anchors: tuple[x509.Certificate, ...] = ()  # empty: untrusted

    @property
    def label(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address \
            else f"{self.address}:{self.port}"


@dataclass
class Settings:
    masa_anchors: list[x509.Certificate]
    servers: list[Server] = field(default_factory=list)  # preconfigured
    media: Path | None = None
    dhcpv6_interface: str | None = None
    state: Path = Path("pledge-sim-sztp")
    hw_model: str = "pledge-sim"
    os_name: str = "SimOS"
    os_version: str = "1.0"
    encoding: str = "json"
    timeout: float = 20.0
    callhome_timeout: float = 20.0


@dataclass
class Outcome:
    serial: str
    ok: bool = False
    code: str = "no-source"
    reason: str = "no bootstrap source gave usable data"
    source: str | None = None
    path: list[str] = field(default_factory=list)  # the servers asked, in order
    signed: bool = False
    reports: list[str] = field(default_factory=list)  # progress types sent
    os_version: str | None = None
    callhome: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


class _Reboot(Exception):
    """A boot image was installed: bootstrapping starts again (§5.6)."""


class _Reporter:
    """report-progress to one (trusted) server, or nowhere."""

    def __init__(self, device: Device, server: Server | None, verbose: bool) -> None:
        self.device, self.server, self.verbose = device, server, verbose

    async def __call__(self, kind: str, message: str | None = None, *,
                       always: bool = False) -> None:
        if self.server is None or not (always or self.verbose):
            return
        body = sztp.ReportProgressInput(kind, message).encode(self.device.settings.encoding)
        try:
            status, _ = await self.device.rpc(self.server, "report-progress", body)
        except (OSError, ssl.SSLError, http.HttpError, TimeoutError) as exc:
            log.warning("%s: report %s to %s failed: %s", self.device.serial, kind,
                        self.server.label, exc)
            return
        if status != 204:
            log.warning("%s: report %s: HTTP %d (RFC 8572 §7.3 wants 204)",
                        self.device.serial, kind, status)
            return
        self.device.outcome.reports.append(kind)


class Device:
    def __init__(self, identity: PledgeIdentity, settings: Settings) -> None:
        self.identity = identity
        self.serial = identity.serial
        self.settings = settings
        self.outcome = Outcome(identity.serial)
        self.home = settings.state / identity.serial
        self.home.mkdir(parents=True, exist_ok=True)
        self.running = self._running_os()
        self._conns: dict[str, http.Connection] = {}

    # -- state --------------------------------------------------------------------------------
    def _running_os(self) -> tuple[str, str]:
        try:
            doc = json.loads((self.home / "os.json").read_text())
            return doc["os-name"], doc["os-version"]
        except (OSError, ValueError, KeyError):
            return self.settings.os_name, self.settings.os_version

    def _write(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.home / name)

    # -- the bootstrapping loop (§5.1) --------------------------------------------------------
    async def run(self) -> Outcome:
        for _ in range(MAX_REBOOTS + 1):
            try:
                await self._bootstrap()
                break
            except _Reboot:
                self.running = self._running_os()
                log.info("%s: rebooted into %s %s", self.serial, *self.running)
            finally:
                await self._close()  # a reboot drops every connection
        self.outcome.os_version = self.running[1]
        return self.outcome

    async def _bootstrap(self) -> None:
        s = self.settings
        if s.media is not None and await self._media(s.media):
            return
        if s.dhcpv6_interface is not None:
            try:
                uris = await _dhcpv6_once(s.dhcpv6_interface, s.timeout)
            except (OSError, DecodeError, TimeoutError) as exc:
                self._fail("dhcpv6", f"DHCPv6 option 136: {exc}")
                uris = []
            for uri in uris:
                server = sztp.uri_server(uri)
                address = server.address
                if address.startswith("fe80:") and "%" not in address:
                    address += f"%{s.dhcpv6_interface}"
                if await self._server(Server(address, server.port), [], "dhcpv6"):
                    return
        for server in s.servers:
            if await self._server(server, [], "configured"):
                return

    def _fail(self, code: str, reason: str) -> None:
        self.outcome.ok = False
        self.outcome.code, self.outcome.reason = code, reason
        log.warning("%s: %s: %s", self.serial, code, reason)

    # -- removable media (§4.2: untrusted) ----------------------------------------------------
    async def _media(self, directory: Path) -> bool:
        found = [directory / name for name in MEDIA_FILES]
        if not found[0].exists():
            return False
        try:
            ci = found[0].read_bytes()
            oc = found[1].read_bytes() if found[1].exists() else None
            ov = found[2].read_bytes() if found[2].exists() else None
            output = sztp.GetBootstrappingDataOutput(ci, oc, ov)
            output.check()
        except (OSError, ValidationError) as exc:
            self._fail("media", f"{directory}: {exc}")
            return False
        return await self._process(output, None, None, [], "media", nonce=None)

    # -- one bootstrap server (§5.5) -----------------------------------------------------------
    async def _server(self, server: Server, path: list[str], source: str) -> bool:
        if server.label in path:
            self._fail("redirect-loop", f"redirected back to {server.label} (path: "
                                        f"{' -> '.join([*path, server.label])})")
            return False
        if len(path) > sztp.MAX_REDIRECT_DEPTH:
            self._fail("redirect-depth", f"more than {sztp.MAX_REDIRECT_DEPTH} redirects")
            return False
        path = [*path, server.label]
        self.outcome.path.append(server.label)
        trusted = bool(server.anchors)
        nonce = None if trusted else secrets.token_bytes(16)
        if trusted:
            name, version = self.running
            inp = sztp.GetBootstrappingDataInput(False, self.settings.hw_model, name, version)
        else:
            inp = sztp.GetBootstrappingDataInput(True, nonce=nonce)
        try:
            status, body, peer = await self._get(server, inp)
        except (OSError, ssl.SSLError, http.HttpError, TimeoutError) as exc:
            self._fail("unreachable", f"{server.label}: {type(exc).__name__}: {exc}")
            return False
        if status != 200:
            errors = sztp.parse_errors(body, self.settings.encoding)
            what = "; ".join(f"{e.get('error-tag')}: {e.get('error-message')}" for e in errors)
            self._fail("server-error", f"{server.label}: HTTP {status}: {what or body[:200]!r}")
            return False
        try:
            output = sztp.GetBootstrappingDataOutput.decode(body, self.settings.encoding)
        except (DecodeError, ValidationError) as exc:
            self._fail("parsing", f"{server.label}: {exc}")
            return False
        return await self._process(output, server, peer, path, source, nonce=nonce)

    async def _connection(self, server: Server) -> http.Connection:
        """One persistent connection per server (RESTCONF over HTTP/1.1 keep-alive): one
        circuit through a join proxy for all of a device's RPCs there."""
        conn = self._conns.get(server.label)
        if conn is None or not conn.reusable:
            conn = await http.connect(server.address, server.port,
                                      self._client_context(server),
                                      timeout=self.settings.timeout)
            self._conns[server.label] = conn
        return conn

    async def _close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.close()
        self._conns.clear()

    async def _get(self, server: Server, inp: sztp.GetBootstrappingDataInput
                   ) -> tuple[int, bytes, x509.Certificate | None]:
        conn = await self._connection(server)
        der = conn.peer_cert_der
        response = await conn.request(
            "POST", sztp.OPERATIONS + "get-bootstrapping-data",
            body=inp.encode(self.settings.encoding), headers=self._headers(),
            timeout=self.settings.timeout)
        peer = x509.load_der_x509_certificate(der) if der else None
        return response.status, response.body, peer

    async def rpc(self, server: Server, name: str, body: bytes) -> tuple[int, bytes]:
        conn = await self._connection(server)
        response = await conn.request("POST", sztp.OPERATIONS + name, body=body,
                                      headers=self._headers(), timeout=self.settings.timeout)
        return response.status, response.body

    def _headers(self) -> dict[str, str]:
        media = sztp.MEDIA[self.settings.encoding]
        return {"Content-Type": media, "Accept": media}

    def _client_context(self, server: Server) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # the anchor authenticates the server, not a name
        if server.anchors:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=_pem(server.anchors))
        else:
            ctx.verify_mode = ssl.CERT_NONE  # provisional (§5.5), trust-state FALSE
        ctx.load_cert_chain(str(self.identity.cert_path), str(self.identity.key_path))
        return ctx

    # -- what came back ------------------------------------------------------------------------
    async def _process(self, output: sztp.GetBootstrappingDataOutput, server: Server | None,
                       peer: x509.Certificate | None, path: list[str], source: str, *,
                       nonce: bytes | None) -> bool:
        trusted = server is not None and bool(server.anchors)
        now = datetime.datetime.now(datetime.UTC)
        try:
            got = accept(output, trusted=trusted, serial=self.serial,
                         masa_anchors=self.settings.masa_anchors, nonce=nonce, now=now)
        except Refused as exc:
            self._fail(exc.code, f"{server.label if server else source}: {exc.reason}")
            if trusted and server is not None:
                # RFC 8572 §7.3: parsing-error covers a voucher for another serial number,
                # a signature that does not match, unsigned data where signed was expected
                await _Reporter(self, server, False)("parsing-error",
                                                     f"{exc.code}: {exc.reason}", always=True)
            return False
        self.outcome.signed = self.outcome.signed or got.signed
        reporting = server if trusted else None
        anchors: tuple[x509.Certificate, ...] = server.anchors if server and trusted else ()
        if got.pinned is not None:
            anchors = (got.pinned,)
            if server is not None and peer is not None and _chains(peer, got.pinned, now):
                reporting = server
        if isinstance(got.information, sztp.RedirectInformation):
            for entry in got.information.servers:
                try:
                    tas = tuple(trust_anchors(entry.trust_anchor)) if entry.trust_anchor \
                        else ()
                except Refused as exc:
                    self._fail(exc.code, exc.reason)
                    continue
                if await self._server(Server(entry.address, entry.port, tas), path,
                                      source):
                    return True
            return False
        verbose = output.reporting_level == "verbose"
        report = _Reporter(self, reporting, verbose)
        self.outcome.source = source
        try:
            await self._onboard(got.information, report, anchors)
        except _Reboot:
            raise
        except Refused as exc:
            self._fail(exc.code, exc.reason)
            kind = exc.code if exc.code in sztp.PROGRESS_TYPES else "bootstrap-error"
            await report(kind, exc.reason, always=True)
            return False
        return True

    # -- onboarding (§5.6) ---------------------------------------------------------------------
    async def _onboard(self, info: sztp.OnboardingInformation, report: _Reporter,
                       anchors: tuple[x509.Certificate, ...]) -> None:
        await report("bootstrap-initiated", always=True)
        if info.boot_image is not None:
            await self._boot_image(info.boot_image, report)
        if info.pre_configuration_script is not None:
            await report("pre-script-initiated")
            self._script("pre", info.pre_configuration_script, "pre-script-error")
            await report("pre-script-complete")
        call_home = None
        if info.configuration is not None:
            await report("config-initiated")
            call_home = self._configure(info.configuration_handling or "merge",
                                        info.configuration)
            await report("config-complete")
        if info.post_configuration_script is not None:
            await report("post-script-initiated")
            self._script("post", info.post_configuration_script, "post-script-error")
            await report("post-script-complete")
        await report("bootstrap-complete", always=True)
        self.outcome.ok, self.outcome.code, self.outcome.reason = True, "ok", "bootstrapped"
        if call_home is None:
            call_home = json.loads((self.home / "config.json").read_text()).get("call-home") \
                if (self.home / "config.json").exists() else None
        if call_home:
            self.outcome.callhome = await self._call_home(call_home, anchors)
            if not self.outcome.callhome.get("ok"):
                self._fail("call-home", str(self.outcome.callhome.get("error")))

    async def _boot_image(self, image: sztp.BootImage, report: _Reporter) -> None:
        if (image.os_name, image.os_version) == self.running:
            await report("boot-image-complete", "already running it")
            return
        await report("boot-image-initiated")
        if image.sha256 is None:
            raise Refused("boot-image-error", "boot image has no image-verification: it "
                                              "cannot be checked (RFC 8572 §5.6)")
        if not image.download_uris:
            raise Refused("boot-image-error", "boot image has no download-uri")
        errors = []
        for uri in image.download_uris:
            try:
                data = await _download(uri, self.settings.timeout)
            except (OSError, ValueError, http.HttpError, TimeoutError, ssl.SSLError) as exc:
                errors.append(f"{uri}: {exc}")
                continue
            digest = hashlib.sha256(data).digest()
            if digest != image.sha256:
                errors.append(f"{uri}: sha-256 mismatch: image has {digest.hex()}, "
                              f"image-verification says {image.sha256.hex()}")
                continue
            self._write("boot-image", data)
            self._write("os.json", json.dumps({"os-name": image.os_name,
                                               "os-version": image.os_version}).encode())
            await report("boot-image-installed-rebooting", f"{image.os_name} "
                         f"{image.os_version}", always=True)
            raise _Reboot()
        raise Refused("boot-image-error", "; ".join(errors))

    def _script(self, which: str, script: bytes, error: str) -> None:
        path = self.home / f"{which}-configuration-script"
        self._write(path.name, script)
        try:
            done = subprocess.run(["/bin/sh", str(path)], cwd=self.home, capture_output=True,
                                  timeout=SCRIPT_TIMEOUT, check=False,
                                  env={"PATH": "/usr/bin:/bin", "SZTP_SERIAL": self.serial,
                                       "SZTP_STATE": str(self.home)})
        except subprocess.TimeoutExpired:
            raise Refused(error, f"{which}-configuration-script ran over "
                                 f"{SCRIPT_TIMEOUT:g} s") from None
        (self.home / f"{which}-script.out").write_bytes(done.stdout + done.stderr)
        if done.returncode != 0:
            raise Refused(error, f"{which}-configuration-script exited {done.returncode}: "
                                 f"{(done.stderr or done.stdout)[-200:].decode(errors='replace')}")

    def _configure(self, handling: str, configuration: bytes) -> dict | None:
        try:
            new = json.loads(configuration)
            if not isinstance(new, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused("config-error", f"configuration is not this device's encoding (a "
                                          f"JSON object): {exc}") from exc
        current: dict = {}
        if handling == "merge" and (self.home / "config.json").exists():
            current = json.loads((self.home / "config.json").read_text())
        merged = {**current, **new}
        self._write("config.json", json.dumps(merged, indent=1).encode())  # atomic commit
        return merged.get("call-home")

    # -- RFC 8071 call home ----------------------------------------------------------------
    async def _call_home(self, target: dict, anchors: tuple[x509.Certificate, ...]) -> dict:
        try:
            host, port = str(target["address"]), int(target.get("port",
                                                                sztp.CALL_HOME_RESTCONF_TLS))
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"call-home in the configuration: {exc}"}
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.identity.cert_path), str(self.identity.key_path))
        if not anchors:
            return {"ok": False, "error": "no owner trust anchor to authenticate the manager"}
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=_pem(anchors))
        platform = {"ietf-system:platform": {
            "os-name": self.running[0], "os-release": self.running[1],
            "os-version": self.running[1], "machine": self.settings.hw_model}}
        return await asyncio.to_thread(_serve_call_home, host, port, ctx, platform,
                                       self.settings.callhome_timeout)


def _serve_call_home(host: str, port: int, ctx: ssl.SSLContext, platform: dict,
                     timeout: float) -> dict:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        return {"ok": False, "manager": where, "error": f"TCP to the manager: {exc}"}
    try:
        with ctx.wrap_socket(sock, server_side=True) as tls:
            der = tls.getpeercert(binary_form=True)
            manager = x509.load_der_x509_certificate(der).subject.rfc4514_string() \
                if der else None
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 16384:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                request += chunk
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) == 3 and parts[0] == "GET" and parts[1] == PLATFORM:
                body = json.dumps(platform).encode()
                status = "200 OK"
            else:
                body = json.dumps({"ietf-restconf:errors": {"error": [{
                    "error-type": "protocol", "error-tag": "invalid-value",
                    "error-message": f"no resource {parts[1] if len(parts) > 1 else ''}"}]}}
                ).encode()
                status = "404 Not Found"
            tls.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/yang-data+json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body)
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.unwrap()
    except (OSError, ssl.SSLError, ValueError) as exc:
        return {"ok": False, "manager": where, "error": f"TLS (device as server): {exc}"}
    return {"ok": status.startswith("200"), "manager": where, "manager_cert": manager,
            "request": line}


async def _download(uri: str, timeout: float) -> bytes:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        data = Path(parts.path).read_bytes()
    elif parts.scheme == "https":
        ctx = ssl.create_default_context()
        conn = await http.connect(parts.hostname or "", parts.port or 443, ctx, timeout=timeout)
        try:
            response = await conn.request("GET", parts.path or "/", timeout=timeout)
        finally:
            await conn.close()
        if response.status != 200:
            raise ValueError(f"HTTP {response.status}")
        data = response.body
    else:
        raise ValueError(f"unsupported scheme {parts.scheme!r} (file or https)")
    if len(data) > MAX_IMAGE:
        raise ValueError(f"image larger than {MAX_IMAGE} bytes")
    return data


def _chains(cert: x509.Certificate, anchor: x509.Certificate, now: datetime.datetime) -> bool:
    try:
        verify_chain(cert, [], [anchor], now)
    except SignatureError:
        return False
    return True


def _pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


# -- DHCPv6 (I/O around brski.dhcpv6) ----------------------------------------------------------


def dhcpv6_sztp_uris(interface: str, timeout: float, attempts: int = 4) -> list[str]:
    """Information-Request on ``interface`` for option 136; the URIs of the first Reply."""
    index = socket.if_nametoindex(interface)
    try:
        mac = bytes.fromhex(Path(f"/sys/class/net/{interface}/address").read_text()
                            .strip().replace(":", ""))
    except (OSError, ValueError):
        mac = secrets.token_bytes(6)
    txid = secrets.randbits(24)
    message = dhcpv6.information_request(txid, dhcpv6.duid_ll(mac))
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("::", dhcpv6.CLIENT_PORT, 0, index))
        sock.settimeout(timeout / attempts)
        for _ in range(attempts):
            sock.sendto(message, (dhcpv6.ALL_SERVERS, dhcpv6.SERVER_PORT, 0, index))
            try:
                while True:
                    data, _ = sock.recvfrom(65535)
                    try:
                        options = dhcpv6.parse_reply(data, txid)
                    except DecodeError:
                        continue  # another client's, or garbage: keep listening
                    if dhcpv6.OPTION_SZTP_REDIRECT not in options:
                        raise DecodeError("the DHCPv6 Reply has no option 136")
                    return sztp.decode_dhcpv6_uris(options[dhcpv6.OPTION_SZTP_REDIRECT][0])
            except TimeoutError:
                continue
    raise TimeoutError(f"no DHCPv6 Reply on {interface} within {timeout:g} s")


_DHCPV6: dict[str, asyncio.Task[list[str]]] = {}


async def _dhcpv6_once(interface: str, timeout: float) -> list[str]:
    """The simulated devices of one process share their interface, hence one DHCPv6
    exchange (several clients on port 546 of one address would steal each other's Replies)."""
    task = _DHCPV6.get(interface)
    if task is None or (task.done() and task.exception() is not None):
        task = asyncio.ensure_future(asyncio.to_thread(dhcpv6_sztp_uris, interface, timeout))
        _DHCPV6[interface] = task
    return await asyncio.shield(task)


async def run_devices(identities: Sequence[PledgeIdentity], settings: Settings,
                      concurrency: int) -> list[Outcome]:
    gate = asyncio.Semaphore(concurrency)

    async def one(identity: PledgeIdentity) -> Outcome:
        async with gate:
            try:
                return await Device(identity, settings).run()
            except Exception as exc:  # a device's bug must not hide the others' outcomes
                log.exception("%s: crashed", identity.serial)
                return Outcome(identity.serial, code="crashed", reason=repr(exc))

    return list(await asyncio.gather(*(one(i) for i in identities)))
