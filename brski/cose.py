"""COSE_Sign1 (RFC 9052 §4.2) as cBRSKI signs vouchers and voucher-requests (cBRSKI §9.2).

    data = sign(payload, key, x5bag=certs, kid=None)     # tag 18, {1: alg} protected
    msg = decode(data)                                   # Sign1, nothing verified
    verify(msg, cert_or_public_key)                      # SignatureError if not
    without_x5(data)                                     # registrar strips x5bag (cBRSKI §6.8)

Algorithms: ES256 (-7, the cBRSKI default), ES384 (-35), ES512 (-36), EdDSA (-8, Ed25519).
Certificates travel in the unprotected ``x5bag`` (label 32, RFC 9360): one certificate as a byte
string, several as an array. ``kid`` (label 4) is optional.

pycose builds and encodes the message (headers, tag 18) and does EdDSA. ECDSA is computed with
cryptography instead: pycose 1.1 signs and verifies ECDSA with the pure-Python ``ecdsa``
package, which is some 30x slower and whose maintainers rule side channels out of scope
(CVE-2024-23342) — not acceptable for a MASA's long-term key. Input is checked structurally
before pycose sees it, and anything pycose or cbor2 raises becomes a library error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pycose import algorithms, headers
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import Sign1Message

from .cbor_strict import head, loads_exact
from .chain import certificate_der, load_certificate
from .errors import DecodeError, SignatureError, UsageError

SIGN1_TAG = 18
ALG, KID, X5BAG, X5CHAIN = 1, 4, 32, 33  # COSE header labels (RFC 9052, RFC 9360)
ES256, ES384, ES512, EDDSA = -7, -35, -36, -8

# alg -> (pycose algorithm, hash, curve name); EdDSA has neither hash nor curve of this kind
_ECDSA: dict[int, tuple[type[algorithms.CoseAlgorithm], type[hashes.HashAlgorithm], str]] = {
    ES256: (algorithms.Es256, hashes.SHA256, "secp256r1"),
    ES384: (algorithms.Es384, hashes.SHA384, "secp384r1"),
    ES512: (algorithms.Es512, hashes.SHA512, "secp521r1"),
}
_ALG_BY_CURVE = {curve: alg for alg, (_, _, curve) in _ECDSA.items()}
_PROTECTED = {alg: cbor2.dumps({ALG: alg}) for alg in _ECDSA}  # what pycose emits: {1: alg}
SUPPORTED_ALGS = frozenset({*_ECDSA, EDDSA})
_PROTECTED_ALG = {cbor2.dumps({ALG: alg}): alg for alg in SUPPORTED_ALGS}
# Per ECDSA alg, worked out once: the signature algorithm object (stateless), the size of r
# and of s, and the constant starts of the message and of its Sig_structure (RFC 9052 §4.4:
# ["Signature1", protected, external_aad = h'', payload]), as cbor2 would write them.
_SIGNATURE_ALG = {alg: ec.ECDSA(hash_cls()) for alg, (_, hash_cls, _) in _ECDSA.items()}
_COORDINATE_SIZE = {ES256: 32, ES384: 48, ES512: 66}
_SIG1_HEAD = b"\x84\x6aSignature1"  # array(4), text(10)
_TBS_START = {alg: _SIG1_HEAD + head(2, len(p)) + p + b"\x40" for alg, p in _PROTECTED.items()}
_MESSAGE_START = {alg: b"\xd2\x84" + head(2, len(p)) + p for alg, p in _PROTECTED.items()}
_SIGNATURE_HEAD = {alg: head(2, 2 * size) for alg, size in _COORDINATE_SIZE.items()}
_MAP_HEADS = (head(5, 0), head(5, 1), head(5, 2))  # the unprotected header: kid, x5bag

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class Sign1:
    """A decoded COSE_Sign1. ``protected`` is the header bstr exactly as received."""

    protected: bytes
    alg: int
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    kid: bytes | None
    x5bag: tuple[x509.Certificate, ...]


def decode(data: bytes) -> Sign1:
    """Parse a COSE_Sign1 (tagged 18, or untagged). Verifies nothing."""
    item = loads_exact(data, "COSE_Sign1")
    if isinstance(item, cbor2.CBORTag):
        if item.tag != SIGN1_TAG:
            raise DecodeError(f"CBOR tag {item.tag} is not COSE_Sign1 (18)")
        item = item.value
    # loads_exact gives exact built-in types: list, dict, bytes (never subclasses)
    if type(item) is not list or len(item) != 4:
        raise DecodeError("COSE_Sign1 is an array of four items")
    protected, unprotected, payload, signature = item
    if type(protected) is not bytes:
        raise DecodeError("COSE_Sign1 protected header is not a byte string")
    if type(unprotected) is not dict:
        raise DecodeError("COSE_Sign1 unprotected header is not a map")
    if payload is None:
        raise DecodeError("detached COSE payloads are not used for vouchers")
    if type(payload) is not bytes or type(signature) is not bytes:
        raise DecodeError("COSE_Sign1 payload and signature must be byte strings")
    known = _PROTECTED_ALG.get(protected)
    if known is not None:  # {1: alg}, as every signer of ours and of the examples writes it
        prot: Any = {ALG: known}
    else:
        prot = loads_exact(protected, "COSE protected header") if protected else {}
    if type(prot) is not dict:
        raise DecodeError("COSE protected header is not a map")
    for label in unprotected if known is not None else (*prot, *unprotected):
        if type(label) is not int and type(label) is not str:
            raise DecodeError("COSE header labels are integers or text")
    if not prot.keys().isdisjoint(unprotected):
        raise DecodeError("a COSE header label appears in both buckets (RFC 9052 §3)")
    alg = prot.get(ALG)
    if ALG in unprotected:
        raise DecodeError("alg must be in the protected header")
    if type(alg) is not int or alg not in SUPPORTED_ALGS:
        raise DecodeError(f"unsupported or missing COSE alg {alg!r}")
    kid = prot.get(KID, unprotected.get(KID))
    if kid is not None and type(kid) is not bytes:
        raise DecodeError("kid must be a byte string")
    # What Sign1(...) makes, without its frozen __init__ setting each field in turn through
    # object.__setattr__ (one message per voucher verified: that was a tenth of decode)
    msg = object.__new__(Sign1)
    msg.__dict__.update(
        protected=protected,
        alg=alg,
        unprotected=unprotected,
        payload=payload,
        signature=signature,
        kid=kid,
        x5bag=_certificates(unprotected.get(X5BAG, prot.get(X5BAG))),
    )
    return msg


def verify(msg: Sign1, signer: x509.Certificate | PublicKey) -> None:
    """Check the signature with ``signer`` (a certificate or a public key)."""
    key = _public_key(signer)
    if msg.alg == EDDSA:
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError(f"EdDSA signature but the signer key is {type(key).__name__}")
        ok = _pycose_eddsa_verify(msg, key)
    else:
        curve = _ECDSA[msg.alg][2]
        if not _is_a(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
            raise SignatureError(f"COSE alg {msg.alg} needs a {curve} key")
        ok = _ecdsa_verify(key, msg.alg, msg.signature,
                           _TBS_START[msg.alg] + head(2, len(msg.payload)) + msg.payload)
    if not ok:
        raise SignatureError("COSE_Sign1 signature does not verify")


def sign(
    payload: bytes,
    key: PrivateKey,
    *,
    x5bag: Sequence[x509.Certificate] = (),
    kid: bytes | None = None,
) -> bytes:
    """A tagged COSE_Sign1 over ``payload``; alg follows the key (P-256 -> ES256, ...)."""
    if not isinstance(payload, bytes):
        raise UsageError("payload must be bytes")
    if kid is not None and not isinstance(kid, bytes):
        raise UsageError("kid must be bytes")
    ders = [certificate_der(c) for c in x5bag] if x5bag else []
    if not _is_a(key, ec.EllipticCurvePrivateKey):
        if isinstance(key, ed25519.Ed25519PrivateKey):
            uhdr: dict[Any, Any] = {}
            if kid is not None:
                uhdr[KID] = kid
            if ders:
                uhdr[X5BAG] = ders[0] if len(ders) == 1 else ders  # RFC 9360 §2
            msg = Sign1Message(phdr={headers.Algorithm: algorithms.EdDSA}, uhdr=uhdr,
                               payload=payload)
            msg.key = OKPKey(crv=Ed25519, x=_raw_public(key), d=_raw_private(key))
            return _encode(msg, sign=True)  # pycose's EdDSA is cryptography underneath
        raise UsageError(f"cannot sign COSE with a {type(key).__name__}")
    alg = _ALG_BY_CURVE.get(key.curve.name)
    if alg is None:
        raise UsageError(f"unsupported curve {key.curve.name}")
    # Encoded here rather than through pycose (same bytes: tag 18, the protected map, the
    # unprotected map with kid then x5bag, as cbor2 writes it): pycose's header and message
    # objects cost twice the signature itself.
    payload_head = head(2, len(payload))
    der = key.sign(b"".join((_TBS_START[alg], payload_head, payload)), _SIGNATURE_ALG[alg])
    r, s = decode_dss_signature(der)
    size = _COORDINATE_SIZE[alg]
    out = [_MESSAGE_START[alg], _MAP_HEADS[(kid is not None) + (len(ders) > 0)]]
    if kid is not None:
        out += (b"\x04", head(2, len(kid)), kid)  # label 4
    if len(ders) == 1:  # RFC 9360 §2: one certificate as a byte string, several as an array
        out += (b"\x18\x20", head(2, len(ders[0])), ders[0])  # label 32
    elif ders:
        out += (b"\x18\x20", head(4, len(ders)))
        for der_cert in ders:
            out += (head(2, len(der_cert)), der_cert)
    out += (payload_head, payload, _SIGNATURE_HEAD[alg], r.to_bytes(size, "big"),
            s.to_bytes(size, "big"))
    return b"".join(out)


def without_x5(data: bytes) -> bytes:
    """The same COSE_Sign1 with x5bag/x5chain removed from the unprotected header: the
    registrar MUST strip them before forwarding a voucher (cBRSKI §6.8). The signature stays
    valid, since the unprotected header is not signed."""
    msg = decode(data)
    kept = {k: v for k, v in msg.unprotected.items() if k not in (X5BAG, X5CHAIN)}
    item = [msg.protected, kept, msg.payload, msg.signature]
    try:
        return cbor2.dumps(cbor2.CBORTag(SIGN1_TAG, item))
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:  # odd decoded header values
        raise DecodeError(f"cannot re-encode the COSE message: {exc}") from exc


# --- helpers --------------------------------------------------------------------------------


def _encode(msg: Sign1Message, *, sign: bool) -> bytes:
    try:
        return msg.encode(sign=sign)
    except Exception as exc:  # pycose raises CoseException, TypeError, ValueError...
        raise UsageError(f"pycose could not encode the COSE_Sign1: {exc}") from exc


# Concrete key classes already found to be instances of an ABC: cryptography's key types are
# ABCs, and an ABC isinstance() check of its Rust classes costs more than a set lookup.
_SUBCLASSES_SEEN: dict[type, set[type]] = {
    ec.EllipticCurvePrivateKey: set(), ec.EllipticCurvePublicKey: set()}


def _is_a(key: object, abc_class: type) -> bool:
    seen = _SUBCLASSES_SEEN[abc_class]
    if type(key) in seen:
        return True
    if isinstance(key, abc_class):
        seen.add(type(key))  # registering with an ABC cannot be undone: stays true
        return True
    return False


def _certificates(value: Any) -> tuple[x509.Certificate, ...]:
    if value is None:
        return ()
    if type(value) is bytes:  # one certificate, the usual case
        return (load_certificate(value, "an x5bag entry"),)
    if type(value) is not list or not value or not all(type(i) is bytes for i in value):
        raise DecodeError("x5bag must be a certificate or a non-empty array of them")
    return tuple(load_certificate(i, "an x5bag entry") for i in value)


def _public_key(signer: x509.Certificate | PublicKey) -> PublicKey:
    if isinstance(signer, x509.Certificate):
        try:
            key = signer.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SignatureError(f"signer certificate key unusable: {exc}") from exc
    else:
        key = signer
    if not _is_a(key, ec.EllipticCurvePublicKey) and \
            not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"cannot verify COSE with a {type(key).__name__}")
    return key


def _ecdsa_verify(key: ec.EllipticCurvePublicKey, alg: int, raw: bytes, data: bytes) -> bool:
    size = _COORDINATE_SIZE[alg]  # the key's curve is alg's: verify() checked
    if len(raw) != 2 * size:  # RFC 9053 §2.1: r || s, each exactly the curve size
        return False
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, _SIGNATURE_ALG[alg])
    except InvalidSignature:
        return False
    return True


def _pycose_eddsa_verify(msg: Sign1, key: ed25519.Ed25519PublicKey) -> bool:
    try:
        cose_msg = Sign1Message(phdr_encoded=msg.protected, payload=msg.payload)
        cose_msg.signature = msg.signature
        cose_msg.key = OKPKey(crv=Ed25519, x=_raw_public(key))
        return bool(cose_msg.verify_signature())
    except Exception as exc:  # pycose raises CoseException, ValueError, TypeError...
        raise SignatureError("COSE EdDSA signature cannot be checked (malformed protected "
                             "header or signature)") from exc


def _raw_public(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
