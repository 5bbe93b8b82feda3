"""Certificate DTLS 1.2 sessions, sans-IO: datagrams in, datagrams out, timers as values.

cBRSKI (draft-ietf-anima-constrained-voucher §6.1–6.3) and EST-coaps (RFC 9148 §4) run CoAP over
DTLS with X.509 certificates on both sides: the pledge's IDevID is the client certificate. This
module drives OpenSSL (through pyOpenSSL) over memory BIOs, so no socket is involved: the caller
hands in each received datagram with the peer it came from and sends what comes out.

* :class:`DtlsServer` answers ClientHellos. A ClientHello without a valid cookie gets a
  HelloVerifyRequest and leaves no state behind (RFC 6347 §4.2.1): the cookie is an HMAC over the
  peer identifier under a secret that rotates (:class:`CookieSecrets`), checked inside OpenSSL's
  cookie callback during ``DTLSv1_listen``. Only a ClientHello that echoes a good cookie becomes a
  :class:`DtlsSession`.
* :class:`DtlsSession` is one handshake and its records, client or server side.
* A refused client is named: a server session keeps what the verify callback saw
  (:class:`HandshakeState`: the X509 error, the leaf) and the leaf from the client's
  Certificate message (``sent_certificate``), since OpenSSL keeps no peer certificate after a
  failed verification.

Two OpenSSL facts shape this (README "Certificate DTLS"): the mandatory suite
``TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8`` sits below security level 1 (its 64-bit tag), so the cipher
string ends in ``@SECLEVEL=0`` (the cipher list itself keeps everything else out); and pyOpenSSL's
memory BIO does not keep datagram boundaries, so the bytes of a flight are split back into
records here and packed into datagrams of at most ``mtu`` bytes.

OpenSSL keeps its own retransmission clock; :meth:`DtlsSession.next_timer` reports it as a
deadline on the caller's clock and :meth:`DtlsSession.handle_timer` lets OpenSSL act on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from .errors import DecodeError, ProtocolError, SignatureError, UsageError
from .tls_certificate import CERTIFICATE, leaf_certificate

# RFC 9148 §4 mandatory suite first, then the ECDHE-ECDSA AEAD suites RFC 9148 and cBRSKI name.
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384"
    ":ECDHE-ECDSA-AES128-CCM"
)
# cBRSKI §6.3: assume a path MTU of 1024 for the handshake so a JPY-wrapped flight fits 1280.
DEFAULT_MTU = 1024
MIN_MTU = 256
DTLS1_2_VERSION = 0xFEFD
DTLS1_3_VERSION = 0xFEFC
RECORD_HEADER = 13  # type, version, epoch, sequence number, length (RFC 6347 §4.1)
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_HEADER = 12  # type, length, message_seq, fragment_offset, fragment_length
MAX_CERTIFICATE_MESSAGE = 1 << 16  # what a refused client may make us buffer, at most
COOKIE_SIZE = 16
MAX_DATAGRAM = 65535
_DRAIN = 1 << 17


class DtlsError(ProtocolError):
    """The peer's DTLS cannot go on: a failed handshake, a fatal alert, unusable records."""


class CertificateRefused(DtlsError, SignatureError):
    """The peer's certificate does not chain to a configured anchor (an alert was sent)."""


@dataclass(frozen=True)
class DtlsConfig:
    """What one side brings to a handshake.

    ``anchors`` are the CAs the *peer's* certificate must chain to (for a registrar: the
    manufacturers it accepts IDevIDs from; for a pledge: its pinned domain CA or registrar).
    ``chain`` are intermediates sent after ``certificate``.

    ``provisional`` (client only): accept whatever certificate the server shows, with no
    anchors, as a pledge must before it has a voucher (RFC 8995 §5.1, cBRSKI §6.3). The caller
    names that certificate in its voucher-request and checks it against the voucher's pin.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    anchors: Sequence[x509.Certificate]
    chain: Sequence[x509.Certificate] = ()
    ciphers: str = DEFAULT_CIPHERS
    mtu: int = DEFAULT_MTU
    provisional: bool = False
    # A debugging aid, off unless set: gets each session's secrets as NSS key log lines
    # (SSLKEYLOGFILE format) so a capture of the link can be decrypted, e.g. by tshark.
    keylog: Callable[[bytes], None] | None = None

    def __post_init__(self) -> None:
        if not self.anchors and not self.provisional:
            raise UsageError("DTLS config: anchors must name at least one CA to verify the peer")
        if not MIN_MTU <= self.mtu <= MAX_DATAGRAM:
            raise UsageError(f"DTLS config: mtu {self.mtu} outside {MIN_MTU}..{MAX_DATAGRAM}")


def dtls13_available() -> bool:
    """Whether the OpenSSL under pyOpenSSL accepts DTLS 1.3 as a protocol version."""
    ctx = SSL.Context(SSL.DTLS_METHOD)
    try:
        ctx.set_max_proto_version(DTLS1_3_VERSION)
    except SSL.Error:
        return False
    return True


def _context(method: int, config: DtlsConfig) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    # @SECLEVEL=0 only admits CCM_8's short tag; the suite list keeps out everything else.
    try:
        ctx.set_cipher_list((config.ciphers + ":@SECLEVEL=0").encode())
    except SSL.Error as exc:
        raise UsageError(f"DTLS config: ciphers {config.ciphers!r}: {exc}") from exc
    ctx.use_certificate(config.certificate)
    for extra in config.chain:
        ctx.add_extra_chain_cert(extra)
    try:
        ctx.use_privatekey(config.key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise UsageError("DTLS config: the key does not match the certificate") from exc
    store = ctx.get_cert_store()
    assert store is not None
    for anchor in config.anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    if config.provisional:
        if method != SSL.DTLS_CLIENT_METHOD:
            raise UsageError("DTLS config: only a client can be provisional")
        # The server still sends its certificate; nothing is verified until the voucher pins it.
        ctx.set_verify(SSL.VERIFY_NONE)
    else:
        # Both sides must show a certificate; OpenSSL's own chain check decides (no callback).
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    # The MTU is ours to set: memory BIOs cannot be asked for a path MTU.
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    if config.keylog is not None:
        keylog = config.keylog
        ctx.set_keylog_callback(lambda conn, line: keylog(line))
    return ctx


def split_records(data: bytes) -> list[bytes]:
    """DTLS 1.2 records in ``data``, in order; raises DecodeError on a truncated record."""
    records = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < RECORD_HEADER:
            raise DecodeError("DTLS: truncated record header")
        (length,) = struct.unpack_from("!H", data, offset + 11)
        end = offset + RECORD_HEADER + length
        if end > len(data):
            raise DecodeError("DTLS: record longer than its datagram")
        records.append(data[offset:end])
        offset = end
    return records


def pack_datagrams(records: Sequence[bytes], mtu: int) -> list[bytes]:
    """Whole records packed greedily into datagrams of at most ``mtu`` bytes."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def is_client_hello(datagram: bytes) -> bool:
    """Whether the first record of ``datagram`` is an epoch-0 handshake ClientHello."""
    return (
        len(datagram) > RECORD_HEADER
        and datagram[0] == CONTENT_HANDSHAKE
        and datagram[1] == 0xFE
        and datagram[3:5] == b"\0\0"
        and datagram[RECORD_HEADER] == HANDSHAKE_CLIENT_HELLO
    )


def _alert_sent(datagrams: Sequence[bytes]) -> bool:
    return any(d[:1] == bytes([CONTENT_ALERT]) for d in datagrams)


def _reason(exc: SSL.Error) -> str:
    parts = [str(e[2]) for e in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])]
    return ", ".join(p for p in parts if p) or exc.__class__.__name__


class DtlsSession:
    """One DTLS 1.2 association over memory BIOs.

    Feed it datagrams with :meth:`receive` (returns application data), queue data with
    :meth:`send`, and send every datagram :meth:`datagrams_to_send` returns. After
    :meth:`receive` or :meth:`handle_timer` raises :class:`DtlsError` the session is dead; any
    alert it produced is still waiting in :meth:`datagrams_to_send`.
    """

    def __init__(self, conn: SSL.Connection, mtu: int, *, server: bool) -> None:
        self._conn = conn
        self._mtu = mtu
        self.server = server
        self._out: list[bytes] = []
        self.handshake_complete = False
        self.closed = False
        self.error: str | None = None
        self.provisional = False  # a provisional client verified nothing (DtlsConfig)
        # A server reassembles the client's Certificate message as it passes, to name a client
        # it refuses: OpenSSL's verify callback may never see the leaf (a chain that fails
        # at depth 1 stops there).
        self._certificate_fragments: dict[int, bytes] = {}
        self._certificate_length: int | None = None
        self.sent_certificate: x509.Certificate | None = None
        conn.set_ciphertext_mtu(mtu)

    @classmethod
    def client(cls, config: DtlsConfig) -> DtlsSession:
        """A client session; its first flight (the ClientHello) is ready to send at once.

        No SNI is sent: cBRSKI §6.3 says a pledge SHOULD omit it.
        """
        conn = SSL.Connection(_context(SSL.DTLS_CLIENT_METHOD, config))
        conn.set_connect_state()
        session = cls(conn, config.mtu, server=False)
        session.provisional = config.provisional
        session._advance()
        return session

    # -- driving -----------------------------------------------------------------------------

    def _collect(self) -> None:
        data = b""
        while True:
            try:
                chunk = self._conn.bio_read(_DRAIN)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            data += chunk
        if not data:
            return
        try:
            records = split_records(data)
        except DecodeError:  # our own OpenSSL's output: cannot happen, but never drop it
            records = [data]
        self._out.extend(pack_datagrams(records, self._mtu))

    def _fail(self, exc: SSL.Error) -> DtlsError:
        self._collect()
        self.closed = True
        self.error = _reason(exc)
        if "certificate verify failed" in self.error or "peer did not return" in self.error:
            return CertificateRefused(f"DTLS: peer certificate refused: {self.error}")
        return DtlsError(f"DTLS: {self.error}")

    def _advance(self) -> list[bytes]:
        """Run the handshake or read records; returns application data received."""
        received: list[bytes] = []
        try:
            if not self.handshake_complete:
                try:
                    self._conn.do_handshake()
                except SSL.WantReadError:
                    return received
                self.handshake_complete = True
            while True:
                try:
                    received.append(self._conn.recv(MAX_DATAGRAM))
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:  # close_notify from the peer
                    self.closed = True
                    break
        except SSL.Error as exc:
            raise self._fail(exc) from None
        finally:
            self._collect()
        return received

    def receive(self, datagram: bytes) -> list[bytes]:
        """Process one datagram from the peer; returns the application records it carried."""
        if self.closed:
            raise DtlsError("DTLS: session is closed")
        if not datagram or len(datagram) > MAX_DATAGRAM:
            raise DecodeError(f"DTLS: datagram of {len(datagram)} bytes")
        if self.server and not self.handshake_complete and self.sent_certificate is None:
            self._note_certificate(datagram)
        self._conn.bio_write(datagram)
        return self._advance()

    def _note_certificate(self, datagram: bytes) -> None:
        """Collect the fragments of an epoch-0 Certificate handshake message (RFC 6347
        §4.2.2); once it is whole, keep its first certificate in ``sent_certificate``. Best
        effort: whatever does not frame is left to OpenSSL to refuse."""
        try:
            records = split_records(datagram)
        except DecodeError:
            return
        for record in records:
            if record[0] != CONTENT_HANDSHAKE or record[3:5] != b"\0\0":
                continue  # encrypted (epoch ≥ 1) or not a handshake record
            body = record[RECORD_HEADER:]
            while len(body) >= HANDSHAKE_HEADER:
                kind = body[0]
                length = int.from_bytes(body[1:4], "big")
                offset = int.from_bytes(body[6:9], "big")
                size = int.from_bytes(body[9:12], "big")
                fragment = body[HANDSHAKE_HEADER:HANDSHAKE_HEADER + size]
                body = body[HANDSHAKE_HEADER + size:]
                if kind == CERTIFICATE and len(fragment) == size:
                    self._certificate_fragment(length, offset, fragment)

    def _certificate_fragment(self, length: int, offset: int, fragment: bytes) -> None:
        if length > MAX_CERTIFICATE_MESSAGE or offset + len(fragment) > length:
            return
        if self._certificate_length != length:  # first fragment, or a different message
            self._certificate_fragments, self._certificate_length = {}, length
        self._certificate_fragments[offset] = fragment
        if sum(len(p) for p in self._certificate_fragments.values()) > 2 * length:
            self._certificate_fragments = {}  # overlapping junk: not worth memory
            return
        whole = bytearray(length)
        covered = bytearray(length)
        for at, piece in self._certificate_fragments.items():
            whole[at:at + len(piece)] = piece
            covered[at:at + len(piece)] = b"\1" * len(piece)
        if b"\0" in covered:
            return
        self._certificate_fragments = {}
        try:
            der = leaf_certificate(bytes([CERTIFICATE]) + length.to_bytes(3, "big")
                                   + bytes(whole), tls13=False)
            self.sent_certificate = (x509.load_der_x509_certificate(der)
                                     if der is not None else None)
        except (DecodeError, ValueError):
            return

    def send(self, data: bytes) -> None:
        """Queue one application record (one CoAP message); the handshake must be done."""
        if not self.handshake_complete or self.closed:
            raise UsageError("DTLS: send before the handshake completed or after close")
        if len(data) > self._conn.get_cleartext_mtu():
            raise UsageError(
                f"DTLS: {len(data)} bytes exceed the cleartext MTU {self._conn.get_cleartext_mtu()}"
            )
        try:
            self._conn.send(data)
        except SSL.Error as exc:
            raise self._fail(exc) from None
        self._collect()

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_timer(self, now: float) -> float | None:
        """When (on the caller's clock) :meth:`handle_timer` is due, or None: no timer runs."""
        if self.closed or self.handshake_complete:
            return None
        remaining = self._conn.DTLSv1_get_timeout()
        return None if remaining is None else now + remaining

    def handle_timer(self) -> None:
        """Retransmit the last flight if OpenSSL's timer expired (its retries are bounded)."""
        if self.closed or self.handshake_complete:
            return
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            raise self._fail(exc) from None
        self._collect()

    def close(self) -> None:
        """Send close_notify (if the handshake finished) and stop."""
        if self.closed:
            return
        self.closed = True
        if self.handshake_complete:
            with contextlib.suppress(SSL.Error):  # a dying peer cannot be helped
                self._conn.shutdown()
            self._collect()

    # -- what the handshake established --------------------------------------------------------

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        cert = self._conn.get_peer_certificate(as_cryptography=True)
        return cert if self.handshake_complete else None

    @property
    def peer_chain(self) -> list[x509.Certificate]:
        """The peer's verified chain, leaf first, anchor last (empty before the handshake, and
        for a provisional client, whose OpenSSL builds a chain it did not insist on)."""
        if not self.handshake_complete or self.provisional:
            return []
        return list(self._conn.get_verified_chain(as_cryptography=True) or [])

    @property
    def peer_certificates(self) -> list[x509.Certificate]:
        """The peer's certificates as it sent them, leaf first, verified or not (what a
        provisional pledge names and later checks against its voucher's pin)."""
        if not self.handshake_complete:
            return []
        return list(self._conn.get_peer_cert_chain(as_cryptography=True) or [])

    @property
    def verification(self) -> HandshakeState | None:
        """A server session's notes on the client certificate (set even when refused)."""
        state = self._conn.get_app_data()
        return state if isinstance(state, HandshakeState) else None

    @property
    def cipher(self) -> str | None:
        return self._conn.get_cipher_name()

    @property
    def version(self) -> str:
        return self._conn.get_protocol_version_name()

    @property
    def cleartext_mtu(self) -> int:
        return self._conn.get_cleartext_mtu()


class CookieSecrets:
    """HMAC keys for HelloVerifyRequest cookies, rotated by the caller's clock.

    A cookie is HMAC-SHA256(secret, peer)[:16]. The current and the previous secret both verify,
    so a cookie stays good for between one and two ``lifetime`` periods.
    """

    def __init__(self, lifetime: float = 60.0, rng: Callable[[int], bytes] = os.urandom) -> None:
        if lifetime <= 0:
            raise UsageError("cookie lifetime must be positive")
        self._lifetime = lifetime
        self._rng = rng
        self._current = rng(32)
        self._previous: bytes | None = None
        self._rotated_at: float | None = None

    def rotate_if_due(self, now: float) -> None:
        if self._rotated_at is None:
            self._rotated_at = now
        elif now - self._rotated_at >= self._lifetime:
            self._previous, self._current = self._current, self._rng(32)
            self._rotated_at = now

    def make(self, peer: bytes) -> bytes:
        return hmac.new(self._current, peer, hashlib.sha256).digest()[:COOKIE_SIZE]

    def check(self, peer: bytes, cookie: bytes) -> bool:
        for secret in (self._current, self._previous):
            if secret is not None and hmac.compare_digest(
                hmac.new(secret, peer, hashlib.sha256).digest()[:COOKIE_SIZE], cookie
            ):
                return True
        return False


@dataclass
class HandshakeState:
    """What a server connection's app data holds: the peer bytes its cookie binds to, and what
    certificate verification saw (OpenSSL keeps no peer certificate after a failed check, so
    the verify callback is the only place a refused certificate can be seen)."""

    peer: bytes
    verify_error: int | None = None  # X509_V_ERR_* of the first failure
    failed_depth: int | None = None
    failed_certificate: x509.Certificate | None = None
    leaf: x509.Certificate | None = None  # depth 0, when OpenSSL got that far


@dataclass
class Accepted:
    """What :meth:`DtlsServer.accept` made of a datagram from an unknown peer.

    ``session`` is set only when the ClientHello carried a good cookie; ``replies`` go back to the
    peer (a HelloVerifyRequest, or the server's first flight); ``drop`` names why nothing was
    kept: ``no-cookie`` (answered with a HelloVerifyRequest), ``garbage`` or ``handshake-failed``.
    """

    session: DtlsSession | None
    replies: list[bytes] = field(default_factory=list)
    drop: str | None = None
    detail: str = ""
    failed: DtlsSession | None = None  # the session whose first flight failed (for its refusal)


class DtlsServer:
    """Turns ClientHellos from unknown peers into sessions, statelessly until the cookie round.

    ``peer`` is any bytes that name the return address (the transport's choice: host, port and
    scope; later the JPY header too); it is what the cookie binds to.
    """

    def __init__(self, config: DtlsConfig, cookies: CookieSecrets | None = None) -> None:
        self._config = config
        self.cookies = cookies or CookieSecrets()
        self._ctx = _context(SSL.DTLS_SERVER_METHOD, config)
        self._ctx.set_cookie_generate_callback(self._make_cookie)
        self._ctx.set_cookie_verify_callback(self._check_cookie)
        # OpenSSL still decides (the callback returns its verdict); it only takes notes.
        self._ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _note_verify)

    def _make_cookie(self, conn: SSL.Connection) -> bytes:
        return self.cookies.make(conn.get_app_data().peer)

    def _check_cookie(self, conn: SSL.Connection, cookie: bytes) -> bool:
        return self.cookies.check(conn.get_app_data().peer, cookie)

    def accept(self, peer: bytes, datagram: bytes, now: float) -> Accepted:
        """Handle one datagram from a peer that has no session. Never raises on peer input."""
        self.cookies.rotate_if_due(now)
        if not is_client_hello(datagram) or len(datagram) > MAX_DATAGRAM:
            return Accepted(None, drop="garbage", detail="not a ClientHello")
        conn = SSL.Connection(self._ctx)
        conn.set_app_data(HandshakeState(peer))
        conn.set_accept_state()
        conn.set_ciphertext_mtu(self._config.mtu)
        conn.bio_write(datagram)
        try:
            conn.DTLSv1_listen()
        except SSL.WantReadError:
            hello_verify = _drain(conn)
            if not hello_verify:  # OpenSSL found it unusable and answered nothing
                return Accepted(None, drop="garbage", detail="malformed ClientHello")
            return Accepted(None, [hello_verify], drop="no-cookie")
        except SSL.Error as exc:
            return Accepted(None, drop="garbage", detail=_reason(exc))
        session = DtlsSession(conn, self._config.mtu, server=True)
        try:
            session._advance()
        except DtlsError as exc:
            return Accepted(None, session.datagrams_to_send(), "handshake-failed", str(exc),
                            failed=session)
        return Accepted(session, session.datagrams_to_send())


def _note_verify(conn: SSL.Connection, cert: crypto.X509, error: int, depth: int,
                 ok: int) -> bool:
    state = conn.get_app_data()
    if isinstance(state, HandshakeState):
        if depth == 0:
            state.leaf = cert.to_cryptography()
        if not ok and state.verify_error is None:
            state.verify_error, state.failed_depth = error, depth
            state.failed_certificate = cert.to_cryptography()
    return bool(ok)


def _drain(conn: SSL.Connection) -> bytes:
    try:
        return conn.bio_read(_DRAIN)
    except SSL.WantReadError:
        return b""


# -- a cheap liveness probe (join proxy towards a constrained registrar) ------------------------

HANDSHAKE_SERVER_HELLO = 2
HANDSHAKE_HELLO_VERIFY_REQUEST = 3
_PROBE_ANSWERS = {HANDSHAKE_SERVER_HELLO: "ServerHello",
                  HANDSHAKE_HELLO_VERIFY_REQUEST: "HelloVerifyRequest"}


def probe_client_hello(ciphers: str = DEFAULT_CIPHERS) -> bytes:
    """One DTLS 1.2 ClientHello datagram, as a pledge's first flight would start, from a
    throw-away context with no certificate: a server answers it with a HelloVerifyRequest
    (RFC 6347 §4.2.1) and keeps no state, so it probes a registrar's DTLS port cheaply."""
    ctx = SSL.Context(SSL.DTLS_CLIENT_METHOD)
    ctx.set_min_proto_version(DTLS1_2_VERSION)
    ctx.set_max_proto_version(DTLS1_2_VERSION)
    ctx.set_cipher_list((ciphers + ":@SECLEVEL=0").encode())
    ctx.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    conn = SSL.Connection(ctx)
    conn.set_ciphertext_mtu(DEFAULT_MTU)  # memory BIOs cannot be asked for one
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    hello = _drain(conn)
    if not is_client_hello(hello):  # our own OpenSSL's output: cannot happen
        raise DtlsError("DTLS: OpenSSL wrote no ClientHello")
    return hello


def probe_answer(datagram: bytes) -> str | None:
    """What a datagram answering :func:`probe_client_hello` is: ``"HelloVerifyRequest"`` or
    ``"ServerHello"`` when its first record is an epoch-0 DTLS handshake record holding one,
    else None (anything else, truncated or not DTLS at all)."""
    if len(datagram) < RECORD_HEADER + 1 or datagram[0] != CONTENT_HANDSHAKE:
        return None
    version = struct.unpack_from("!H", datagram, 1)[0]
    if version not in (DTLS1_2_VERSION, 0xFEFF) or datagram[3:5] != b"\0\0":
        return None
    (length,) = struct.unpack_from("!H", datagram, 11)
    if length < 12 or RECORD_HEADER + length > len(datagram):  # 12: the handshake header
        return None
    return _PROBE_ANSWERS.get(datagram[RECORD_HEADER])
