"""Certificate path validation for voucher signers, at a time the caller gives.

Built on cryptography's ``x509.verification`` (RFC 5280 path building, signature checks,
validity periods, name chaining, basicConstraints/pathLen) with a BRSKI profile instead of
the Web PKI one: vendor and registrar certificates (RFC 8995 App. C among them) lack the
authorityKeyIdentifier, subjectAltName and EKU criticality the CA/B Forum profile demands.
What we keep: every issuer must be a CA (basicConstraints cA=TRUE) and, if it has keyUsage,
may sign certificates. End-entity extensions are the caller's policy (e.g. id-kp-cmcRA for a
registrar, RFC 8995 §5.5), checked after this.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification as xv

from . import der_kind
from .errors import DecodeError, SignatureError, UsageError

MAX_DEPTH = 8
# Bounded memo tables. A MASA or registrar sees the same few signer chains and certificates
# again and again; building a verifier and re-checking the CA's signature (one ECDSA verify),
# or re-parsing a certificate's names, cost more than the voucher's own signature did.
CACHE_SIZE = 256


class _Memo:
    """A small thread-safe LRU table; what goes in is immutable."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> object | None:
        # No lock on the read path (a signer looks up several tables per voucher): with the
        # GIL, dict.get and move_to_end are each atomic for our keys (bytes and tuples of
        # them: no Python-level hash or eq), so the worst a concurrent put() can do is evict
        # the key in between, which costs only its recency.
        value = self._items.get(key)
        if value is not None:
            try:  # noqa: SIM105 - contextlib.suppress costs more than the lookup it guards
                self._items.move_to_end(key)
            except KeyError:
                pass
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], object]) -> object:
        """The value kept for ``key``, else ``make()``'s, kept (it must not be None)."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value

    def put(self, key: Hashable, value: object) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


Memo = _Memo  # for other modules' tables of facts about certificates (registrar.masa)
_CERTS = _Memo(CACHE_SIZE)
_PATHS = _Memo(CACHE_SIZE)
_ISSUED = _Memo(CACHE_SIZE)
# The anchors' DER -> one xv.Store of them. A Store keeps what it worked out about each anchor
# (its parsed public key) across verifications: a fresh one per check cost a quarter of the
# chain check of a new IDevID. The anchors' bytes are the key, so a changed, added or removed
# anchor gets a Store of its own; the time and the leaf are the verifier's, built per check.
_STORES = _Memo(64)
# id(certificate object) -> (the object, its DER). Holding the object keeps its id from being
# reused while the entry lives; the identity check below makes a stale id harmless anyway.
_DER_BY_ID: dict[int, tuple[x509.Certificate, bytes]] = {}


def certificate_der(cert: x509.Certificate) -> bytes:
    """``cert``'s DER, kept per certificate object: cryptography serialises it anew on each
    call, and hashing a Certificate (to look it up in a table) costs more than hashing its DER
    bytes, whose hash Python keeps. Tables keyed by certificates use this DER instead."""
    entry = _DER_BY_ID.get(id(cert))
    if entry is not None and entry[0] is cert:
        return entry[1]
    der = cert.public_bytes(serialization.Encoding.DER)
    _remember_der(cert, der)
    return der


def _remember_der(cert: x509.Certificate, der: bytes) -> None:
    if len(_DER_BY_ID) >= 4 * CACHE_SIZE:
        _DER_BY_ID.clear()
    _DER_BY_ID[id(cert)] = (cert, der)


def directly_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key signed ``cert`` and the names chain (no validity, no policy:
    path validation is ``verify_chain``). Yes-answers are kept: they depend only on the two
    certificates' bytes."""
    key = (certificate_der(cert), certificate_der(issuer))
    if _ISSUED.get(key) is not None:
        return True
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError, TypeError
        return False
    _ISSUED.put(key, True)
    return True


def _require_ca(
    policy: xv.Policy, cert: x509.Certificate, ext: x509.BasicConstraints | None
) -> None:
    if ext is None or not ext.ca:
        raise ValueError("issuer is not a CA (basicConstraints cA is not TRUE)")


def _require_cert_sign(
    policy: xv.Policy, cert: x509.Certificate, ext: x509.KeyUsage | None
) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("issuer keyUsage lacks keyCertSign")


_CA_POLICY = (
    xv.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, xv.Criticality.AGNOSTIC, _require_ca)
    .may_be_present(x509.KeyUsage, xv.Criticality.AGNOSTIC, _require_cert_sign)
)
_EE_POLICY = xv.ExtensionPolicy.permit_all()


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
    at: datetime,
) -> list[x509.Certificate]:
    """The validated path ``[leaf, ..., anchor]``, or SignatureError saying why not.

    A leaf that is itself one of the trust anchors (a pinned MASA certificate) is accepted if
    it is valid at ``at``.
    """
    if at.tzinfo is None:
        raise UsageError("verification time must be timezone-aware")
    if not trust_anchors:
        raise UsageError("no trust anchors given")
    # A path found before holds again for the same leaf, intermediates and anchors (certificate
    # equality is DER equality) at any time inside every member's validity period: nothing
    # else in the check depends on the time. Only successes are kept; a changed, added or
    # removed anchor or intermediate is another key, and a time at or past a member's validity
    # edge is checked afresh.
    key = (certificate_der(leaf), tuple(map(certificate_der, intermediates)),
           tuple(map(certificate_der, trust_anchors)))
    at_utc = at.astimezone(UTC)
    known = _PATHS.get(key)
    if known is not None:
        path, start, end = known  # type: ignore[misc]
        if start < at_utc < end:
            return list(path)
    path = _verify_chain(leaf, intermediates, trust_anchors, at)
    start = max(c.not_valid_before_utc for c in path)
    end = min(c.not_valid_after_utc for c in path)
    _PATHS.put(key, (tuple(path), start, end))
    return path


def _verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
    at: datetime,
) -> list[x509.Certificate]:
    verifier = (
        xv.PolicyBuilder()
        .store(_store(trust_anchors))
        .time(at.astimezone(UTC))
        .max_chain_depth(MAX_DEPTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(leaf, list(intermediates)).chain)
    except (xv.VerificationError, ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(
            f"certificate {describe(leaf)} does not chain to a trust anchor "
            f"at {at.isoformat()}: {_verification_reason(exc)}"
        ) from exc


def _store(trust_anchors: Sequence[x509.Certificate]) -> xv.Store:
    return _STORES.get_or_make(  # type: ignore[return-value]
        tuple(map(certificate_der, trust_anchors)), lambda: xv.Store(list(trust_anchors)))


def load_certificate(der: bytes, what: str = "certificate") -> x509.Certificate:
    """A DER certificate from the network, with the fields we read parsed up front.

    cryptography parses subject, issuer and extensions lazily: a malformed name would
    otherwise surface as ValueError wherever it is first touched (an error message, say).
    Certificates parsed before come from a bounded table (same bytes, same certificate).
    """
    if type(der) is not bytes and isinstance(der, bytearray | memoryview):
        der = bytes(der)
    known = _CERTS.get(der) if isinstance(der, bytes) else None
    if known is not None:
        return known  # type: ignore[return-value]
    try:
        with warnings.catch_warnings():
            # e.g. "Attribute's length must be >= 2": peer data, reported as DecodeError or
            # tolerated, never printed
            warnings.simplefilter("ignore", UserWarning)
            cert = x509.load_der_x509_certificate(der)
            # Reading the names parses every attribute (cryptography keeps the result): a
            # malformed one raises here. Their RFC 4514 text is formatted from those parsed
            # values by plain string escaping, which cannot fail, so it is left to messages.
            len(cert.subject)
            len(cert.issuer)
            len(cert.extensions)
    except Exception as exc:  # ValueError, InvalidVersion, DuplicateExtension, ... all mean
        # the same here: a certificate we cannot use
        raise DecodeError(f"{what} is not a usable DER certificate: {_problem(bytes(der))}"
                          ) from exc
    _CERTS.put(der, cert)
    # Its DER is the input: cryptography reads DER strictly and writes back the same bytes (it
    # verifies signatures over its re-encoding), so certificate_der need not serialise it.
    _remember_der(cert, der)
    return cert


def describe(cert: x509.Certificate) -> str:
    """The subject for messages; never raises."""
    try:
        return f'"{cert.subject.rfc4514_string()}"'
    except ValueError:
        return "(certificate with an unreadable subject)"


def valid_at(cert: x509.Certificate, at: datetime) -> bool:
    """True if ``at`` lies within the certificate's validity period."""
    if at.tzinfo is None:
        raise UsageError("time must be timezone-aware")
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _problem(der: bytes) -> str:
    # cryptography's text ("ParseError { kind: UnexpectedTag ... }") names its internals.
    if der_kind.describe(der) == "an X.509 certificate":
        return "its subject, issuer or an extension cannot be read"
    return der_kind.refusal("an X.509 certificate", der)


_ENCOUNTERED = re.compile(r"\s*\(encountered processing <Certificate\(.*\)>\)\s*$", re.S)
_REASONS = {
    "all candidates exhausted with no interior errors":
        "no trusted or supplied certificate issued it",
    "cert is not valid at validation time":
        "a certificate of the chain is expired or not yet valid then",
}


def _verification_reason(exc: Exception) -> str:
    # cryptography's text carries its internals ("candidates exhausted: ...", "(encountered
    # processing <Certificate(...)>)"); keep the reason, in words a peer's operator can act on.
    text = _ENCOUNTERED.sub("", str(exc))
    for prefix in ("validation failed: ", "candidates exhausted: "):
        text = text.removeprefix(prefix)
    return _REASONS.get(text, text)
