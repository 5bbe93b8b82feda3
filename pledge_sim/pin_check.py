"""Authenticate a kept provisional connection after the voucher (RFC 8995 §5.6.2).

The provisional TLS session accepted any server certificate, but the handshake proved that the
server holds the key of the first certificate it sent, and the pledge kept the whole chain.
Once the voucher names a pinned-domain-cert, that chain is checked against it, the pin being
the one and only trust anchor: the same verdict a fresh pinned handshake would give, without
the handshake (§5.1: BRSKI-EST connections SHOULD be persistent).

What is checked, with ``brski.chain.verify_chain`` (cryptography's RFC 5280 path building):
signatures along the path, issuer names, basicConstraints/keyUsage of every issuer, validity
at the trusted time or, for a pledge without a trusted clock (§2.6.1), at a time inside the
certificates' own validity; and, as OpenSSL's TLS server purpose did for the pinned
handshake, an extendedKeyUsage that does not allow serverAuth disqualifies a certificate.
The pin may be the registrar's own certificate or any CA above it (a partial chain).

One difference from OpenSSL's clockless mode (X509_V_FLAG_NO_CHECK_TIME): the path is checked
at one time, so a path whose members were never valid at one same moment is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from brski.chain import describe, load_certificate, verify_chain
from brski.errors import DecodeError, SignatureError

# More than a registrar needs (leaf, a sub-CA or two, a root) and a bound on the work a
# hostile chain can cause: the clockless check may try one time per certificate.
MAX_CHAIN = 10
_SERVER_EKUS = frozenset({ExtendedKeyUsageOID.SERVER_AUTH,
                          ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE})


class PinMismatch(Exception):
    """The kept connection's server chain does not lead to the pinned-domain-cert."""


def check_server_chain(peer_der: bytes | None, chain_der: Sequence[bytes],
                       pinned: x509.Certificate, now: datetime | None
                       ) -> list[x509.Certificate]:
    """The validated path ``[leaf, ..., pinned]`` for the chain a TLS server sent (leaf first,
    as in the handshake), or PinMismatch saying why not.

    ``peer_der``: the certificate the handshake authenticated; the chain must start with it
    (the leaf is the only certificate whose key the server proved to hold). ``now``: the
    trusted time, or None for a pledge without a trusted clock.
    """
    if not peer_der or not chain_der:
        raise PinMismatch("the TLS server showed no certificate")
    if len(chain_der) > MAX_CHAIN:
        raise PinMismatch(f"the TLS server sent {len(chain_der)} certificates "
                          f"(at most {MAX_CHAIN} are taken)")
    if bytes(chain_der[0]) != bytes(peer_der):
        raise PinMismatch("the server's chain does not start with the certificate the TLS "
                          "handshake authenticated")
    try:
        certs = [load_certificate(bytes(der), "TLS server certificate") for der in chain_der]
    except DecodeError as exc:
        raise PinMismatch(str(exc)) from exc
    leaf, others = certs[0], certs[1:]
    last: SignatureError | None = None
    for at in [now] if now is not None else _clockless_times(leaf, others, pinned):
        try:
            path = verify_chain(leaf, others, [pinned], at)
        except SignatureError as exc:
            last = exc
            continue
        _require_server_use(path[:-1] or path)
        return path
    if last is None:  # no time lies inside both the leaf's and the pin's validity
        raise PinMismatch(f"certificate {describe(leaf)} and the pinned-domain-cert were "
                          "never valid at the same time")
    raise PinMismatch(str(last))


def _clockless_times(leaf: x509.Certificate, others: Sequence[x509.Certificate],
                     pinned: x509.Certificate) -> list[datetime]:
    """Times to check at when the pledge has no clock, best first: each certificate's notBefore
    that lies inside both the leaf's and the pin's validity, latest first. The latest notBefore
    of the path is inside every member's validity if any time is; which certificates make the
    path is not known before, and junk among the others must not move the time off it."""
    start = max(leaf.not_valid_before_utc, pinned.not_valid_before_utc)
    end = min(leaf.not_valid_after_utc, pinned.not_valid_after_utc)
    times = {c.not_valid_before_utc for c in (leaf, *others, pinned)}
    return sorted((t for t in times if start <= t <= end), reverse=True)


def _require_server_use(certs: Sequence[x509.Certificate]) -> None:
    for cert in certs:
        try:
            ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            continue
        if not _SERVER_EKUS & set(ekus):
            raise PinMismatch(f"certificate {describe(cert)} is not for TLS servers "
                              "(its extendedKeyUsage lacks serverAuth)")
