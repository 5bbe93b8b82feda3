"""One constrained pledge over CoAPS (cBRSKI + EST-coaps): the asyncio adapter.

The payload decisions are ``pledge_sim.constrained``'s (sans-IO); CoAP is aiocoap's and DTLS
``coaps_io``'s. Each attempt is one DTLS session with the IDevID, opened provisionally (the
pledge cannot yet verify the registrar, RFC 8995 §5.1):

    rv    POST CF 836   COSE PVR (nonce, the registrar's SPKI hash) -> COSE voucher (x5bag
                        stripped: verified with the installed MASA signer / anchor)
          the registrar's certificate must chain to the voucher's pin (RFC 8995 §5.6.2)
    vs    POST CF 60    voucher status, CBOR; also when the voucher is refused
    sen   POST CF 286   DER CSR -> LDevID (CF 287)
    crts  GET  CF 281   only when the pinned CA did not sign the LDevID (cBRSKI §6.7.1)
    es    POST CF 60    enroll status, CBOR

Retries as for the HTTPS pledge (``pledge_sim.runner``): transient failures back off until the
deadline, a 5.03 waits its Max-Age, a refusal moves to the next proxy or registrar.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import aiocoap
from aiocoap import error as coap_error
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from brski.dtls import DtlsConfig
from brski.telemetry import StatusReport
from coaps_io.aiocoap_dtls import create_client_context
from coaps_io.endpoint import DtlsEndpoint, PeerAddress

from . import est
from .coaps_options import BLOCK_SIZES
from .constrained import (
    CF_PKCS7_CERTS,
    CF_PKCS10,
    CF_PKIX_CERT,
    CF_VOUCHER_COSE,
    accept_voucher_cose,
    build_cose_pvr,
    build_csr_der,
    check_registrar_pinned,
    decode_est_certs,
    enrolled_ldevid,
    new_nonce,
)
from .discovery import Candidate
from .est import EstError
from .identity import PledgeIdentity
from .retry import Backoff
from .runner import EnrollResult, Settings, file_stem, now_utc
from .voucher_check import AcceptedVoucher, VoucherRejected

log = logging.getLogger(__name__)

CF_CBOR = 60  # application/cbor: cBRSKI telemetry
RV, VS, ES = "/.well-known/brski/rv", "/.well-known/brski/vs", "/.well-known/brski/es"
SEN, CRTS = "/.well-known/est/sen", "/.well-known/est/crts"
# Max-Age when a 5.03 carries none (RFC 7252 §5.10.5 default is 60 s; a simulator waits less,
# still capped by the backoff cap).
DEFAULT_MAX_AGE = 60


@dataclass(frozen=True)
class Failed(Exception):
    code: str
    reason: str
    other_proxy: bool = False  # this registrar will not do; else transient (back off)
    wait: float | None = None  # a 5.03's Max-Age


def block_szx(size: int) -> int:
    """The SZX of a block size (16, 32, ... 1024 bytes); ValueError otherwise."""
    if size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}")
    return BLOCK_SIZES.index(size)


class CoapsPledgeRunner:
    """Enrolls one pledge over CoAPS; ``run()`` gives the same EnrollResult as the HTTPS
    runner, so ``pledge-sim``'s fleet and report serve both transports."""

    def __init__(self, identity: PledgeIdentity, candidates: Sequence[Candidate],
                 settings: Settings) -> None:
        if not isinstance(identity.key, ec.EllipticCurvePrivateKey):
            raise ValueError("a CoAPS pledge needs an EC IDevID key (DTLS with ECDSA)")
        self.identity = identity
        self.candidates = list(candidates)
        self.settings = settings
        self.backoff = Backoff(random.random, settings.backoff_initial, settings.backoff_cap)
        self.result = EnrollResult(identity.serial)
        self.records = [0, 0]  # DTLS application records sent / received, all attempts
        self._doing = ""  # what was under way, for a deadline that interrupts it

    async def run(self) -> EnrollResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.deadline):
                await self._attempts()
        except TimeoutError:
            self._fail("deadline", f"gave up after {self.settings.deadline:g} s; last: "
                       f"{self._doing or self.result.reason or 'no answer'}")
        finally:
            self.result.seconds = round(time.monotonic() - started, 3)
            self.result.events.append(f"coaps: {self.records[0]} CoAP messages sent, "
                                      f"{self.records[1]} received")
        return self.result

    async def _attempts(self) -> None:
        refused: set[Candidate] = set()
        turn = zlib.crc32(self.identity.serial.encode())
        while True:
            usable = [c for c in self.candidates if c not in refused]
            if not usable:
                if not self.result.reason:
                    self._fail("no-proxy", "no proxy or registrar to try")
                return
            candidate = usable[turn % len(usable)]
            self.result.attempts += 1
            self.result.proxy, self.result.method = candidate.label, candidate.method
            try:
                await self._attempt(candidate)
                return
            except Exception as exc:
                if not isinstance(exc, Failed):
                    # A fault of this simulator or its libraries: say it in the report, and
                    # do not loop on it with this proxy.
                    log.debug("%s: unexpected", self.identity.serial, exc_info=True)
                    exc = Failed("error", f"{candidate.label}: {type(exc).__name__}: {exc}",
                                 other_proxy=True)
                failure = exc
                self._fail(failure.code, failure.reason)
                self.result.events.append(f"attempt {self.result.attempts} via "
                                          f"{candidate.label}: {failure.reason}")
                log.info("%s: %s", self.identity.serial, failure.reason)
                turn += 1
                if failure.other_proxy:
                    refused.add(candidate)
                    continue
                if failure.wait is not None:
                    self.result.waits += 1
                    await asyncio.sleep(min(failure.wait, self.settings.backoff_cap))
                else:
                    await asyncio.sleep(self.backoff.delay())

    # -- one DTLS session ---------------------------------------------------------------------
    async def _attempt(self, candidate: Candidate) -> None:
        ident = self.identity
        assert isinstance(ident.key, ec.EllipticCurvePrivateKey)
        config = DtlsConfig(ident.cert, ident.key, [], provisional=True)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                candidate.host, candidate.port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise Failed("address", f"{candidate.label}: {exc.strerror}",
                         other_proxy=True) from exc
        # A name may resolve to either family: the socket follows the first address.
        family, addr = infos[0][0], infos[0][4]
        bind = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        ctx, endpoint = await create_client_context(config, bind=bind)
        try:
            await self._enroll(ctx, endpoint, candidate, addr, config)
        finally:
            self.records[0] += endpoint.records_sent
            self.records[1] += endpoint.records_received
            await ctx.shutdown()

    async def _enroll(self, ctx: aiocoap.Context, endpoint: DtlsEndpoint, candidate: Candidate,
                      addr: PeerAddress, config: DtlsConfig) -> None:
        settings, serial = self.settings, self.identity.serial
        chain = await self._handshake(endpoint, candidate, addr, config)
        uri = f"coaps://{candidate.label}"
        now = now_utc()
        clock = now if settings.trusted_clock else None
        nonce = new_nonce(os.urandom)
        pvr = build_cose_pvr(self.identity, chain[0], nonce, now)
        answer = await self._request(ctx, aiocoap.POST, uri + RV, pvr,
                                     content_format=CF_VOUCHER_COSE, accept=CF_VOUCHER_COSE)
        if answer.code != aiocoap.CHANGED:
            raise self._refusal("rv", answer)
        try:
            if answer.opt.content_format != CF_VOUCHER_COSE:
                raise VoucherRejected("malformed", "voucher has Content-Format "
                                      f"{answer.opt.content_format}, expected 836")
            accepted = accept_voucher_cose(
                answer.payload, anchors=settings.anchors, masa_signers=settings.masa_signers,
                serial=serial, nonce=nonce, now=clock,
                accept_nonceless=settings.accept_nonceless)
            check_registrar_pinned(chain, accepted.pinned, clock)
        except VoucherRejected as exc:
            await self._status(ctx, uri + VS, StatusReport(False, exc.reason))
            raise Failed(f"voucher-{exc.code}", exc.reason, other_proxy=True) from exc
        self.result.events.append(f"voucher accepted: assertion {accepted.assertion}")
        await self._status(ctx, uri + VS, StatusReport(True))
        await self._est(ctx, uri, accepted, clock)

    async def _est(self, ctx: aiocoap.Context, uri: str, accepted: AcceptedVoucher,
                   clock: datetime | None) -> None:
        key = est.new_ldevid_key()
        csr = build_csr_der(self.identity.serial, key)
        answer = await self._request(ctx, aiocoap.POST, uri + SEN, csr,
                                     content_format=CF_PKCS10, accept=CF_PKIX_CERT)
        if answer.code != aiocoap.CHANGED:
            raise self._refusal("sen", answer)
        try:
            issued = decode_est_certs(answer.payload, answer.opt.content_format)
            done = enrolled_ldevid(issued, key, accepted.pinned, None, clock)
            crts: list[x509.Certificate] = [accepted.pinned]
            if done is None or self.settings.fetch_crts:
                # The pinned cert did not sign it (cBRSKI §6.7.1), or the domain's CA set is
                # wanted anyway: /crts, and the LDevID must chain to a root among them.
                extra = {"block2": (0, False, self.settings.block_szx)} \
                    if self.settings.block_szx is not None else {}
                got = await self._request(ctx, aiocoap.GET, uri + CRTS, b"",
                                          accept=CF_PKCS7_CERTS, **extra)
                if got.code != aiocoap.CONTENT:
                    raise self._refusal("crts", got)
                crts = decode_est_certs(got.payload, got.opt.content_format)
                done = enrolled_ldevid(issued, key, accepted.pinned, crts, clock)
                self.result.events.append("LDevID chained with /crts")
            else:
                self.result.events.append("LDevID signed by the pinned CA (§6.7.1: no /crts)")
        except EstError as exc:
            await self._status(ctx, uri + ES, StatusReport(False, str(exc)))
            raise Failed("ldevid", f"sen: {exc}", other_proxy=True) from exc
        assert done is not None
        ldevid, chain = done
        self._write(ldevid, chain, key, crts)
        await self._status(ctx, uri + ES, StatusReport(True))
        self.result.ok, self.result.code, self.result.reason = True, "", ""
        self.result.assertion = accepted.assertion
        self.result.ldevid_subject = ldevid.subject.rfc4514_string(
            {NameOID.SERIAL_NUMBER: "serialNumber"})

    # -- helpers ------------------------------------------------------------------------------
    async def _handshake(self, endpoint: DtlsEndpoint, candidate: Candidate,
                         addr: PeerAddress, config: DtlsConfig) -> list[x509.Certificate]:
        timeout = self.settings.connect_timeout
        self._doing = (f"{candidate.label}: no DTLS handshake answer (registrar or proxy "
                       "down?)")
        # Not cleared when the deadline cancels the handshake: the deadline's reason says it.
        try:
            peer = await endpoint.connect(addr, config, timeout)
        except TimeoutError as exc:
            self._doing = ""
            raise Failed("dtls", f"{candidate.label}: no DTLS handshake within {timeout:g} s "
                         "(registrar or proxy down?)") from exc
        except Exception as exc:  # an alert or a broken handshake: this peer refuses us
            self._doing = ""
            raise Failed("dtls-refused", f"{candidate.label} refused the DTLS session: "
                         f"{exc}", other_proxy=True) from exc
        self._doing = ""
        chain = peer.session.peer_certificates
        if not chain:
            raise Failed("dtls", f"{candidate.label}: the DTLS server showed no certificate",
                          other_proxy=True)
        return chain

    async def _request(self, ctx: aiocoap.Context, code: aiocoap.Code, uri: str,
                       payload: bytes, **options: object) -> aiocoap.Message:
        message = aiocoap.Message(code=code, uri=uri, payload=payload, **options)
        if self.settings.block_szx is not None:
            # aiocoap splits request bodies (Block1) by the remote's block size limit; the
            # remote is this DTLS session's, the same object for every request on it.
            await ctx.find_remote_and_interface(message)
            if message.remote.maximum_block_size_exp > self.settings.block_szx:
                message.remote.maximum_block_size_exp = self.settings.block_szx
        path = uri.split("/", 3)[-1]
        log.debug("%s: %s /%s", self.identity.serial, code, path)
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                return await ctx.request(message).response
        except TimeoutError as exc:
            raise Failed("timeout", f"/{path}: no answer within "
                         f"{self.settings.request_timeout:g} s") from exc
        except coap_error.Error as exc:
            raise Failed("coap", f"/{path}: {exc or type(exc).__name__}") from exc

    async def _status(self, ctx: aiocoap.Context, uri: str, report: StatusReport) -> None:
        """Telemetry is informative (RFC 8995 §5.7): a lost or refused report is noted only."""
        try:
            answer = await self._request(ctx, aiocoap.POST, uri, report.encode_cbor(),
                                         content_format=CF_CBOR)
        except Failed as exc:
            self.result.events.append(f"{uri.rsplit('/', 1)[-1]} not delivered: {exc.reason}")
            return
        if answer.code != aiocoap.CHANGED:
            self.result.events.append(f"{uri.rsplit('/', 1)[-1]} answered {answer.code}")

    def _refusal(self, what: str, answer: aiocoap.Message) -> Failed:
        code = answer.code
        text = answer.payload.decode("utf-8", "replace").strip()[:200]
        detail = f"/{what} answered {code.dotted} {code.name_printable}" + (
            f": {text}" if text else "")
        if code == aiocoap.SERVICE_UNAVAILABLE:
            max_age = answer.opt.max_age
            return Failed(f"coap-{code.dotted}", detail,
                          wait=float(max_age if max_age is not None else DEFAULT_MAX_AGE))
        return Failed(f"coap-{code.dotted}", detail, other_proxy=code.class_ == 4)

    def _write(self, ldevid: x509.Certificate, chain: list[x509.Certificate],
               key: ec.EllipticCurvePrivateKey, cacerts: list[x509.Certificate]) -> None:
        out = self.settings.out_dir
        out.mkdir(parents=True, exist_ok=True)
        stem = file_stem(self.identity.serial)
        cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # as the HTTPS runner: never world-readable
        with os.fdopen(fd, "wb") as f:
            f.write(est.key_pem(key))
        cert_path.write_bytes(est.pem([ldevid]))
        (out / f"{stem}-chain.pem").write_bytes(est.pem(chain[1:]))
        (out / "cacerts.pem").write_bytes(est.pem(cacerts))
        self.result.ldevid_path = str(cert_path)

    def _fail(self, code: str, reason: str) -> None:
        self.result.ok, self.result.code, self.result.reason = False, code, reason
