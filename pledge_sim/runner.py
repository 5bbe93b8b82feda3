"""The asyncio adapter for one pledge: connections, timers and files around PledgeSession.

No protocol decisions here. The loop: pick a proxy, connect with the trust the session asks
for, hand it each response, reconnect when the trust changes, sleep when told to, and on
failure back off (transient) or move to another proxy (this registrar will not do), until the
session is done or the deadline passes (RFC 8995 §4.1: retry with backoff, try every proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from . import est, tls
from .discovery import Candidate
from .http import ClosedBeforeResponse, Connection, HttpError, connect
from .identity import PledgeIdentity
from .pin_check import PinMismatch, check_server_chain
from .retry import Backoff
from .session import Done, Fail, PledgeSession, Request, Retry, Send, Trust, Wait

log = logging.getLogger(__name__)

# A TLS server that refuses the client certificate should say so with an alert, but some
# (asyncio's, for one) just close the connection. Hung up on right after the handshake this
# many times in a row, the pledge takes it as a refusal rather than an outage.
HANGUPS_MEAN_REFUSAL = 3


@dataclass(frozen=True)
class Settings:
    anchors: Sequence[x509.Certificate]  # MASA trust anchors
    out_dir: Path  # LDevIDs are written here as <serial>.crt / <serial>.key
    deadline: float = 120.0  # seconds per pledge, all attempts included
    connect_timeout: float = 10.0
    request_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_cap: float = 30.0  # RFC 8995 §4.1 allows up to an hour; a simulator wants less
    trusted_clock: bool = False
    accept_nonceless: bool = False
    # CoAPS only (pledge_sim.coaps_runner): MASA signing certificates installed beside the
    # anchors (COSE vouchers reach the pledge without x5bag), and a Block1/Block2 SZX limit.
    masa_signers: Sequence[x509.Certificate] = ()
    block_szx: int | None = None
    fetch_crts: bool = False  # GET /crts even when the §6.7.1 shortcut applies
    # RFC 8995 §5.1/§5.6.2: after the voucher, authenticate the provisional connection's kept
    # server chain against the pin and go on over it; False: a new pinned TLS connection.
    keep_connection: bool = True


@dataclass
class EnrollResult:
    serial: str
    ok: bool = False
    proxy: str = "-"
    method: str = "-"
    assertion: str = "-"
    ldevid_subject: str = "-"
    seconds: float = 0.0
    code: str = ""
    reason: str = ""
    attempts: int = 0
    waits: int = 0
    ldevid_path: str | None = None
    events: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def file_stem(serial: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", serial) or "_"


def now_utc() -> datetime:
    return datetime.now(UTC)


class _Stop(Exception):
    """End of one attempt with the session's verdict."""

    def __init__(self, outcome: Done | Fail) -> None:
        super().__init__(getattr(outcome, "reason", "done"))
        self.outcome = outcome


class PledgeRunner:
    def __init__(self, identity: PledgeIdentity, candidates: Sequence[Candidate],
                 settings: Settings, *, rng: Callable[[int], bytes] = os.urandom,
                 jitter: Callable[[], float] = random.random) -> None:
        self.identity = identity
        self.candidates = list(candidates)
        self.settings = settings
        self.session = PledgeSession(identity, settings.anchors, rng,
                                     trusted_clock=settings.trusted_clock,
                                     accept_nonceless=settings.accept_nonceless)
        self.backoff = Backoff(jitter, settings.backoff_initial, settings.backoff_cap)
        self.result = EnrollResult(identity.serial)
        self._conn: Connection | None = None
        self._conn_trust: Trust | None = None
        # The LDevID files in --out, written in a worker thread (started once, when the
        # LDevID is first presented or on success): the path of its certificate.
        self._ldevid_saved: asyncio.Future[Path] | None = None
        self._ldevid_pems: tuple[bytes, bytes] | None = None
        # One TLS context for all of this pledge's connections (see pledge_sim.tls): the pin
        # (DER) its trust store holds, if any, and whether it presents the LDevID (else the
        # IDevID).
        self._tls: ssl.SSLContext | None = None
        self._tls_pin: bytes | None = None
        self._tls_ldevid = False
        self._hangups: dict[Candidate, int] = {}

    # -- the whole enrollment -------------------------------------------------------------
    async def run(self) -> EnrollResult:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.deadline):
                enrolled = await self._attempts()
            if enrolled:  # outside the deadline: the enrollment itself is complete
                await self._succeed()
        except TimeoutError:
            self._fail("deadline", f"gave up after {self.settings.deadline:g} s; last: "
                       f"{self.result.reason or 'no answer'}")
        finally:
            await self._close()
            if self._ldevid_saved is not None:  # the files are complete when the run ends
                with contextlib.suppress(OSError):
                    await asyncio.shield(self._ldevid_saved)
            self.result.seconds = round(time.monotonic() - started, 3)
            self.result.waits = self.session.waits
            self.result.events = [*self.session.events, *self.result.events]
        return self.result

    async def _attempts(self) -> bool:
        """True when the session is done; False with the failure in the result."""
        refused: set[Candidate] = set()
        # Spread pledges over proxies: each starts at a place given by its serial.
        turn = zlib.crc32(self.identity.serial.encode())
        while True:
            usable = [c for c in self.candidates if c not in refused]
            if not usable:
                if not self.result.reason:
                    self._fail("no-proxy", "no proxy or registrar to try")
                return False
            candidate = usable[turn % len(usable)]
            self.result.attempts += 1
            self.result.proxy, self.result.method = candidate.label, candidate.method
            outcome = await self._attempt(candidate)
            if isinstance(outcome, Done):
                return True
            self.result.code, self.result.reason = outcome.code, outcome.reason
            self.result.events.append(f"attempt {self.result.attempts} via {candidate.label}: "
                                      f"{outcome.reason}")
            log.info("%s: %s", self.identity.serial, outcome.reason)
            if self.session.needs_voucher:
                turn += 1  # RFC 8995 §4.1: a new attempt goes to the next proxy, if any
            if outcome.retry is Retry.OTHER_PROXY:
                refused.add(candidate)
                self.session.reset()
                continue
            await asyncio.sleep(self.backoff.delay() if outcome.wait is None
                                else min(outcome.wait, self.settings.backoff_cap))

    async def _attempt(self, candidate: Candidate) -> Done | Fail:
        session = self.session
        try:
            if session.needs_voucher:
                conn = await self._connection(candidate, Trust.PROVISIONAL)
                request = session.start(conn.peer_cert_der, now_utc())
            else:
                request = session.resume()
            while True:
                outcome = await self._exchange(candidate, request)
                if isinstance(outcome, Send):
                    request = outcome.request
                elif isinstance(outcome, Wait):
                    await self._close()  # do not hold a connection while waiting
                    await asyncio.sleep(outcome.seconds)
                    request = outcome.request
                    if request.trust is Trust.PROVISIONAL:
                        conn = await self._connection(candidate, Trust.PROVISIONAL)
                        request = session.start(conn.peer_cert_der, now_utc())
                else:
                    if isinstance(outcome, Done):
                        self.backoff.reset()
                    return outcome
        except _Stop as stop:
            return stop.outcome
        except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError) as exc:
            # ssl.SSLError is an OSError: an alert from the server is a refusal, anything
            # else (EOF, reset, refused, timeout) is transient.
            await self._close()
            if isinstance(exc, socket.gaierror):
                return Fail("address", f"{candidate.label}: {exc.strerror}", Retry.OTHER_PROXY)
            if isinstance(exc, ssl.SSLError) and _is_alert(exc):
                return Fail("tls-refused", f"{candidate.label} refused the TLS session: "
                            f"{_ssl_reason(exc)}", Retry.OTHER_PROXY)
            if isinstance(exc, ClosedBeforeResponse) and exc.first:
                hangups = self._hangups[candidate] = self._hangups.get(candidate, 0) + 1
                if hangups >= HANGUPS_MEAN_REFUSAL and session.needs_voucher:
                    return Fail("tls-refused", f"{candidate.label} closed the connection right "
                                f"after the TLS handshake, {hangups} times: it does not accept "
                                "this pledge's IDevID", Retry.OTHER_PROXY)
            else:
                self._hangups.pop(candidate, None)
            return session.connection_lost(f"{candidate.label}: {_describe(exc)}")

    async def _exchange(self, candidate: Candidate, request: Request) -> Send | Wait | Done | Fail:
        try:
            conn = await self._connection(candidate, request.trust)
            log.debug("%s: %s %s (%s)", self.identity.serial, request.method, request.path,
                      request.trust.value)
            response = await conn.request(request.method, request.path, body=request.body,
                                          headers=dict(request.headers),
                                          timeout=self.settings.request_timeout)
        except ssl.SSLError as exc:
            if request.trust is not Trust.LDEVID or not _is_alert(exc):
                raise
            # With TLS 1.3 the server judges the client certificate after the handshake, so
            # a refused LDevID shows as an alert on the first read, not at connect.
            await self._close()
            return await self._exchange(candidate, self.session.ldevid_refused(_ssl_reason(exc)))
        self._hangups.pop(candidate, None)
        if response.status < 500:
            self.backoff.reset()  # the registrar is answering: progress
        return self.session.receive(response, now_utc())

    # -- connections ----------------------------------------------------------------------
    async def _connection(self, candidate: Candidate, trust: Trust) -> Connection:
        if self._conn is not None and self._conn.reusable:
            if self._conn_trust is trust:
                return self._conn
            if (trust is Trust.PINNED and self._conn_trust is Trust.PROVISIONAL
                    and self.settings.keep_connection and await self._authenticate_kept(
                        candidate, self._conn)):
                self._conn_trust = trust
                return self._conn
        await self._close()
        try:
            conn = await connect(candidate.host, candidate.port, self._context(trust),
                                 timeout=self.settings.connect_timeout)
        except ssl.SSLCertVerificationError as exc:
            if trust is Trust.PROVISIONAL:
                raise
            await self._pin_failed(candidate, exc.verify_message or str(exc), exc)
        self._conn, self._conn_trust = conn, trust
        return conn

    async def _authenticate_kept(self, candidate: Candidate, conn: Connection) -> bool:
        """§5.6.2 on the kept provisional connection: True if the chain its server sent leads
        to the pinned-domain-cert; False if the chain cannot be read (then a new pinned
        connection decides). A chain that does not lead there ends the attempt."""
        chain = conn.server_chain_der
        if chain is None:
            return False
        accepted = self.session.accepted
        assert accepted is not None
        try:
            check_server_chain(conn.peer_cert_der, chain, accepted.pinned,
                               now_utc() if self.settings.trusted_clock else None)
        except PinMismatch as exc:
            await self._close()  # §5.6.2: the connection is discarded
            await self._pin_failed(candidate, str(exc), exc)
        self.result.events.append("provisional connection authenticated against the "
                                  "pinned-domain-cert and kept")
        return True

    async def _pin_failed(self, candidate: Candidate, detail: str, cause: Exception) -> NoReturn:
        """§5.6.2: the registrar's chain does not lead to the pinned-domain-cert. Report it
        over a new provisional connection, then stop this attempt (another proxy next)."""
        outcome = self.session.pin_failed(detail)
        assert isinstance(outcome, Send)
        verdict = await self._exchange(candidate, outcome.request)
        assert isinstance(verdict, Done | Fail)
        raise _Stop(verdict) from cause

    def _context(self, trust: Trust) -> ssl.SSLContext:
        if trust is Trust.PROVISIONAL:
            return tls.make_provisional(self._presenting(ldevid=False))
        accepted = self.session.accepted
        assert accepted is not None
        # The trust store must hold this pin and nothing else, so a context pinned to another
        # certificate (an earlier voucher) is not reused.
        pin = accepted.pinned.public_bytes(serialization.Encoding.DER)
        if self._tls_pin not in (None, pin):
            self._tls = None
        context = self._presenting(ldevid=trust is Trust.LDEVID)
        if self._tls_pin is None:
            tls.make_pinned(context, accepted.pinned, trusted_clock=self.settings.trusted_clock)
            self._tls_pin = pin
        else:  # pinned to this certificate already; only the verification mode comes back
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _presenting(self, *, ldevid: bool) -> ssl.SSLContext:
        """The pledge's context, presenting its LDevID or its IDevID. Switching loads the
        other into the same context where it replaces the one there (``tls.same_slot``),
        else into a new one."""
        ident, session = self.identity, self.session
        if self._tls is not None and self._tls_ldevid != ldevid:
            assert session.ldevid_key is not None
            if not tls.same_slot(ident.key, session.ldevid_key):
                self._tls = None
            elif ldevid:
                self._load_ldevid(self._tls)
            else:
                self._tls.load_cert_chain(ident.cert_path, ident.key_path)
            self._tls_ldevid = ldevid
        if self._tls is None:
            if ldevid:
                self._tls = tls.fresh_context()
                self._load_ldevid(self._tls)
            else:
                self._tls = tls.idevid_context(ident.cert_path, ident.key_path)
            self._tls_pin, self._tls_ldevid = None, ldevid
        return self._tls

    def _load_ldevid(self, context: ssl.SSLContext) -> None:
        self._save_ldevid()  # the files, as soon as the LDevID is in use
        tls.load_credential(context, *self._ldevid_pem())

    def _ldevid_pem(self) -> tuple[bytes, bytes]:
        """The LDevID's certificate and key, PEM (the TLS context and the files use both)."""
        session = self.session
        assert session.ldevid is not None and session.ldevid_key is not None
        if self._ldevid_pems is None:
            self._ldevid_pems = (est.pem([session.ldevid]), est.key_pem(session.ldevid_key))
        return self._ldevid_pems

    async def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn, self._conn_trust = self._conn, None, None
            await conn.close()

    # -- results --------------------------------------------------------------------------
    def _save_ldevid(self) -> asyncio.Future[Path]:
        """Write the LDevID files into --out, once, in a worker thread: creating a file can
        block for a millisecond on a busy disk, and this event loop serves every pledge."""
        if self._ldevid_saved is None:
            session = self.session
            cert, key = self._ldevid_pem()
            self._ldevid_saved = asyncio.ensure_future(asyncio.to_thread(
                _write_ldevid, self.settings.out_dir, file_stem(self.identity.serial), key, cert,
                est.pem(session.ldevid_chain[1:]), est.pem(session.cacerts)))
        return self._ldevid_saved

    async def _succeed(self) -> None:
        session, result = self.session, self.result
        assert session.accepted is not None and session.ldevid is not None
        try:
            result.ldevid_path = str(await self._save_ldevid())
        except OSError as exc:
            self._fail("ldevid-files", f"cannot write the LDevID into {self.settings.out_dir}: "
                       f"{exc.strerror or exc}")
            return
        result.ok, result.code, result.reason = True, "", ""
        result.assertion = session.accepted.assertion
        result.ldevid_subject = session.ldevid.subject.rfc4514_string(
            {NameOID.SERIAL_NUMBER: "serialNumber"})

    def _fail(self, code: str, reason: str) -> None:
        self.result.ok, self.result.code, self.result.reason = False, code, reason


def _write_ldevid(out: Path, stem: str, key: bytes, cert: bytes, chain: bytes,
                  cacerts: bytes) -> Path:
    """<stem>.key (mode 0600), <stem>.crt, <stem>-chain.pem and the shared cacerts.pem in
    ``out``; the certificate's path. Runs in a worker thread."""
    out.mkdir(parents=True, exist_ok=True)
    # The mode is set on the descriptor: no moment where the key is world-readable, whatever
    # an earlier run left at that path.
    fd = os.open(out / f"{stem}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    cert_path = out / f"{stem}.crt"
    cert_path.write_bytes(cert)
    (out / f"{stem}-chain.pem").write_bytes(chain)
    _write_shared(out / "cacerts.pem", cacerts)
    return cert_path


# What this process last wrote to each shared file: every pledge of a fleet gets the same
# CA certificates, written once rather than once per pledge. Pledges write from worker
# threads, hence the lock.
_shared_files: dict[Path, bytes] = {}
_shared_lock = threading.Lock()


def _write_shared(path: Path, content: bytes) -> None:
    with _shared_lock:
        if _shared_files.get(path) == content and path.exists():
            return
        path.write_bytes(content)
        _shared_files[path] = content


def _is_alert(exc: ssl.SSLError) -> bool:
    # OpenSSL names the alerts a peer sent "...ALERT_<NAME>" (tlsv13 alert certificate
    # required, sslv3 alert bad certificate, tlsv1 alert unknown ca, ...).
    return "ALERT" in (exc.reason or "").upper()


def _ssl_reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).replace("_", " ").lower()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed mid-response"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno:
        return os.strerror(exc.errno).lower()  # "connection refused", not asyncio's wording
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:199] + "…"


async def enroll(identity: PledgeIdentity, candidates: Sequence[Candidate],
                 settings: Settings) -> EnrollResult:
    return await PledgeRunner(identity, candidates, settings).run()
