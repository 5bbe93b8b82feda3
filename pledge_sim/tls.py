"""The pledge's three TLS client contexts (RFC 8995 §5.1, §5.6.2, §5.9.4).

* provisional: before a voucher, any server certificate is accepted *and kept*; the handshake
  still proves the server holds the key of the certificate it showed, and that certificate
  goes into the voucher-request as proximity-registrar-cert.
* pinned: after the voucher, the pinned-domain-cert is the one and only trust anchor. It may
  be a CA or the registrar's own certificate, so partial chains are allowed (the anchor need
  not be self-signed). No host name check: the pledge knows no name for the registrar, only
  the pin.
* the same pinned context presenting the new LDevID, for the enrollstatus report.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which the ssl module has no name for. A pledge without a
# trusted clock MAY ignore certificate validity periods (RFC 8995 §2.6.1).
_NO_CHECK_TIME = 0x200000


def _client_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8995 §5.1: TLS 1.2 or later
    context.load_cert_chain(cert, key)
    # The server chain read off a kept provisional connection is checked after the voucher;
    # a renegotiation (TLS 1.2) could show another certificate after that, so none is allowed.
    context.options |= ssl.OP_NO_RENEGOTIATION
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


def idevid_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A client context presenting this certificate, to be set up by ``make_provisional`` or
    ``make_pinned`` (the pledge's IDevID serves both phases from one context: loading the
    key and certificate again for the second was a tenth of a pledge's CPU)."""
    return _client_context(cert, key)
