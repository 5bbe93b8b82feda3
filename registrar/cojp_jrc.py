"""The 6TiSCH JRC (RFC 9031): CoJP Join Requests over OSCORE, answered with a Configuration.

One UDP CoAP listener (``[cojp]``, registrar.cojp_config). A request reaches ``/j`` only inside
OSCORE, so the outer message is handled here, not by aiocoap's resource tree: the ID context
(OSCORE 'kid context') names the pledge, whose PSK is in the store (registrar.cojp_store); the
JRC's Sender ID is "JRC" (0x4a5243), the pledge's is empty, the master salt empty, the AEAD
AES-CCM-16-64-128 (RFC 9031 §8.3 / protocols.md §6.3).

Why not aiocoap's OscoreSiteWrapper: its contexts write the replay window only at a clean
shutdown (RFC 9031 §7.3.1 wants every update written) and it drops a retransmitted request as a
replay even when the response was lost. ``PledgeContext`` keeps aiocoap's OSCORE code (the
RFC 8613 vectors pass through it: tests/test_oscore_vectors.py) and writes its counters to the
store on every change; the last response per pledge is cached there and resent for the very
same request bytes.

Refusals (RFC 9031 §7.3.2: OSCORE failures are dropped silently) are counted as
``brski_registrar_refusals_total{endpoint="cojp", reason}`` and logged, one line each (a flood
is summarised per minute): not-oscore, bad-oscore-option, not-post, unknown-id-context,
blacklisted, replay, bad-tag, internal-error; inside OSCORE the pledge gets an answer:
malformed-join-request and wrong-network (4.00 with an Unsupported_Configuration),
not-found (4.04), method-not-allowed (4.05). EDHOC (registrar.cojp_edhoc, when [cojp] has the
JRC's EDHOC key): edhoc-malformed, edhoc-failed, edhoc-unknown-session,
edhoc-unknown-credential, answered with 4.00 and an EDHOC error message (RFC 9528 App. A.2).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from collections import Counter
from typing import Any

import aiocoap
import cbor2
from aiocoap import interfaces, oscore
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import hashes
from prometheus_client import Counter as PromCounter

from brski import cojp
from brski.cbor_strict import loads_exact
from brski.errors import ProtocolError
from coaps_io import extended_tokens
from coaps_io.log_limit import LogLimiter

from .cojp_config import CojpConfig
from .cojp_edhoc import (
    WELL_KNOWN_EDHOC,
    EdhocRefused,
    EdhocResponderService,
    EdhocSession,
    error_response,
)
from .cojp_store import SSN_STEP, CojpPledge, CojpStore
from .metrics import ServiceMetrics
from .store import Store

log = logging.getLogger(__name__)
ENDPOINT = "cojp"
JRC_SENDER_ID = b"JRC"  # RFC 9031 §8.3: 0x4a5243
PLEDGE_SENDER_ID = b""
AEAD = "AES-CCM-16-64-128"  # RFC 9031 §8.3 default (COSE 10)
REPLAY_WINDOW = 32  # RFC 8613 §7.4 default
AF42_TCLASS = 36 << 2  # DSCP AF42 (RFC 2597) in the IPv6 traffic class / IPv4 TOS byte
REFUSAL_LOG_BURST = 20
REASONS = ("not-oscore", "bad-oscore-option", "not-post", "unknown-id-context", "blacklisted",
           "replay", "bad-tag", "internal-error", "malformed-join-request", "wrong-network",
           "not-found", "method-not-allowed", "edhoc-malformed", "edhoc-failed",
           "edhoc-unknown-session", "edhoc-unknown-credential")


class PledgeContext(oscore.CanProtect, oscore.CanUnprotect, oscore.SecurityContextUtils):
    """The JRC's OSCORE context with one pledge, its counters mirrored in the store."""

    echo_recovery = None  # the window is always known (persisted): no RFC 9175 Echo round

    def __init__(self, record: CojpPledge, store: CojpStore) -> None:
        self.pledge_id = record.pledge_id
        self.psk = record.psk
        self.sender_id = JRC_SENDER_ID
        self.recipient_id = PLEDGE_SENDER_ID
        self.id_context = record.pledge_id
        self.alg_aead = oscore.algorithms[AEAD]
        self.hashfun = hashes.SHA256()
        self.derive_keys(b"", record.psk)
        self._store = store
        # Every number below ssn_reserved may have been used before a crash: start there.
        self.sender_sequence_number = record.ssn_reserved
        self._reserved = record.ssn_reserved
        self.recipient_replay_window = oscore.ReplayWindow(REPLAY_WINDOW, self._window_changed)
        self.recipient_replay_window.initialize_from_persisted(
            {"index": record.window_index, "bitfield": record.window_bits})

    def _window_changed(self) -> None:
        # Called by aiocoap inside unprotect(), after the tag verified and before the request
        # is answered: the window is on disk before anything depends on it.
        state = self.recipient_replay_window.persist()
        self._store.save_window(self.pledge_id, state["index"], state["bitfield"])

    def post_seqnoincrease(self) -> None:
        # new_sequence_number() has just handed out sender_sequence_number - 1; it may only be
        # used if it is below the reservation on disk, so move that ahead first.
        if self.sender_sequence_number > self._reserved:
            reserved = self.sender_sequence_number + SSN_STEP
            self._store.reserve_ssn(self.pledge_id, reserved)
            self._reserved = reserved


class CojpJrc:
    """Decides on each outer CoAP request; ``start`` puts it on a UDP socket."""

    def __init__(self, config: CojpConfig, store: Store,
                 metrics: ServiceMetrics | None = None) -> None:
        self.config = config
        self.pledges = CojpStore(store)
        self.metrics = metrics
        self.contexts: dict[bytes, PledgeContext] = {}
        self.counts: Counter[str] = Counter()
        self.refusal_log = LogLimiter(log, burst=REFUSAL_LOG_BURST)
        self.context: aiocoap.Context | None = None
        self.edhoc = (EdhocResponderService(config.edhoc_private_key, config.edhoc_credential,
                                            self.pledges)
                      if config.edhoc_private_key and config.edhoc_credential else None)
        self.joins: PromCounter | None = None
        if metrics is not None:
            for reason in REASONS:  # at zero from the start: "never happened" is visible
                metrics.refusals.labels(ENDPOINT, reason)
            self.joins = PromCounter(
                "brski_registrar_cojp_joins", "CoJP Join Requests answered with a "
                "Configuration (method psk or edhoc), and retransmissions answered from the "
                "cache (method retransmission)", ["method"], registry=metrics.registry)
            for method in ("psk", "edhoc", "retransmission"):
                self.joins.labels(method)

    # -- I/O ------------------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        host, port = self.config.listen
        # Behind a stateless join proxy a request's token is the proxy's sealed state (RFC
        # 9031 §7.1), 13 bytes or more: aiocoap's own codec mangles those.
        extended_tokens.install()
        self.context = await aiocoap.Context.create_server_context(
            _JrcSite(self), bind=(host, port), transports=["udp6"],
            loggername=f"{__name__}.aiocoap")
        marked = mark_join_responses(self.context)
        if not marked:
            log.warning("CoJP JRC: could not mark Join Responses AF42 (aiocoap's socket not "
                        "found); they go out with the default traffic class")
        return host, port

    async def stop(self) -> None:
        if self.context is not None:
            await self.context.shutdown()
            self.context = None
        log.info("CoJP JRC: stopped; %s", dict(self.counts) or "no requests")

    # -- decisions ------------------------------------------------------------------------
    def handle(self, request: aiocoap.Message) -> aiocoap.Message | None:
        """The outer response to send, or None to drop the request silently."""
        try:
            return self._handle(request)
        except Exception:  # a daemon never dies on a packet
            log.exception("CoJP request from %s: internal error", _peer(request))
            self._refuse(request, "internal-error", "see the traceback above", log_it=False)
            return None

    def _handle(self, request: aiocoap.Message) -> aiocoap.Message | None:
        if request.opt.oscore is None:
            if self.edhoc is not None and request.opt.uri_path == WELL_KNOWN_EDHOC:
                return self._edhoc(request)
            return self._refuse(request, "not-oscore", "no OSCORE option")
        try:
            bag = oscore.verify_start(request)
        except (oscore.DecodeError, oscore.ProtectionInvalid, ValueError) as exc:
            return self._refuse(request, "bad-oscore-option", str(exc))
        if request.code != Code.POST:
            return self._refuse(request, "not-post", f"outer code {request.code}")
        kid = bag.get(oscore.COSE_KID)
        id_context = bag.get(oscore.COSE_KID_CONTEXT)
        piv = bag.get(oscore.COSE_PIV)
        digest = hashlib.sha256(request.opt.oscore + request.payload).digest()
        if id_context is None and kid:
            # No ID context: a context derived by EDHOC, named by its Recipient ID (C_R).
            session = self.edhoc.session(kid) if self.edhoc is not None else None
            if session is None:
                return self._refuse(request, "unknown-id-context",
                                    f"kid {kid.hex()}: no EDHOC session")
            cached = (session.last_piv, session.last_request_sha256, session.last_response)
            return self._protected(request, session.context, session.pledge_id, piv, digest,
                                   cached, session)
        if kid != PLEDGE_SENDER_ID or not id_context:
            return self._refuse(request, "unknown-id-context",
                                f"kid {_hex(kid)}, kid context {_hex(id_context)}")
        record = self.pledges.pledge(id_context)
        if record is None or record.psk is None:
            return self._refuse(request, "unknown-id-context",
                                f"pledge {id_context.hex()} has no PSK in the store"
                                if record else f"pledge {id_context.hex()} is not in the store")
        cached = (record.last_piv, record.last_request_sha256, record.last_response)
        return self._protected(request, self._context(record), id_context, piv, digest,
                               cached, None)

    def _protected(self, request: aiocoap.Message, ctx: Any, pledge_id: bytes,
                   piv: bytes | None, digest: bytes,
                   cached: tuple[bytes | None, bytes | None, bytes | None],
                   session: EdhocSession | None) -> aiocoap.Message | None:
        """Verify, answer and protect a request under ``ctx`` (a PSK or an EDHOC context)."""
        last_piv, last_digest, last_response = cached
        if (piv is not None and last_response is not None and last_piv == piv
                and last_digest == digest):
            self.counts["retransmission"] += 1
            if self.joins is not None:
                self.joins.labels("retransmission").inc()
            log.info("CoJP: pledge %s sent its Join Request (PIV %s) again; resending the "
                     "response", pledge_id.hex(), piv.hex())
            return _cached_response(last_response)
        if pledge_id in self.config.blacklist:
            return self._refuse(request, "blacklisted", f"pledge {pledge_id.hex()}")
        try:
            plain, request_id = ctx.unprotect(request)
        except oscore.ReplayError as exc:
            return self._refuse(request, "replay", f"pledge {pledge_id.hex()}: {exc}")
        except oscore.DecodeError as exc:
            return self._refuse(request, "bad-oscore-option", f"pledge {pledge_id.hex()}: {exc}")
        except oscore.ProtectionInvalid as exc:
            return self._refuse(request, "bad-tag", f"pledge {pledge_id.hex()}: {exc}")
        inner, join = self._answer(request, plain, pledge_id)
        if self.config.response_partial_iv:
            request_id.can_reuse_nonce = False
        inner.direction = aiocoap.message.Direction.OUTGOING
        outer, _ = ctx.protect(inner, request_id)
        if join is not None:
            assert piv is not None
            blob = _cache_blob(outer)
            if session is None:
                self.pledges.save_join(pledge_id, piv, digest, blob, join.network_identifier,
                                       int(join.effective_role))
            else:
                session.last_piv, session.last_request_sha256, session.last_response = \
                    piv, digest, blob
                self.pledges.save_join(pledge_id, None, None, None, join.network_identifier,
                                       int(join.effective_role), method="edhoc")
            self.counts["joined"] += 1
            if self.joins is not None:
                self.joins.labels("psk" if session is None else "edhoc").inc()
            log.info("CoJP: pledge %s joined (network %s, role %s, %s) from %s",
                     pledge_id.hex(), join.network_identifier.hex(),
                     join.effective_role.name.lower(), "psk" if session is None else "edhoc",
                     _peer(request))
        return outer

    def _edhoc(self, request: aiocoap.Message) -> aiocoap.Message:
        assert self.edhoc is not None
        try:
            response = self.edhoc.handle(request)
        except EdhocRefused as refusal:
            self._refuse(request, refusal.reason, str(refusal))
            return error_response(refusal)
        if not response.payload:
            self.counts["edhoc-completed"] += 1
        return response

    def _answer(self, request: aiocoap.Message, plain: aiocoap.Message,
                pledge_id: bytes) -> tuple[aiocoap.Message, cojp.JoinRequest | None]:
        """The inner response to a verified request, and the Join_Request if it was one."""
        if plain.opt.uri_path != ("j",):
            self._refuse(request, "not-found", f"pledge {pledge_id.hex()}: inner path "
                         f"/{'/'.join(plain.opt.uri_path)}")
            return aiocoap.Message(code=Code.NOT_FOUND), None
        if plain.code != Code.POST:
            self._refuse(request, "method-not-allowed", f"pledge {pledge_id.hex()}: {plain.code}")
            return aiocoap.Message(code=Code.METHOD_NOT_ALLOWED), None
        try:
            join = cojp.decode_join_request(plain.payload)
        except cojp.ObjectError as exc:
            self._refuse(request, "malformed-join-request", f"pledge {pledge_id.hex()}: {exc}")
            return _diagnostic(exc.code, exc.label), None
        except ProtocolError as exc:
            self._refuse(request, "malformed-join-request", f"pledge {pledge_id.hex()}: {exc}")
            return aiocoap.Message(code=Code.BAD_REQUEST), None
        wanted = self.config.network_id
        if wanted is not None and join.network_identifier != wanted:
            self._refuse(request, "wrong-network",
                         f"pledge {pledge_id.hex()}: network {join.network_identifier.hex()}, "
                         f"this JRC serves {wanted.hex()}")
            refusal = _diagnostic(cojp.UnsupportedCode.UNSUPPORTED,
                                  cojp.Label.NETWORK_IDENTIFIER)
            return refusal, None
        record = self.pledges.pledge(pledge_id)
        assert record is not None
        configuration = self.configuration(record.short_id)
        return aiocoap.Message(code=Code.CHANGED, payload=configuration.encode()), join

    def configuration(self, short_id: int) -> cojp.Configuration:
        """The Configuration object for a pledge, from ``[cojp]`` and its short identifier."""
        conf = self.config
        return cojp.Configuration(
            link_layer_keys=conf.link_layer_keys or None,
            short_identifier=cojp.ShortIdentifier(short_id.to_bytes(2, "big"),
                                                  conf.short_id_lease or None),
            jrc_address=conf.jrc_address,
            blacklist=conf.blacklist or None,
            join_rate=conf.join_rate)

    def _context(self, record: CojpPledge) -> PledgeContext:
        ctx = self.contexts.get(record.pledge_id)
        if ctx is None or ctx.psk != record.psk:  # new, or recommissioned with a new PSK
            ctx = self.contexts[record.pledge_id] = PledgeContext(record, self.pledges)
        return ctx

    def _refuse(self, request: aiocoap.Message, reason: str, detail: str, *,
                log_it: bool = True) -> None:
        self.counts[reason] += 1
        if self.metrics is not None:
            self.metrics.refused(ENDPOINT, reason)
        self.refusal_log.flush()
        if log_it and self.refusal_log.allow(f"CoJP requests refused ({reason})"):
            log.warning("CoJP request from %s refused (%s): %s", _peer(request), reason, detail)
        return None


class _JrcSite(interfaces.Resource):
    """The whole CoAP site of the JRC's socket: every request goes to CojpJrc.handle."""

    def __init__(self, jrc: CojpJrc) -> None:
        self.jrc = jrc

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        # The abstract method of interfaces.Resource. aiocoap calls render_to_pipe, which can
        # also send nothing at all (a silent OSCORE drop); a plain render cannot, so it is
        # never used.
        raise RuntimeError("the CoJP JRC answers through render_to_pipe")

    async def render_to_pipe(self, pipe: Any) -> None:
        response = self.jrc.handle(pipe.request)
        if response is not None:
            pipe.add_response(response, is_last=True)


def mark_join_responses(context: aiocoap.Context) -> int:
    """RFC 9031 §6.1/§9: the JRC SHOULD mark Join Responses AF42 (DSCP 36). Everything this
    socket sends is a CoJP answer, so the socket's traffic class is set; returns how many
    sockets were marked. aiocoap exposes no option for it: its UDP transport is reached through
    the context's interfaces (aiocoap 0.4.17 attribute names)."""
    marked = 0
    for interface in context.request_interfaces:
        messages = getattr(getattr(interface, "token_interface", None), "message_interface",
                           None)
        transport = getattr(messages, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            continue
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, AF42_TCLASS)
        with contextlib.suppress(OSError):  # IPv4-mapped peers of a dual-stack socket
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, AF42_TCLASS)
        marked += 1
    return marked


def _diagnostic(code: int, label: int | None) -> aiocoap.Message:
    """4.00 with an Unsupported_Configuration (RFC 9031 §8.3.2) naming the refused label."""
    if label is None:
        return aiocoap.Message(code=Code.BAD_REQUEST)
    payload = cojp.encode_unsupported_configuration(
        (cojp.UnsupportedParameter(int(code), int(label), None),))
    return aiocoap.Message(code=Code.BAD_REQUEST, payload=payload)


def _cache_blob(outer: aiocoap.Message) -> bytes:
    return cbor2.dumps([int(outer.code), bytes(outer.opt.oscore), outer.payload])


def _cached_response(blob: bytes) -> aiocoap.Message:
    code, option, payload = loads_exact(blob, "cached CoJP response")
    message = aiocoap.Message(code=Code(code), payload=payload)
    message.opt.oscore = option
    return message


def _peer(request: aiocoap.Message) -> str:
    try:
        return str(request.remote.hostinfo)
    except Exception:  # a message without a remote (tests) or a transport that has none
        return "?"


def _hex(value: bytes | None) -> str:
    return "absent" if value is None else (value.hex() or "empty")
