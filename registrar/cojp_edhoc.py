"""EDHOC for the CoJP JRC: the alternative to a PSK (RFC 9528, forward flow of App. A.2).

The pledge POSTs message_1 and message_3 to ``/.well-known/edhoc`` (unprotected CoAP, through
a join proxy like any join traffic); lakers-python (method 3, cipher suite 2) runs the
handshake, with the JRC's static DH key and CCS from ``[cojp] edhoc_private_key`` /
``edhoc_credential``. The pledge is authenticated by the credential the operator stored with
``brski-registrar cojp add-pledge --edhoc-credential``, found by the kid of its ID_CRED_I. The
OSCORE context then comes from the exporter (registrar side: Sender ID C_I, Recipient ID
C_R) and protects the pledge's Join Request, which the JRC answers as for a PSK.

Bounded state: at most MAX_PENDING handshakes between message_1 and message_3 (each expires
after PENDING_TIMEOUT seconds) and MAX_SESSIONS derived contexts (least recently used go).
A restart forgets all of them; the pledge runs EDHOC again, with new keys.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import aiocoap
import lakers
from aiocoap.numbers.codes import Code

from brski import edhoc_oscore
from brski.errors import ProtocolError
from coaps_io.oscore_ephemeral import EphemeralOscoreContext

from .cojp_store import CojpStore

WELL_KNOWN_EDHOC = (".well-known", "edhoc")
MAX_PENDING = 256
PENDING_TIMEOUT = 60.0
MAX_SESSIONS = 4096
C_R_LENGTH = 2  # byte-string connection identifiers: room for MAX_SESSIONS without reuse


@dataclass
class EdhocSession:
    """A derived OSCORE context, the pledge it authenticated, and its cached last answer."""

    context: EphemeralOscoreContext
    pledge_id: bytes
    last_piv: bytes | None = None
    last_request_sha256: bytes | None = None
    last_response: bytes | None = None
    joined: bool = field(default=False)


class EdhocRefused(Exception):
    """A handshake step refused: ``reason`` is the counter label, the text for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class EdhocResponderService:
    def __init__(self, private_key: bytes, credential: bytes, pledges: CojpStore, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._private_key = private_key
        self._credential = lakers.Credential(credential)
        self.pledges = pledges
        self._clock = clock
        self._pending: OrderedDict[bytes, tuple[lakers.EdhocResponder, bytes, float]] = \
            OrderedDict()
        self.sessions: OrderedDict[bytes, EdhocSession] = OrderedDict()

    def session(self, recipient_id: bytes) -> EdhocSession | None:
        found = self.sessions.get(recipient_id)
        if found is not None:
            self.sessions.move_to_end(recipient_id)
        return found

    def handle(self, request: aiocoap.Message) -> aiocoap.Message:
        """The answer to a POST /.well-known/edhoc; EdhocRefused for a refusal, whose error
        message the caller sends (``error_response``)."""
        if request.code != Code.POST:
            raise EdhocRefused("method-not-allowed", f"EDHOC with {request.code}")
        payload = request.payload
        if payload.startswith(edhoc_oscore.MESSAGE_1_PREFIX):
            return self._message_1(payload)
        return self._message_3(payload)

    def _message_1(self, payload: bytes) -> aiocoap.Message:
        self._expire()
        try:
            message_1 = edhoc_oscore.split_message_1(payload)
        except ProtocolError as exc:
            raise EdhocRefused("edhoc-malformed", str(exc)) from None
        responder = lakers.EdhocResponder(self._private_key, self._credential)
        try:
            c_i, _ead_1 = responder.process_message_1(message_1)
            c_r = self._new_c_r(c_i)
            message_2 = responder.prepare_message_2(lakers.CredentialTransfer.ByReference,
                                                    c_r=c_r)
        except (ValueError, RuntimeError) as exc:
            raise EdhocRefused("edhoc-failed", f"message_1: {exc}") from None
        if len(self._pending) >= MAX_PENDING:
            self._pending.popitem(last=False)  # the oldest unfinished handshake goes
        self._pending[c_r] = (responder, c_i, self._clock())
        return aiocoap.Message(code=Code.CHANGED, payload=message_2)

    def _message_3(self, payload: bytes) -> aiocoap.Message:
        self._expire()
        try:
            c_r, message_3 = edhoc_oscore.split_message_3(payload)
        except ProtocolError as exc:
            raise EdhocRefused("edhoc-malformed", str(exc)) from None
        pending = self._pending.pop(c_r, None)
        if pending is None:
            raise EdhocRefused("edhoc-unknown-session", f"no handshake with C_R {c_r.hex()}")
        responder, c_i, _ = pending
        try:
            id_cred_i, _ead_3 = responder.parse_message_3(message_3)
            kid = edhoc_oscore.kid_of_id_cred(bytes(id_cred_i))
        except (ValueError, RuntimeError, ProtocolError) as exc:
            raise EdhocRefused("edhoc-failed", f"message_3: {exc}") from None
        record = self.pledges.pledge_by_edhoc_kid(kid)
        if record is None or record.edhoc_credential is None:
            raise EdhocRefused("edhoc-unknown-credential", f"no pledge with kid {kid.hex()}")
        try:
            responder.verify_message_3(lakers.Credential(record.edhoc_credential))
            responder.completed_without_message_4()
            secret = responder.edhoc_exporter(edhoc_oscore.MASTER_SECRET_LABEL, b"",
                                              edhoc_oscore.MASTER_SECRET_LENGTH)
            salt = responder.edhoc_exporter(edhoc_oscore.MASTER_SALT_LABEL, b"",
                                            edhoc_oscore.MASTER_SALT_LENGTH)
        except (ValueError, RuntimeError) as exc:
            raise EdhocRefused("edhoc-failed",
                               f"pledge {record.pledge_id.hex()}: message_3: {exc}") from None
        recipient_id = edhoc_oscore.oscore_id(c_r)
        context = EphemeralOscoreContext(edhoc_oscore.oscore_id(c_i), recipient_id,
                                         bytes(secret), bytes(salt))
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions.popitem(last=False)
        self.sessions[recipient_id] = EdhocSession(context, record.pledge_id)
        return aiocoap.Message(code=Code.CHANGED)

    def _new_c_r(self, c_i: bytes) -> bytes:
        while True:  # RFC 9528 §3.3.2: C_R must differ from C_I (else one OSCORE ID for both)
            candidate = os.urandom(C_R_LENGTH)
            encoded = edhoc_oscore.connection_id(candidate)
            if encoded not in self._pending and candidate not in self.sessions \
                    and encoded != bytes(c_i):
                return encoded

    def _expire(self) -> None:
        now = self._clock()
        while self._pending:
            c_r, (_, _, started) = next(iter(self._pending.items()))
            if now - started < PENDING_TIMEOUT:
                break
            del self._pending[c_r]


def error_response(refusal: EdhocRefused) -> aiocoap.Message:
    """4.00 with an EDHOC error message (ERR_CODE 1, the reason): RFC 9528 App. A.2."""
    code = Code.METHOD_NOT_ALLOWED if refusal.reason == "method-not-allowed" \
        else Code.BAD_REQUEST
    return aiocoap.Message(code=code, payload=edhoc_oscore.error_message(refusal.reason))
