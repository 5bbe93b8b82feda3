"""The end-entity certificate in a TLS Certificate handshake message (RFC 5246 §7.4.2,
RFC 8446 §4.4.2).

The registrar needs the identity of a client whose certificate the TLS layer refused: OpenSSL
keeps no peer certificate after a failed verification, but it shows every handshake message it
reads. Only the framing is parsed here; the certificate's DER is returned as it came.

    TLS 1.2:  type(1)=11 length(3) certificate_list<3>: [cert_data<3>]*
    TLS 1.3:  type(1)=11 length(3) context<1> certificate_list<3>:
                  [cert_data<3> extensions<2>]*
"""

from __future__ import annotations

from .errors import DecodeError

CERTIFICATE = 11  # HandshakeType certificate


def _u(data: bytes, at: int, size: int, what: str) -> int:
    if at + size > len(data):
        raise DecodeError(f"TLS Certificate message truncated in {what}")
    return int.from_bytes(data[at:at + size], "big")


def leaf_certificate(message: bytes, *, tls13: bool) -> bytes | None:
    """DER of the first (end-entity) certificate, or None if the client sent none. Raises
    DecodeError on a message that does not frame."""
    if _u(message, 0, 1, "the handshake type") != CERTIFICATE:
        raise DecodeError(f"not a TLS Certificate message (type {message[0]})")
    length = _u(message, 1, 3, "the handshake length")
    if length != len(message) - 4:
        raise DecodeError(f"TLS Certificate message length {length} != {len(message) - 4}")
    at = 4
    if tls13:
        at += 1 + _u(message, at, 1, "the request context")
    list_length = _u(message, at, 3, "the certificate list length")
    at += 3
    if at + list_length != len(message):
        raise DecodeError("TLS certificate list length does not match the message")
    if list_length == 0:
        return None
    cert_length = _u(message, at, 3, "the certificate length")
    at += 3
    if cert_length == 0 or at + cert_length > len(message):
        raise DecodeError("TLS certificate entry length does not fit the list")
    return message[at:at + cert_length]
