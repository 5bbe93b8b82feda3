"""The pledge's three TLS client contexts (RFC 8995 §5.1, §5.6.2, §5.9.4).

* provisional: before a voucher, any server certificate is accepted *and kept*; the handshake
  still proves the server holds the key of the certificate it showed, and that certificate
  goes into the voucher-request as proximity-registrar-cert.
* pinned: after the voucher, the pinned-domain-cert is the one and only trust anchor. It may
  be a CA or the registrar's own certificate, so partial chains are allowed (the anchor need
  not be self-signed). No host name check: the pledge knows no name for the registrar, only
  the pin.
* the same pinned context presenting the new LDevID, for the enrollstatus report.

A pledge keeps one context for all three (``pledge_sim.runner``): building one and loading a
certificate and key into it is most of what a client TLS context costs with OpenSSL 3.0 (its
key decoder alone takes about half a millisecond), so the LDevID is loaded into the context
that already holds the pin rather than into a new one.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which the ssl module has no name for. A pledge without a
# trusted clock MAY ignore certificate validity periods (RFC 8995 §2.6.1).
_NO_CHECK_TIME = 0x200000


def fresh_context() -> ssl.SSLContext:
    """A client context presenting no certificate yet (``load_credential`` gives it one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8995 §5.1: TLS 1.2 or later
    # The server chain read off a kept provisional connection is checked after the voucher;
    # a renegotiation (TLS 1.2) could show another certificate after that, so none is allowed.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def _client_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = fresh_context()
    context.load_cert_chain(cert, key)
    return context


def provisional_context(cert: Path, key: Path) -> ssl.SSLContext:
    return make_provisional(_client_context(cert, key))


def pinned_context(cert: Path, key: Path, pinned: x509.Certificate, *,
                   trusted_clock: bool) -> ssl.SSLContext:
    return make_pinned(_client_context(cert, key), pinned, trusted_clock=trusted_clock)


def make_provisional(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` (made by one of the functions here) for provisional connections from now
    on. A pin loaded before stays in its store, unused: nothing is verified."""
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def make_pinned(context: ssl.SSLContext, pinned: x509.Certificate, *,
                trusted_clock: bool) -> ssl.SSLContext:
    """``context`` for pinned connections from now on, ``pinned`` added to its trust store:
    give it a context whose store holds no other anchor (a fresh one, or one pinned to this
    same certificate), or the other would be trusted too."""
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pinned.public_bytes(serialization.Encoding.DER))
    flags = context.verify_flags | ssl.VERIFY_X509_PARTIAL_CHAIN
    if not trusted_clock:
        flags |= _NO_CHECK_TIME
    context.verify_flags = flags
    return context


def load_credential(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``context`` presents this certificate (PEM, leaf first) and key from now on; connections
    opened before keep what they had. The ssl module loads a client certificate only from a
    file: it goes through an anonymous memory file, so the key never reaches a disk and the
    connection does not wait for one. Replacing a credential of another key type would leave
    both in the context (OpenSSL keeps one per type and may pick either): the caller makes a
    new context then (``same_slot``)."""
    fd = os.memfd_create("pledge-credential")
    try:
        data = memoryview(cert_pem + key_pem)
        while data:
            data = data[os.write(fd, data):]
        path = f"/proc/self/fd/{fd}"
        context.load_cert_chain(path, path)
    finally:
        os.close(fd)


def same_slot(a: object, b: object) -> bool:
    """Whether a context holding a certificate for private key ``a`` holds one for ``b`` in
    the same place, so that loading ``b``'s replaces ``a``'s: OpenSSL keeps one per key type
    (all EC curves share one). Only the types a pledge uses are known here."""
    return any(isinstance(a, kind) and isinstance(b, kind)
               for kind in (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey))


def idevid_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A client context presenting this certificate, to be set up by ``make_provisional`` or
    ``make_pinned`` (the pledge's IDevID serves both phases from one context: loading the
    key and certificate again for the second was a tenth of a pledge's CPU)."""
    return _client_context(cert, key)
