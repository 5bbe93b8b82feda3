"""CMS SignedData (RFC 5652) as vouchers use it (RFC 8366 §5.4, rfc8366bis §7.1).

    der = sign(content, key, certs, signing_time)             # one signer, signed attributes
    sd = parse(der)                                           # SignedData, nothing verified
    signer = verify_signature(sd)                             # signer cert, signature checked
    chain = verify_chain(signer, sd.certificates, anchors, at)    # from brski.chain

We emit eContentType id-ct-animaJSONVoucher (1.2.840.113549.1.9.16.1.40) by default and accept
id-data too: every published example (RFC 8995 App. C, rfc8366bis) uses id-data. Signed
attributes are required on input (rfc8366bis §7.1: decoders MUST verify they are present) and
always emitted: contentType, signingTime, messageDigest. Signers: ECDSA P-256/SHA-256 (ES256),
P-384/SHA-384 (the RFC 8995 vendor CA is P-384) and P-521/SHA-512. Ed25519 CMS (RFC 8419) is
left out on purpose: OpenSSL 3.0 cannot verify it with signed attributes, so no peer could.
asn1crypto reads and writes the structure; cryptography does every hash and signature.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asn1crypto import cms as acms
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import der_codec
from . import der_codec as der
from .certs import OID_CT_ANIMA_JSON_VOUCHER, OID_DATA
from .chain import certificate_der, load_certificate
from .der_kind import describe, refusal
from .errors import DecodeError, SignatureError, UsageError

MAX_SIZE = 256 * 1024
ANIMA_JSON_VOUCHER = OID_CT_ANIMA_JSON_VOUCHER.dotted_string
DATA = OID_DATA.dotted_string
ACCEPTED_CONTENT_TYPES = frozenset({ANIMA_JSON_VOUCHER, DATA})

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# signatureAlgorithm -> hash used inside the signature; None: take it from digestAlgorithm
# ("ecdsa" = id-ecPublicKey, which some encoders put here instead of ecdsa-with-SHAxxx).
_ECDSA_SIGS: dict[str, str | None] = {
    "sha256_ecdsa": "sha256",
    "sha384_ecdsa": "sha384",
    "sha512_ecdsa": "sha512",
    "ecdsa": None,
}
# ECDSA with each hash, made once: the objects hold no state
_ECDSA_SCHEMES = {name: ec.ECDSA(cls()) for name, cls in _DIGESTS.items()}
_CURVE_DIGEST = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}

_OID_SIGNED_DATA = der.oid("1.2.840.113549.1.7.2")
_OID_CONTENT_TYPE = der.oid("1.2.840.113549.1.9.3")
_OID_MESSAGE_DIGEST = der.oid("1.2.840.113549.1.9.4")
_OID_SIGNING_TIME = der.oid("1.2.840.113549.1.9.5")
# RFC 5754 §2: SHA-2 AlgorithmIdentifiers with parameters absent (as in RFC 8995 App. C);
# RFC 5758 §3.2: ecdsa-with-SHA* with parameters absent.
_DIGEST_OIDS_BY_NAME = {
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
_SIG_OIDS_BY_NAME = {
    "sha256_ecdsa": "1.2.840.10045.4.3.2",
    "sha384_ecdsa": "1.2.840.10045.4.3.3",
    "sha512_ecdsa": "1.2.840.10045.4.3.4",
}
_KNOWN_OIDS = {der.oid(dotted): dotted for dotted in (ANIMA_JSON_VOUCHER, DATA)}
_DIGEST_ALG_TLVS = frozenset(
    der.tlv(der.SEQUENCE, der.oid(dotted)) for dotted in _DIGEST_OIDS_BY_NAME.values()
)


SigningKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SignerInfo:
    """The parts of the one SignerInfo needed to find the signer and check the signature."""

    issuer: ax509.Name | None  # issuerAndSerialNumber form
    serial: int | None
    subject_key_id: bytes | None  # subjectKeyIdentifier form
    digest_algorithm: str
    signature_algorithm: str
    signed_attrs: bytes  # DER of SignedAttrs re-tagged as SET OF, i.e. what was signed
    signature: bytes
    content_type: str  # the contentType signed attribute
    message_digest: bytes
    signing_time: datetime | None


@dataclass(frozen=True)
class SignedData:
    version: int
    econtent_type: str  # dotted OID
    content: bytes
    certificates: tuple[x509.Certificate, ...]
    signer: SignerInfo


# --- parsing --------------------------------------------------------------------------------


def parse(der: bytes, *, content_types: frozenset[str] = ACCEPTED_CONTENT_TYPES) -> SignedData:
    """Parse a DER ContentInfo holding SignedData with one signer. Verifies nothing.
    ``content_types``: the eContentTypes accepted (default: a JSON voucher's)."""
    if not isinstance(der, bytes | bytearray):
        raise DecodeError("CMS input must be bytes")
    if len(der) > MAX_SIZE:
        raise DecodeError(f"CMS larger than {MAX_SIZE} bytes")
    der = bytes(der)
    try:
        fast = _parse_canonical(der, content_types)
    except (der_codec.DerError, ValueError, IndexError, KeyError):
        fast = None
    if fast is not None:
        return fast
    try:
        return _parse(der, content_types)
    except DecodeError:
        raise
    except Exception as exc:  # asn1crypto parses lazily and raises ValueError,
        # TypeError, KeyError, IndexError, OverflowError... at first access: all mean "bad DER".
        raise DecodeError(_parse_refusal(bytes(der))) from exc


def _parse_refusal(der: bytes) -> str:
    # asn1crypto's own text ("Extra data - 2605 bytes") names its internals: say what came.
    got = describe(der)
    if got == "a CMS SignedData structure":
        return "malformed CMS SignedData: a field does not have the form RFC 5652 §5 gives it"
    return refusal("a CMS SignedData (RFC 5652)", der, rule="RFC 8995 §5.2")


def _parse(der: bytes, content_types: frozenset[str]) -> SignedData:
    info = acms.ContentInfo.load(der, strict=True)
    if info["content_type"].dotted != "1.2.840.113549.1.7.2":
        raise DecodeError(f"CMS content is {info['content_type'].dotted}, not signedData")
    sd = info["content"]
    version_native = sd["version"].native  # "v1".."v5", or a bare int outside the enum
    version = int(version_native[1:]) if isinstance(version_native, str) else int(version_native)
    encap = sd["encap_content_info"]
    econtent_type = encap["content_type"].dotted
    if econtent_type not in content_types:
        what = "a JSON voucher" if content_types is ACCEPTED_CONTENT_TYPES else "accepted here"
        raise DecodeError(f"eContentType {econtent_type} is not {what}")
    content = encap["content"].native
    if content is None:
        raise DecodeError("detached CMS content is not supported for vouchers")
    if not isinstance(content, bytes):
        raise DecodeError("eContent is not an OCTET STRING")
    certs = []
    for choice in sd["certificates"] or ():
        if choice.name == "certificate":
            certs.append(load_certificate(choice.chosen.dump(), "a CMS certificate"))
    signer_infos = list(sd["signer_infos"])
    if len(signer_infos) != 1:
        raise DecodeError(f"a voucher has exactly one signer, this CMS has {len(signer_infos)}")
    return SignedData(version, econtent_type, content, tuple(certs), _signer(signer_infos[0]))


# Names asn1crypto gives these OIDs, so both parsers fill SignerInfo alike.
_ATTR_NAMES = {
    der.oid("1.2.840.113549.1.9.3"): "content_type",
    der.oid("1.2.840.113549.1.9.4"): "message_digest",
    der.oid("1.2.840.113549.1.9.5"): "signing_time",
}


def _parse_canonical(data: bytes, content_types: frozenset[str]) -> SignedData | None:
    """The common case read straight from the DER: one signer named by issuer and serial,
    the three usual signed attributes, known algorithms, plain certificates, no CRLs. Returns
    None (or raises DerError) for anything else, which asn1crypto then reads and judges; this
    accepts nothing asn1crypto would refuse."""
    tlvs = der.items(data, 0, len(data))
    if len(tlvs) != 1 or tlvs[0][0] != der.SEQUENCE:
        return None
    info = der.items(data, tlvs[0][2], tlvs[0][3])
    if len(info) != 2 or data[info[0][1] : info[1][1]] != _OID_SIGNED_DATA or info[1][0] != 0xA0:
        return None
    outer = der.items(data, info[1][2], info[1][3])
    if len(outer) != 1 or outer[0][0] != der.SEQUENCE:
        return None
    fields = der.items(data, outer[0][2], outer[0][3])
    if len(fields) != 5 or [f[0] for f in fields] != [der.INTEGER, der.SET, der.SEQUENCE, 0xA0,
                                                        der.SET]:  # fmt: skip
        return None
    version = _small_int(data, fields[0])
    for alg in der.items(data, fields[1][2], fields[1][3]):
        if data[alg[1] : alg[3]] not in _DIGEST_ALG_TLVS:
            return None
    encap = der.items(data, fields[2][2], fields[2][3])
    if len(encap) != 2 or encap[0][0] != der.OID or encap[1][0] != 0xA0:
        return None
    econtent_type = _dotted(data[encap[0][1] : encap[0][3]])
    if econtent_type is None:
        return None
    if econtent_type not in content_types:
        what = "a JSON voucher" if content_types is ACCEPTED_CONTENT_TYPES else "accepted here"
        raise DecodeError(f"eContentType {econtent_type} is not {what}")
    octets = der.items(data, encap[1][2], encap[1][3])
    if len(octets) != 1 or octets[0][0] != der.OCTET_STRING:
        return None
    content = data[octets[0][2] : octets[0][3]]
    certs = []
    for tag, start, _, end in der.items(data, fields[3][2], fields[3][3]):
        if tag != der.SEQUENCE:
            return None
        certs.append(load_certificate(data[start:end], "a CMS certificate"))
    infos = der.items(data, fields[4][2], fields[4][3])
    if len(infos) != 1 or infos[0][0] != der.SEQUENCE:
        return None
    signer = _signer_canonical(data, infos[0], certs)
    if signer is None:
        return None
    return SignedData(version, econtent_type, content, tuple(certs), signer)


# SignerInfo issuer names read before, by their DER (a MASA's and a registrar's signers are
# few); only names asn1crypto reads in full go in, so a kept one passes either check above.
_ISSUER_NAMES: dict[bytes, ax509.Name] = {}


def _signer_canonical(
    data: bytes, si: tuple[int, int, int, int], certs: Sequence[x509.Certificate]
) -> SignerInfo | None:
    fields = der.items(data, si[2], si[3])
    if [f[0] for f in fields] != [der.INTEGER, der.SEQUENCE, der.SEQUENCE, 0xA0, der.SEQUENCE,
                                  der.OCTET_STRING]:  # fmt: skip
        return None
    if _small_int(data, fields[0]) != 1:
        return None
    sid = der.items(data, fields[1][2], fields[1][3])
    if len(sid) != 2 or sid[0][0] != der.SEQUENCE or sid[1][0] != der.INTEGER:
        return None
    serial_bytes = data[sid[1][2] : sid[1][3]]
    if not serial_bytes or (len(serial_bytes) > 1 and serial_bytes[0] in (0, 0xFF)
                            and (serial_bytes[0] ^ serial_bytes[1]) & 0x80 == 0):  # fmt: skip
        return None  # empty or non-minimal INTEGER
    # AlgorithmIdentifiers with parameters absent, as we emit: the whole TLV names the algorithm
    digest = _DIGEST_BY_TLV.get(data[fields[2][1] : fields[2][3]])
    sig_name = _SIG_BY_TLV.get(data[fields[4][1] : fields[4][3]])
    if digest is None or sig_name is None:
        return None
    attrs = _usual_attrs(data, fields[3][2], fields[3][3])
    if attrs is None:
        attrs = _any_attrs(data, fields[3][2], fields[3][3])
    if attrs is None:
        return None
    content_type, signing_time, message_digest = attrs
    issuer_der = data[sid[0][1] : sid[0][3]]
    issuer = _ISSUER_NAMES.get(issuer_der)
    if issuer is None:
        issuer = ax509.Name.load(issuer_der, strict=True)
        if not any(_issuer_and_serial(c)[1] == issuer_der for c in certs):
            # The same check the general parser makes; a name that is byte for byte the
            # issuer of a carried certificate has been read in full already (load_certificate).
            issuer.native  # noqa: B018
        elif not _readable(issuer_der):
            issuer_der = b""  # not kept: a name asn1crypto cannot read in full
        if issuer_der:
            if len(_ISSUER_NAMES) >= 256:
                _ISSUER_NAMES.clear()
            _ISSUER_NAMES[issuer_der] = issuer
    signed = data[fields[3][1] : fields[3][3]]
    return SignerInfo(
        issuer=issuer,
        serial=int.from_bytes(serial_bytes, "big", signed=True),
        subject_key_id=None,
        digest_algorithm=digest,
        signature_algorithm=sig_name,
        signed_attrs=b"\x31" + signed[1:],
        signature=data[fields[5][2] : fields[5][3]],
        content_type=content_type,
        message_digest=message_digest,
        signing_time=signing_time,
    )


_Attrs = tuple[str, datetime | None, bytes]  # contentType, signingTime, messageDigest


def _any_attrs(data: bytes, start: int, end: int) -> _Attrs | None:
    """The signed attributes in any order and form the general parser would also read."""
    found: dict[str, bytes] = {}
    for tag, _start, cstart, attr_end in der.items(data, start, end):
        attr = der.items(data, cstart, attr_end)
        if tag != der.SEQUENCE or len(attr) != 2 or attr[1][0] != der.SET:
            return None
        name = _ATTR_NAMES.get(data[attr[0][1] : attr[0][3]])
        values = der.items(data, attr[1][2], attr[1][3])
        if name is None or name in found or len(values) != 1:
            return None
        found[name] = data[values[0][1] : values[0][3]]
    if "content_type" not in found or "message_digest" not in found:
        return None
    ctype = der.items(found["content_type"], 0, len(found["content_type"]))[0]
    digest_value = der.items(found["message_digest"], 0, len(found["message_digest"]))[0]
    if ctype[0] != der.OID or digest_value[0] != der.OCTET_STRING:
        return None
    content_type = _dotted(found["content_type"])
    signing_time = _time(found["signing_time"]) if "signing_time" in found else None
    if content_type is None or ("signing_time" in found and signing_time is None):
        return None
    digest = found["message_digest"][digest_value[2] : digest_value[3]]
    return content_type, signing_time, digest


def _usual_attrs(data: bytes, start: int, end: int) -> _Attrs | None:
    """The three attributes exactly as ``sign`` writes them (DER order: contentType,
    signingTime as UTCTime, messageDigest of a SHA-2 size), matched by their fixed bytes
    instead of eleven element walks; None for anything else (``_any_attrs`` reads that). It
    yields what ``_any_attrs`` yields for the same bytes."""
    found = next(((head, name) for head, name in _CT_ATTRS
                  if data.startswith(head, start, end)), None)
    if found is None:
        return None
    head, content_type = found
    pos = start + len(head)
    if not data.startswith(_ST_HEAD, pos, end):
        return None
    pos += len(_ST_HEAD)
    signing_time = _time(data[pos - 2 : pos + 13])  # the UTCTime TLV; checks its text
    pos += 13
    for md_head in _MD_HEADS:
        if data.startswith(md_head, pos, end):
            pos += len(md_head)
            size = md_head[-1]
            if pos + size != end or signing_time is None:
                return None
            return content_type, signing_time, data[pos:end]
    return None


def _head(attr: bytes, value_size: int) -> bytes:
    return attr[: len(attr) - value_size]


# The fixed bytes of the usual attributes: contentType (for each type we accept), the
# signingTime attribute up to its 13 UTCTime characters, messageDigest up to the digest.
_CT_ATTRS = tuple(
    (der.tlv(der.SEQUENCE, _OID_CONTENT_TYPE, der.tlv(der.SET, der.oid(dotted))), dotted)
    for dotted in (ANIMA_JSON_VOUCHER, DATA)
)
_ST_HEAD = _head(der.tlv(der.SEQUENCE, _OID_SIGNING_TIME,
                         der.tlv(der.SET, der.tlv(der.UTC_TIME, b"0" * 13))), 13)
_MD_HEADS = tuple(
    _head(der.tlv(der.SEQUENCE, _OID_MESSAGE_DIGEST,
                  der.tlv(der.SET, der.tlv(der.OCTET_STRING, b"0" * size))), size)
    for size in (32, 48, 64)
)
_MD_HEAD_BY_SIZE = {head[-1]: head for head in _MD_HEADS}
_DIGEST_BY_TLV = {der.tlv(der.SEQUENCE, der.oid(dotted)): name
                  for name, dotted in _DIGEST_OIDS_BY_NAME.items()}
_SIG_BY_TLV = {der.tlv(der.SEQUENCE, der.oid(dotted)): name
               for name, dotted in _SIG_OIDS_BY_NAME.items()}


def _readable(name_der: bytes) -> bool:
    try:
        ax509.Name.load(name_der, strict=True).native  # noqa: B018
    except Exception:  # asn1crypto raises ValueError, TypeError, ... for what it cannot read
        return False
    return True


def _small_int(data: bytes, field: tuple[int, int, int, int]) -> int:
    body = data[field[2] : field[3]]
    if len(body) != 1 or body[0] > 5:
        raise der_codec.DerError("not a small version number")
    return body[0]


def _dotted(encoded: bytes) -> str | None:
    """The dotted form of a DER OID, for the ones this module names (others: None)."""
    return _KNOWN_OIDS.get(encoded)


def _time(encoded: bytes) -> datetime | None:
    tag, start, end = der.read(encoded, 0, len(encoded))
    text = encoded[start:end]
    if tag == der.UTC_TIME and len(text) == 13 and text.endswith(b"Z") and text[:12].isdigit():
        year = int(text[:2])
        year += 2000 if year < 50 else 1900
        rest = text[2:12]
    elif (tag == der.GENERALIZED_TIME and len(text) == 15 and text.endswith(b"Z")
          and text[:14].isdigit()):  # fmt: skip
        year, rest = int(text[:4]), text[4:14]
    else:
        return None
    nums = [int(rest[i : i + 2]) for i in range(0, 10, 2)]
    return datetime(year, *nums, tzinfo=UTC)


def _signer(si: acms.SignerInfo) -> SignerInfo:
    sid = si["sid"]
    issuer = serial = ski = None
    if sid.name == "issuer_and_serial_number":
        issuer = sid.chosen["issuer"]
        issuer.native  # noqa: B018 - force the lazy parse here, inside parse()'s guard
        serial = sid.chosen["serial_number"].native
    else:
        ski = sid.chosen.native
    attrs = si["signed_attrs"]
    if not attrs:
        # RFC 5652 §5.3: required unless eContentType is id-data; rfc8366bis §7.1 requires it.
        raise DecodeError("CMS signer has no signed attributes")
    found: dict[str, Any] = {}
    for attr in attrs:
        name = attr["type"].native
        values = attr["values"]
        if name in found or len(values) != 1:  # RFC 5652 §11: single-valued, present once
            raise DecodeError(f"signed attribute {name} must appear once with one value")
        found[name] = values[0]
    for needed in ("content_type", "message_digest"):
        if needed not in found:
            raise DecodeError(f"signed attributes lack {needed}")
    signing_time = found["signing_time"].native if "signing_time" in found else None
    signed = attrs.dump()
    return SignerInfo(
        issuer=issuer,
        serial=serial,
        subject_key_id=ski,
        digest_algorithm=si["digest_algorithm"]["algorithm"].native,
        signature_algorithm=si["signature_algorithm"]["algorithm"].native,
        # The signature covers the attributes with the SET OF tag, not the [0] IMPLICIT one.
        signed_attrs=b"\x31" + signed[1:],
        signature=si["signature"].native,
        content_type=found["content_type"].dotted,
        message_digest=found["message_digest"].native,
        signing_time=signing_time,
    )


# --- verification ---------------------------------------------------------------------------


def find_signer(sd: SignedData, extra_certs: Sequence[x509.Certificate] = ()) -> x509.Certificate:
    """The certificate SignerIdentifier names, from the CMS or ``extra_certs``."""
    for cert in (*sd.certificates, *extra_certs):
        if _is_signer(cert, sd.signer):
            return cert
    raise SignatureError("the CMS signer's certificate is not in the CMS nor given")


def _is_signer(cert: x509.Certificate, signer: SignerInfo) -> bool:
    if signer.subject_key_id is not None:
        return _ski(cert) == signer.subject_key_id
    if cert.serial_number != signer.serial or signer.issuer is None:
        return False
    try:
        if _issuer_and_serial(cert)[1] == signer.issuer.dump():
            return True  # the same bytes: the usual case, and no need for asn1crypto's rules
        issuer = ax509.Certificate.load(cert.public_bytes(serialization.Encoding.DER)).issuer
        # asn1crypto compares names as RFC 5280 §7.1 says (case, spaces, string types)
        return issuer.dump() == signer.issuer.dump() or issuer == signer.issuer
    except Exception:  # a name asn1crypto cannot normalise is no match
        return False


def verify_signature(
    sd: SignedData, extra_certs: Sequence[x509.Certificate] = ()
) -> x509.Certificate:
    """Check messageDigest, the contentType attribute and the signature. Returns the signer
    certificate; its chain is not checked here (see ``brski.chain.verify_chain``)."""
    signer = sd.signer
    if signer.content_type != sd.econtent_type:
        raise SignatureError(
            f"signed contentType {signer.content_type} differs from eContentType {sd.econtent_type}"
        )
    digest_cls = _DIGESTS.get(signer.digest_algorithm)
    if digest_cls is None:
        raise SignatureError(f"unsupported digest algorithm {signer.digest_algorithm}")
    if _digest(digest_cls(), sd.content) != signer.message_digest:
        raise SignatureError("messageDigest does not match the content (content altered)")
    cert = find_signer(sd, extra_certs)
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"signer certificate has an unusable public key: {exc}") from exc
    try:
        if signer.signature_algorithm in _ECDSA_SIGS and isinstance(key, ec.EllipticCurvePublicKey):
            hash_name = _ECDSA_SIGS[signer.signature_algorithm] or signer.digest_algorithm
            key.verify(signer.signature, signer.signed_attrs, _ECDSA_SCHEMES[hash_name])
        else:
            raise SignatureError(
                f"signature algorithm {signer.signature_algorithm} does not fit the signer's "
                f"{type(key).__name__}"
            )
    except InvalidSignature as exc:
        raise SignatureError("CMS signature does not verify") from exc
    return cert


# --- signing --------------------------------------------------------------------------------


def sign(
    content: bytes,
    key: SigningKey,
    certs: Sequence[x509.Certificate],
    signing_time: datetime,
    *,
    econtent_type: str = ANIMA_JSON_VOUCHER,
    content_types: frozenset[str] = ACCEPTED_CONTENT_TYPES,
) -> bytes:
    """DER ContentInfo/SignedData over ``content``, signed by ``key``.

    ``certs`` go into the CMS in the given order; the one whose public key matches ``key`` is
    named as signer (issuerAndSerialNumber). ``signing_time`` (aware) becomes signingTime.
    """
    if signing_time.tzinfo is None:
        raise UsageError("signing_time must be timezone-aware")
    if econtent_type not in content_types:
        raise UsageError(f"eContentType {econtent_type} is not for vouchers")
    plan = _sign_plan(key, tuple(certs), econtent_type)
    message_digest = _digest(plan.hash_cls(), content)
    when = signing_time.astimezone(UTC).replace(microsecond=0)
    # RFC 5652 §11.3: UTCTime for 1950..2049, GeneralizedTime otherwise.
    # (formatted by hand: strftime costs more than the rest of this block)
    rest = (f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}"
            f"{when.second:02d}Z").encode()
    if 1950 <= when.year < 2050:  # the fixed bytes before the 13 characters, as the reader has
        time_attr = _ST_HEAD + f"{when.year % 100:02d}".encode() + rest
    else:
        time_tlv = der.tlv(der.GENERALIZED_TIME, f"{when.year:04d}".encode() + rest)
        time_attr = der.tlv(der.SEQUENCE, _OID_SIGNING_TIME, der.tlv(der.SET, time_tlv))
    # Written directly rather than through asn1crypto objects (the same DER; the App. C
    # vectors pin it): building them cost some 25 times the ECDSA signature.
    attrs = der.set_of(
        plan.content_type_attr,
        time_attr,
        _MD_HEAD_BY_SIZE[len(message_digest)] + message_digest,
    )  # fmt: skip
    signature = key.sign(attrs, plan.signature_scheme)
    # The nesting written inside out as header + body pieces, joined once at the end (the
    # same DER as nested der.tlv calls, which copied the whole message at every level).
    head = der.head
    sig_field = (head(der.OCTET_STRING, len(signature)), signature)
    signer_size = (len(plan.signer_head) + len(attrs) + len(plan.signature_algorithm)
                   + len(sig_field[0]) + len(signature))
    signer_head = head(der.SEQUENCE, signer_size)
    signer_infos = head(der.SET, len(signer_head) + signer_size)
    octets = head(der.OCTET_STRING, len(content))
    explicit = head(0xA0, len(octets) + len(content))
    encap_size = len(plan.econtent_oid) + len(explicit) + len(octets) + len(content)
    encap = head(der.SEQUENCE, encap_size)
    sd_size = (len(plan.version_and_digests) + len(encap) + encap_size + len(plan.certificates)
               + len(signer_infos) + len(signer_head) + signer_size)
    sd_head = head(der.SEQUENCE, sd_size)
    content_head = head(0xA0, len(sd_head) + sd_size)
    info_size = len(_OID_SIGNED_DATA) + len(content_head) + len(sd_head) + sd_size
    return b"".join((
        head(der.SEQUENCE, info_size), _OID_SIGNED_DATA, content_head, sd_head,
        plan.version_and_digests, encap, plan.econtent_oid, explicit, octets, content,
        plan.certificates, signer_infos, signer_head, plan.signer_head,
        b"\xa0", attrs[1:],  # [0] IMPLICIT SET OF
        plan.signature_algorithm, *sig_field,
    ))  # fmt: skip


@dataclass(frozen=True)
class _SignPlan:
    """The parts of a SignedData that depend only on the key, the certificates and the
    eContentType: the same for every voucher a MASA signs."""

    hash_cls: type[hashes.HashAlgorithm]
    signature_scheme: ec.ECDSA  # stateless: one object serves every signature
    content_type_attr: bytes  # the contentType signed attribute
    signer_head: bytes  # SignerInfo's version, issuerAndSerialNumber and digestAlgorithm
    signature_algorithm: bytes
    version_and_digests: bytes  # SignedData's version and digestAlgorithms
    econtent_oid: bytes
    certificates: bytes  # [0] certificates


# Kept per (key, eContentType, certificates): a rotated key or another chain is another key
# of this table, so it is worked out afresh. Keys compare by identity (the table holds them,
# so an identity is not reused while its entry lives); bounded like brski.chain's tables.
_SIGN_PLANS: dict[tuple[Any, ...], _SignPlan] = {}


def _sign_plan(key: SigningKey, certs: tuple[x509.Certificate, ...],
               econtent_type: str) -> _SignPlan:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"cannot sign CMS with a {type(key).__name__}")
    # the certificates by their DER: hashing a Certificate costs more than the rest of this
    index = (key, econtent_type, *map(certificate_der, certs))
    plan = _SIGN_PLANS.get(index)
    if plan is not None:
        return plan
    signer_cert = _signer_cert(key, certs)
    digest_name, sig_name = _algorithms(key)
    digest_alg = der.tlv(der.SEQUENCE, der.oid(_DIGEST_OIDS_BY_NAME[digest_name]))
    econtent_oid = der.oid(econtent_type)
    plan = _SignPlan(
        hash_cls=_DIGESTS[digest_name],
        signature_scheme=_ECDSA_SCHEMES[digest_name],
        content_type_attr=der.tlv(der.SEQUENCE, _OID_CONTENT_TYPE,
                                  der.tlv(der.SET, econtent_oid)),
        signer_head=der.integer(1) + _issuer_and_serial(signer_cert)[0] + digest_alg,
        signature_algorithm=der.tlv(der.SEQUENCE, der.oid(_SIG_OIDS_BY_NAME[sig_name])),
        # RFC 5652 §5.1: v3 when eContentType is not id-data, else v1.
        version_and_digests=der.integer(1 if econtent_type == DATA else 3)
        + der.tlv(der.SET, digest_alg),
        econtent_oid=econtent_oid,
        certificates=der.tlv(0xA0, *(_issuer_and_serial(c)[2] for c in certs)),
    )
    if len(_SIGN_PLANS) >= 64:  # a bound; a MASA has a handful of signers
        _SIGN_PLANS.clear()
    _SIGN_PLANS[index] = plan
    return plan


# by the certificate's DER (certificate equality is DER equality; chain.certificate_der keeps
# it per object, cheaper to look up than hashing the Certificate)
_ISSUER_AND_SERIAL: dict[bytes, tuple[bytes, bytes, bytes]] = {}


def _issuer_and_serial(cert: x509.Certificate) -> tuple[bytes, bytes, bytes]:
    """(IssuerAndSerialNumber, issuer Name, the certificate's DER), the Name exactly as the
    certificate has it. Kept per certificate: cryptography re-serialises on each call."""
    cert_der = certificate_der(cert)
    known = _ISSUER_AND_SERIAL.get(cert_der)
    if known is None:
        _, start, end = der.read(cert_der, 0, len(cert_der))
        _, pos, tbs_end = der.read(cert_der, start, end)
        # the first fields of the TBSCertificate only: [0] version, serial, signature, issuer
        tag, _, field_end = der.read(cert_der, pos, tbs_end)
        if tag == 0xA0:  # [0] EXPLICIT version
            pos = field_end
            field_end = der.read(cert_der, pos, tbs_end)[2]
        serial = cert_der[pos:field_end]
        pos = der.read(cert_der, field_end, tbs_end)[2]  # past the signature algorithm
        name = cert_der[pos : der.read(cert_der, pos, tbs_end)[2]]
        known = der.tlv(der.SEQUENCE, name, serial), name, cert_der
        if len(_ISSUER_AND_SERIAL) >= 256:  # a bound; a MASA has a handful of signers
            _ISSUER_AND_SERIAL.clear()
        _ISSUER_AND_SERIAL[cert_der] = known
    return known


def _signer_cert(key: SigningKey, certs: Sequence[x509.Certificate]) -> x509.Certificate:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"cannot sign CMS with a {type(key).__name__}")
    mine = key.public_key()
    for cert in certs:
        if cert.public_key() == mine:
            return cert
    raise UsageError("none of the certificates holds the signing key's public key")


def _algorithms(key: SigningKey) -> tuple[str, str]:
    """(digestAlgorithm, signatureAlgorithm) names for a key: hash strength follows the curve."""
    digest = _CURVE_DIGEST.get(key.curve.name)
    if digest is None:
        raise UsageError(f"unsupported curve {key.curve.name}")
    return digest, f"{digest}_ecdsa"


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    # hashlib's one C call for the SHA-2 family (the same OpenSSL digests), instead of
    # cryptography's three Python-level steps: this runs for every message signed or verified
    one_shot = _HASHLIB.get(algorithm.name)
    if one_shot is not None:
        return one_shot(data).digest()
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


_HASHLIB = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, ValueError):  # ValueError: malformed extensions
        return None
