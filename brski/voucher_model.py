"""The voucher data model: one leaf table for ``ietf-voucher`` and ``ietf-voucher-request``.

Both YANG modules share one grouping (RFC 8366 §5.3, RFC 8995 §3.3, rfc8366bis §6 and §7), so
both artifacts are described by one table, ``LEAVES``: each row gives a leaf's YANG name, its
type, its SID in each module (rfc8366bis ``*.sid`` files, SID ranges 2450+50 and 2500+50) and
whether it is valid in a voucher and in a voucher-request. The JSON and CBOR codecs
(``voucher_json``, ``voucher_cbor``) are driven by this table; nothing else lists leaves.

Two dataclasses share a base: ``Voucher`` (from the MASA) and ``VoucherRequest`` (pledge or
registrar). Leaves that are not valid in one of them (``proximity-registrar-cert`` in a voucher;
``pinned-domain-*``, ``domain-cert-revocation-checks``, ``last-renewal-date`` in a request, which
RFC 8995 §3.3 declares "not valid in a voucher request") are not fields of that class. In a
voucher-request the decoders ignore them (RFC 8995 §3.4: such leaves MUST be ignored) and keep
them with the unknown members; in a voucher they are refused with ``ValidationError``. Unknown
members are kept in ``WireForm`` and otherwise ignored (RFC 8995 §5.6.1: the pledge MUST ignore
unknown fields).

Values keep the text they arrived as (``WireForm.texts``): a JSON nonce in unpadded base64url
(RFC 8995 App. C) or a date with a local offset re-encodes byte for byte, and ``wire_text()``
lets a registrar compare nonces as text (RFC 8995 §5.8.1). Time is always a parameter.
"""

from __future__ import annotations

import abc
import binascii
import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_der_public_key

from .chain import load_certificate
from .errors import DecodeError, UsageError, ValidationError

VOUCHER_MODULE = "ietf-voucher"
VOUCHER_REQUEST_MODULE = "ietf-voucher-request"
VOUCHER_SID = 2451  # ietf-voucher:voucher (sx:structure), the absolute top-level CBOR key
VOUCHER_REQUEST_SID = 2501  # ietf-voucher-request:voucher

NONCE_MIN, NONCE_MAX = 8, 32  # rfc8366bis YANG: nonce type binary { length "8..32" }
SHA256_LEN = 32


class Assertion(enum.IntEnum):
    """rfc8366bis §8.5: CBOR carries the integer, JSON the name."""

    VERIFIED = 0
    LOGGED = 1
    PROXIMITY = 2
    AGENT_PROXIMITY = 3

    @property
    def yang_name(self) -> str:
        return _ASSERTION_NAMES[self]

    @classmethod
    def from_yang_name(cls, name: str) -> Assertion:
        member = _ASSERTIONS_BY_NAME.get(name) if isinstance(name, str) else None
        if member is None:
            raise ValidationError(f"unknown assertion {name!r}")
        return member

    @classmethod
    def from_int(cls, value: int) -> Assertion:
        try:
            return cls(value)
        except ValueError as exc:
            raise ValidationError(f"assertion {value} is not one of 0..3") from exc


# yang names both ways, worked out once (iterating an enum and building names is slow)
_ASSERTION_NAMES: dict[Assertion, str] = {a: a.name.lower().replace("_", "-") for a in Assertion}
_ASSERTIONS_BY_NAME: dict[str, Assertion] = {n: a for a, n in _ASSERTION_NAMES.items()}


class LeafType(enum.Enum):
    ASSERTION = "enumeration"
    BINARY = "binary"
    BOOLEAN = "boolean"
    DATETIME = "yang:date-and-time"
    EXTENSIONS = "leaf-list union uint64/string"
    STRING = "string"


@dataclass(frozen=True)
class Leaf:
    name: str  # YANG / JSON member name
    type: LeafType
    voucher_sid: int | None  # SID in ietf-voucher, None if the module has no such leaf
    request_sid: int | None  # SID in ietf-voucher-request
    in_voucher: bool
    in_request: bool

    @property
    def attr(self) -> str:
        return _ATTRS[self.name]

    def sid(self, request: bool) -> int | None:
        return self.request_sid if request else self.voucher_sid


_B, _D, _S = LeafType.BINARY, LeafType.DATETIME, LeafType.STRING
# name, type, ietf-voucher SID, ietf-voucher-request SID, valid in voucher, valid in request
LEAVES: tuple[Leaf, ...] = tuple(
    Leaf(*row)
    for row in (
        ("assertion", LeafType.ASSERTION, 2452, 2502, True, True),
        ("created-on", _D, 2453, 2503, True, True),
        # The request module inherits these three from the voucher grouping but RFC 8995 §3.3
        # refines them as "not valid in a voucher request".
        ("domain-cert-revocation-checks", LeafType.BOOLEAN, 2454, 2504, True, False),
        ("expires-on", _D, 2455, 2505, True, True),
        ("idevid-issuer", _B, 2456, 2506, True, True),
        ("last-renewal-date", _D, 2457, 2507, True, False),
        ("nonce", _B, 2458, 2508, True, True),
        ("pinned-domain-cert", _B, 2459, 2509, True, False),
        ("pinned-domain-pubk", _B, 2460, 2518, True, False),
        ("pinned-domain-pubk-sha256", _B, 2461, 2519, True, False),
        ("serial-number", _S, 2462, 2514, True, True),
        ("additional-configuration-url", _S, 2463, 2520, True, True),
        ("est-domain", _S, 2464, 2521, True, True),
        ("manufacturer-proprietary", _B, 2465, 2523, True, True),
        ("extensions", LeafType.EXTENSIONS, 2466, 2522, True, True),
        ("prior-signed-voucher-request", _B, None, 2510, False, True),
        ("proximity-registrar-cert", _B, None, 2511, False, True),
        ("proximity-registrar-pubk-sha256", _B, None, 2512, False, True),
        ("proximity-registrar-pubk", _B, None, 2513, False, True),
        ("agent-provided-proximity-registrar-cert", _B, None, 2515, False, True),
        ("agent-sign-cert", _B, None, 2516, False, True),
        ("agent-signed-data", _B, None, 2517, False, True),
    )
)
LEAF_BY_NAME: Mapping[str, Leaf] = MappingProxyType({leaf.name: leaf for leaf in LEAVES})
_ATTRS = {leaf.name: leaf.name.replace("-", "_") for leaf in LEAVES}


@dataclass(frozen=True)
class WireForm:
    """How an artifact looked on the wire, so that re-encoding reproduces it.

    ``texts``: the original JSON/CBOR text of binary and date leaves (used only while it still
    decodes to the field's value). ``order``: JSON member order as received. ``unknown_json`` /
    ``unknown_cbor``: members this model does not know (extension data), re-emitted only by the
    codec they came from.
    """

    texts: Mapping[str, str] = field(default_factory=dict)
    order: tuple[str, ...] = ()
    unknown_json: tuple[tuple[str, Any], ...] = ()
    unknown_cbor: tuple[tuple[Any, Any], ...] = ()


_NO_WIRE = WireForm()


def cbor_wire_form(texts: Mapping[str, str], unknown_cbor: tuple[tuple[Any, Any], ...]) -> WireForm:
    """``WireForm(texts=texts, unknown_cbor=unknown_cbor)``, made without the frozen
    __init__'s object.__setattr__ per field (one per voucher decoded)."""
    wire = object.__new__(WireForm)
    wire.__dict__.update(texts=texts, order=(), unknown_json=(), unknown_cbor=unknown_cbor)
    return wire


@dataclass(frozen=True, kw_only=True)
class VoucherArtifact(abc.ABC):
    """Leaves both artifacts have. Dates are timezone-aware; binaries are raw bytes."""

    MODULE: ClassVar[str]
    TOP_SID: ClassVar[int]
    IS_REQUEST: ClassVar[bool]

    serial_number: str
    assertion: Assertion | None = None
    created_on: datetime | None = None
    expires_on: datetime | None = None
    idevid_issuer: bytes | None = None
    nonce: bytes | None = None
    additional_configuration_url: str | None = None
    est_domain: str | None = None
    manufacturer_proprietary: bytes | None = None
    extensions: tuple[int | str, ...] = ()
    wire: WireForm = field(default=_NO_WIRE, compare=False, repr=False)

    @classmethod
    def leaves(cls) -> tuple[Leaf, ...]:
        """The leaves valid in this artifact, in SID order."""
        return _LEAVES_OF[cls.IS_REQUEST]

    @property
    def top_name(self) -> str:
        return f"{self.MODULE}:voucher"

    def present(self) -> dict[str, Any]:
        """YANG name -> value for every leaf that is set."""
        out: dict[str, Any] = {}
        fields = self.__dict__
        for name, attr, _ in _PLAN[self.IS_REQUEST]:
            value = fields[attr]
            if value is not None and value != ():
                out[name] = value
        return out

    def wire_text(self, name: str) -> str | None:
        """The text a binary or date leaf has in JSON: as received if unchanged, else canonical.

        Compare nonces with this when the peer's nonce may not be canonical base64
        (RFC 8995 §5.8.1: "this should not be assumed").
        """
        leaf = LEAF_BY_NAME.get(name)
        if leaf is None or leaf.type not in (LeafType.BINARY, LeafType.DATETIME):
            raise UsageError(f"{name!r} is not a binary or date leaf")
        value = getattr(self, leaf.attr, None)
        if value is None:
            return None
        original = self.wire.texts.get(name)
        if leaf.type is LeafType.BINARY:
            if original is not None and _b64_matches(original, value):
                return original
            return b64encode(value)
        if original is not None and _date_matches(original, value):
            return original
        return format_datetime(value)

    def check_types(self) -> None:
        """UsageError if a field holds the wrong Python type (hand-built artifacts)."""
        if not isinstance(self.serial_number, str):
            raise UsageError("serial-number must be a string")
        fields = self.__dict__  # a plain dataclass: every field is in it
        for name, attr, exact in _PLAN[self.IS_REQUEST]:
            value = fields[attr]
            # The usual case first, by exact type (bytes, str, bool, Assertion); anything
            # else, or a type with more to check (datetime, extensions), goes the long way.
            if value is None or type(value) is exact:
                continue
            if value != ():
                check_type(LEAF_BY_NAME[name], value)

    def validate(self, *, now: datetime | None = None) -> None:
        """Raise ValidationError if a rule of RFC 8366 / RFC 8995 / rfc8366bis is broken.

        ``now`` (aware datetime), if given, is checked against expires-on.
        """
        self.check_types()
        self.validate_decoded(now=now)

    def validate_decoded(self, *, now: datetime | None = None) -> None:
        """``validate`` less the Python type checks, for an artifact a codec just decoded:
        the decoders give every leaf its type, so check_types cannot fail there (a verifier
        validates each voucher it reads)."""
        if now is not None and now.tzinfo is None:
            raise UsageError("now must be timezone-aware")
        if not self.serial_number:
            raise ValidationError("serial-number is mandatory and empty")
        if self.nonce is not None and not NONCE_MIN <= len(self.nonce) <= NONCE_MAX:
            raise ValidationError(
                f"nonce is {len(self.nonce)} bytes, must be {NONCE_MIN}..{NONCE_MAX}"
            )
        if now is not None and self.expires_on is not None and now > self.expires_on:
            raise ValidationError(f"expired at {format_datetime(self.expires_on)}")
        self._validate_kind()

    @abc.abstractmethod
    def _validate_kind(self) -> None:
        """The checks only one kind of artifact has."""


@dataclass(frozen=True, kw_only=True)
class Voucher(VoucherArtifact):
    """An ``ietf-voucher:voucher`` (RFC 8366, rfc8366bis)."""

    MODULE: ClassVar[str] = VOUCHER_MODULE
    TOP_SID: ClassVar[int] = VOUCHER_SID
    IS_REQUEST: ClassVar[bool] = False

    domain_cert_revocation_checks: bool | None = None
    last_renewal_date: datetime | None = None
    pinned_domain_cert: bytes | None = None
    pinned_domain_pubk: bytes | None = None
    pinned_domain_pubk_sha256: bytes | None = None

    def _validate_kind(self) -> None:
        if self.nonce is not None and self.expires_on is not None:
            # RFC 8366 YANG: nonce "must 'not(../expires-on)'" and the converse.
            raise ValidationError("a voucher carries either nonce or expires-on, not both")
        if self.last_renewal_date is not None and self.expires_on is None:
            raise ValidationError("last-renewal-date needs expires-on")
        if self.pinned_domain_cert is None and self.pinned_domain_pubk is None \
                and self.pinned_domain_pubk_sha256 is None:
            raise ValidationError(
                "a voucher needs pinned-domain-cert, pinned-domain-pubk or "
                "pinned-domain-pubk-sha256"
            )
        if self.pinned_domain_cert is not None:
            cert = _require_cert("pinned-domain-cert", self.pinned_domain_cert)
            # protocols.md §2.3 (RFC 8366): expires-on MUST NOT exceed the pinned cert's expiry
            if self.expires_on is not None and self.expires_on > cert.not_valid_after_utc:
                raise ValidationError("expires-on is after pinned-domain-cert expires")
        if self.pinned_domain_pubk is not None:
            _require_spki("pinned-domain-pubk", self.pinned_domain_pubk)
        if self.pinned_domain_pubk_sha256 is not None:
            _require_sha256("pinned-domain-pubk-sha256", self.pinned_domain_pubk_sha256)


@dataclass(frozen=True, kw_only=True)
class VoucherRequest(VoucherArtifact):
    """An ``ietf-voucher-request:voucher``: pledge (PVR) or registrar (RVR) voucher-request."""

    MODULE: ClassVar[str] = VOUCHER_REQUEST_MODULE
    TOP_SID: ClassVar[int] = VOUCHER_REQUEST_SID
    IS_REQUEST: ClassVar[bool] = True

    prior_signed_voucher_request: bytes | None = None
    proximity_registrar_cert: bytes | None = None
    proximity_registrar_pubk: bytes | None = None
    proximity_registrar_pubk_sha256: bytes | None = None
    agent_provided_proximity_registrar_cert: bytes | None = None
    agent_sign_cert: bytes | None = None
    agent_signed_data: bytes | None = None

    def _validate_kind(self) -> None:
        if self.proximity_registrar_cert is not None:
            _require_cert("proximity-registrar-cert", self.proximity_registrar_cert)
        if self.proximity_registrar_pubk is not None:
            _require_spki("proximity-registrar-pubk", self.proximity_registrar_pubk)
        if self.proximity_registrar_pubk_sha256 is not None:
            _require_sha256("proximity-registrar-pubk-sha256", self.proximity_registrar_pubk_sha256)


ARTIFACT_CLASSES: tuple[type[VoucherArtifact], ...] = (Voucher, VoucherRequest)


def artifact_class(top: str | int) -> type[VoucherArtifact] | None:
    """The class whose top-level JSON name or absolute SID this is."""
    for cls in ARTIFACT_CLASSES:
        # type() rather than ==: a CBOR float 2451.0 or bool must not pass for the SID
        if (type(top) is str and top == f"{cls.MODULE}:voucher") or (
            type(top) is int and top == cls.TOP_SID
        ):
            return cls
    return None


def ignored_in(cls: type[VoucherArtifact], leaf: Leaf) -> bool:
    """True for a voucher-only leaf in a voucher-request: RFC 8995 §3.4 says the registrar and
    MASA MUST ignore those, so the codecs keep them as unknown members, unread."""
    return cls.IS_REQUEST and not leaf.in_request


def build(cls: type[VoucherArtifact], values: dict[str, Any], wire: WireForm) -> VoucherArtifact:
    """Make an artifact from decoded leaf values (YANG name -> typed value).

    Shared by both codecs: rejects leaves of the other module and a missing serial-number.
    """
    kind = "voucher-request" if cls.IS_REQUEST else "voucher"
    attrs = _ATTR_IN[cls.IS_REQUEST]
    # The field values as the dataclass __init__ would set them: the defaults, then the
    # leaves given. Set directly: a frozen dataclass's __init__ goes through
    # object.__setattr__ once per field (17), which cost a verifier more than the CBOR.
    fields = dict(_DEFAULTS[cls])
    for name, value in values.items():
        attr = attrs.get(name)
        if attr is None:
            raise ValidationError(f"{name} is not valid in a {kind}")
        fields[attr] = value
    if fields["serial_number"] is _UNSET:
        raise ValidationError(f"{kind} has no serial-number (mandatory)")
    fields["wire"] = wire
    artifact = object.__new__(cls)
    artifact.__dict__.update(fields)
    return artifact



# YANG name -> attribute of the leaves valid in each kind (key: IS_REQUEST), and each class's
# fields in their order with their defaults (none is a default_factory; the one field without
# a default, serial_number, starts _UNSET), for build().
_UNSET: Any = object()
_ATTR_IN: dict[bool, dict[str, str]] = {
    request: {lf.name: lf.attr for lf in LEAVES if (lf.in_request if request else lf.in_voucher)}
    for request in (False, True)
}
_DEFAULTS: dict[type, dict[str, Any]] = {
    cls: {f.name: _UNSET if f.default is dataclasses.MISSING else f.default
          for f in dataclasses.fields(cls)}
    for cls in ARTIFACT_CLASSES
}
if any(f.default_factory is not dataclasses.MISSING  # build() would leave _UNSET there
       for cls in ARTIFACT_CLASSES for f in dataclasses.fields(cls)):
    raise TypeError("voucher_model.build() cannot fill a field with a default_factory")

# --- value checks ------------------------------------------------------------------------


def check_type(leaf: Leaf, value: Any) -> None:
    """Callers may build artifacts by hand: catch wrong Python types (UsageError) before
    encoding. Decoded artifacts always pass."""
    if not isinstance(value, _PY_TYPES[leaf.name]):
        raise UsageError(f"{leaf.name} must be {leaf.type.value}, got {type(value).__name__}")
    if leaf.type is LeafType.DATETIME and value.tzinfo is None:
        raise UsageError(f"{leaf.name} must be timezone-aware")
    if leaf.type is LeafType.EXTENSIONS:
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise UsageError("extensions holds uint64 or string items only")
            if isinstance(item, int) and not 0 <= item < 2**64:
                raise UsageError("extensions SID out of uint64 range")


_PY_TYPES: dict[str, tuple[type, ...]] = {
    leaf.name: {
        LeafType.ASSERTION: (Assertion,),
        LeafType.BINARY: (bytes,),
        LeafType.BOOLEAN: (bool,),
        LeafType.DATETIME: (datetime,),
        LeafType.EXTENSIONS: (tuple,),
        LeafType.STRING: (str,),
    }[leaf.type]
    for leaf in LEAVES
}
# Exact Python types that need no further check (check_types' fast path).
_PLAIN_TYPES: dict[LeafType, type | None] = {
    LeafType.ASSERTION: Assertion, LeafType.BINARY: bytes, LeafType.BOOLEAN: bool,
    LeafType.STRING: str, LeafType.DATETIME: None, LeafType.EXTENSIONS: None}
# The leaves of each artifact kind (key: IS_REQUEST), in SID order; worked out once.
_LEAVES_OF: dict[bool, tuple[Leaf, ...]] = {
    request: tuple(sorted(
        (lf for lf in LEAVES if (lf.in_request if request else lf.in_voucher)),
        key=lambda leaf, request=request: leaf.sid(request) or 0,
    ))
    for request in (False, True)
}
# (name, attribute, exact plain type or None) of the same leaves, for present/check_types.
_PLAN: dict[bool, tuple[tuple[str, str, type | None], ...]] = {
    request: tuple((lf.name, lf.attr, _PLAIN_TYPES[lf.type]) for lf in leaves)
    for request, leaves in _LEAVES_OF.items()
}


def _require_cert(name: str, der: bytes) -> x509.Certificate:
    try:
        return load_certificate(der, name)
    except DecodeError as exc:
        raise ValidationError(f"{name} is not a DER X.509 certificate: {exc}") from exc


def _require_spki(name: str, der: bytes) -> None:
    if der in _SPKIS_READ:
        return  # a registrar's key comes with each of its requests; loading it checks the point
    try:
        load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValidationError(f"{name} is not a DER SubjectPublicKeyInfo") from exc
    if len(_SPKIS_READ) >= 256:  # a bound
        _SPKIS_READ.clear()
    _SPKIS_READ.add(bytes(der))


# SubjectPublicKeyInfo DER that loaded before (only successes: the answer depends on the bytes)
_SPKIS_READ: set[bytes] = set()


def _require_sha256(name: str, value: bytes) -> None:
    if len(value) != SHA256_LEN:
        raise ValidationError(f"{name} must be a {SHA256_LEN}-byte SHA-256 hash")


# --- base64 (RFC 7951 §6.6 binary) ---------------------------------------------------------

_B64_CHARS = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")


def b64encode(data: bytes) -> str:
    """RFC 4648 §4 base64 with padding, as RFC 7951 prescribes for binary."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def b64decode_lenient(text: str) -> bytes:
    """Standard base64 or base64url, padded or not: Minerva (RFC 8995 App. C) sends unpadded
    base64url nonces. Mixing the two alphabets, bad padding and whitespace are refused."""
    if len(text) % 4 == 0 and "-" not in text and "_" not in text:
        # The usual form, padded standard base64 (what we and most peers send): binascii's
        # strict mode accepts a subset of what the checks below accept, with the same bytes.
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except ValueError:  # binascii.Error, or non-ASCII text: the checks below say which
            pass
    if not _B64_CHARS.fullmatch(text):
        raise DecodeError("binary value is not base64 text")
    body = text.rstrip("=")
    url = "-" in body or "_" in body
    if url and ("+" in body or "/" in body):
        raise DecodeError("binary value mixes base64 and base64url alphabets")
    if len(body) % 4 == 1 or (body != text and len(text) % 4):
        raise DecodeError("binary value has a bad base64 length or padding")
    if url:
        body = body.translate(str.maketrans("-_", "+/"))
    try:
        return binascii.a2b_base64(body + "=" * (-len(body) % 4), strict_mode=True)
    except binascii.Error as exc:
        raise DecodeError("binary value is not valid base64 (bad padding)") from exc


def _b64_matches(text: str, value: bytes) -> bool:
    try:
        return b64decode_lenient(text) == value
    except DecodeError:
        return False


# --- yang:date-and-time (RFC 6991, RFC 3339) -----------------------------------------------

_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_datetime(text: str) -> datetime:
    """A yang:date-and-time as an aware datetime (microsecond precision; a leap second 60 is
    read as 59 — the original text is kept for re-encoding)."""
    match = _DATE.fullmatch(text)
    if match is None:
        raise DecodeError(f"not a yang:date-and-time: {text[:40]!r}")
    if len(text) == 20 and text[11:13] < "24" and text[17:19] < "60":
        # The usual form, whole seconds in UTC ("...T12:00:00Z", what we and most peers
        # write): the C parser makes the same datetime; hour and second are checked above
        # because it is not the arbiter of their range.
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass  # a day or month out of range: the long way says so
    groups = match.groups()
    year, month, day = int(groups[0]), int(groups[1]), int(groups[2])
    hour, minute, second = int(groups[3]), int(groups[4]), int(groups[5])
    fraction, offset = groups[6], groups[7]
    micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
    try:
        if offset == "Z":
            tz: timezone = UTC
        else:
            sign = -1 if offset[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        return datetime(year, month, day, hour, minute, min(second, 59), micro, tzinfo=tz)
    except ValueError as exc:
        raise DecodeError(f"not a valid date-and-time: {text[:40]!r}: {exc}") from exc


def format_datetime(value: datetime) -> str:
    """The form we emit: the value's own offset ("Z" when zero), fraction only when non-zero.

    Written out by hand: strftime does not zero-pad years below 1000 on every platform.
    """
    if value.tzinfo is UTC:  # the usual case: isoformat writes the same digits, in C
        text = value.replace(tzinfo=None).isoformat()  # fraction: six digits, when non-zero
        return (text.rstrip("0") if value.microsecond else text) + "Z"
    offset = value.utcoffset()
    if offset is None:
        raise UsageError("dates must be timezone-aware")
    if offset % timedelta(minutes=1):
        raise UsageError("date-and-time offsets are whole minutes")
    text = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    if value.microsecond:
        text += "." + f"{value.microsecond:06d}".rstrip("0")
    if not offset:
        return text + "Z"
    minutes = abs(offset) // timedelta(minutes=1)
    return f"{text}{'-' if offset < timedelta(0) else '+'}{minutes // 60:02d}:{minutes % 60:02d}"


def _date_matches(text: str, value: datetime) -> bool:
    try:
        return parse_datetime(text) == value
    except DecodeError:
        return False
