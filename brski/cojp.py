"""CoJP objects of RFC 9031 §8.4: the Join_Request and the Configuration.

The Constrained Join Protocol (6TiSCH minimal security) carries two CBOR maps inside OSCORE:
a pledge's Join_Request and the JRC's Configuration (the Join Response payload, and the payload
of a Parameter Update the JRC sends to a joined node). Map labels are the ones IANA registered
(RFC 9031 §11.1): 1 role, 2 link-layer key set, 3 short identifier, 4 JRC address, 5 network
identifier, 6 blacklist, 7 join rate, 8 unsupported configuration. Pre-RFC code (openwsn,
openvisualizer) used 6 for a network prefix; that meaning is refused here, not guessed.

Parsing is strict: a label the object does not define, a value of the wrong CBOR type, an
out-of-range number or an oversized object raises DecodeError/ValidationError naming the label.
Encoding is byte-exact and deterministic (labels in ascending order, shortest integer forms),
so the RFC's Appendix A examples encode to the bytes printed there. A Parameter Update
(§8.2, JRC -> joined node) carries the same Configuration object. Sans-IO: no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Final

import cbor2

from .cbor_strict import loads_exact
from .errors import DecodeError, UsageError, ValidationError

# A Configuration with a few keys and a blacklist of pledge IDs is well under 1 KiB; the payload
# arrives inside OSCORE inside one UDP datagram, so anything near this size is an attack.
MAX_OBJECT_SIZE: Final = 1024
MAX_BLACKLIST: Final = 64  # entries; a JRC that needs more should rotate keys instead
MAX_PLEDGE_ID: Final = 32  # bytes; pledge IDs are EUI-64s in practice (§3)
MAX_NETWORK_ID: Final = 32  # bytes; a PAN ID is 2, the RFC sets no upper bound
MAX_KEY_ID: Final = 254  # IEEE 802.15.4 key index range used by §8.4.3.1
MAX_UINT64: Final = 2**64 - 1


class Label(IntEnum):
    """CoJP parameter labels (RFC 9031 §8.4, IANA "CoJP Parameters")."""

    ROLE = 1
    LINK_LAYER_KEY_SET = 2
    SHORT_IDENTIFIER = 3
    JRC_ADDRESS = 4
    NETWORK_IDENTIFIER = 5
    BLACKLIST = 6
    JOIN_RATE = 7
    UNSUPPORTED_CONFIGURATION = 8


class Role(IntEnum):
    """Join_Request role (RFC 9031 §8.4.1, IANA "CoJP Pledge Roles")."""

    NODE = 0  # 6TiSCH Node
    LBR = 1  # 6LBR


class KeyUsage(IntEnum):
    """Link-layer key usage (RFC 9031 §8.4.3.1, IANA "CoJP Key Usage"), all AES-CCM-128."""

    K1K2_ENC_MIC32 = 0
    K1K2_ENC_MIC64 = 1
    K1K2_ENC_MIC128 = 2
    K1K2_MIC32 = 3
    K1K2_MIC64 = 4
    K1K2_MIC128 = 5
    K1_MIC32 = 6
    K1_MIC64 = 7
    K1_MIC128 = 8
    K2_MIC32 = 9
    K2_MIC64 = 10
    K2_MIC128 = 11
    K2_ENC_MIC32 = 12
    K2_ENC_MIC64 = 13
    K2_ENC_MIC128 = 14


class UnsupportedCode(IntEnum):
    """Unsupported_Configuration codes (RFC 9031 §8.4.5, IANA "CoJP Unsupported ... Codes")."""

    UNSUPPORTED = 0
    MALFORMED = 1


class ObjectError(ValidationError):
    """A CoJP object refused: ``label`` (None if no label applies) and the code a diagnostic
    response's Unsupported_Configuration reports for it (RFC 9031 §8.3.2, §8.4.5)."""

    def __init__(self, reason: str, label: int | None, code: UnsupportedCode) -> None:
        super().__init__(reason)
        self.label = label
        self.code = code


AES_CCM_128_KEY: Final = 16
SHORT_ID_RESERVED: Final = (b"\xff\xfe", b"\xff\xff")  # IEEE 802.15.4 "no short address"


@dataclass(frozen=True, slots=True)
class LinkLayerKey:
    """One key of the link-layer key set; ``key_usage`` None means absent (default 0)."""

    key_id: int
    key_value: bytes
    key_usage: int | None = None
    key_addinfo: bytes | None = None

    def __post_init__(self) -> None:
        _check(lambda: _key_fields(self), UsageError)


@dataclass(frozen=True, slots=True)
class ShortIdentifier:
    """A 2-byte 802.15.4 short address and its lease in hours (None = never expires)."""

    identifier: bytes
    lease_time: int | None = None

    def __post_init__(self) -> None:
        _check(lambda: _short_id_fields(self), UsageError)


@dataclass(frozen=True, slots=True)
class UnsupportedParameter:
    """One entry of an Unsupported_Configuration: why the sender refused parameter ``label``."""

    code: int
    label: int
    addinfo: Any = None

    def __post_init__(self) -> None:
        _check(lambda: _unsupported_fields(self), UsageError)


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """The pledge's Join_Request. ``role`` None means the label is absent (default: node)."""

    network_identifier: bytes
    role: int | None = None
    unsupported: tuple[UnsupportedParameter, ...] | None = None

    def __post_init__(self) -> None:
        _check(lambda: _join_request_fields(self), UsageError)

    @property
    def effective_role(self) -> Role:
        return Role(self.role or 0)

    def encode(self) -> bytes:
        body: dict[int, Any] = {}
        if self.role is not None:
            body[Label.ROLE] = self.role
        body[Label.NETWORK_IDENTIFIER] = self.network_identifier
        if self.unsupported is not None:
            body[Label.UNSUPPORTED_CONFIGURATION] = _flat_unsupported(self.unsupported)
        return _dump(body)


@dataclass(frozen=True, slots=True)
class Configuration:
    """The JRC's Configuration object; every field is optional (None = label absent)."""

    link_layer_keys: tuple[LinkLayerKey, ...] | None = None
    short_identifier: ShortIdentifier | None = None
    jrc_address: bytes | None = None
    blacklist: tuple[bytes, ...] | None = None
    join_rate: int | None = None

    def __post_init__(self) -> None:
        _check(lambda: _configuration_fields(self), UsageError)

    def encode(self) -> bytes:
        body: dict[int, Any] = {}
        if self.link_layer_keys is not None:
            body[Label.LINK_LAYER_KEY_SET] = _flat_keys(self.link_layer_keys)
        if self.short_identifier is not None:
            sid = self.short_identifier
            body[Label.SHORT_IDENTIFIER] = [sid.identifier] + (
                [] if sid.lease_time is None else [sid.lease_time])
        if self.jrc_address is not None:
            body[Label.JRC_ADDRESS] = self.jrc_address
        if self.blacklist is not None:
            body[Label.BLACKLIST] = list(self.blacklist)
        if self.join_rate is not None:
            body[Label.JOIN_RATE] = self.join_rate
        return _dump(body)


# ---------------------------------------------------------------------------------- decoding

def decode_join_request(data: bytes) -> JoinRequest:
    """Parse a Join_Request strictly; DecodeError/ValidationError name the offending label."""
    body = _load_map(data, "CoJP Join_Request")
    _only_labels(body, {Label.ROLE, Label.NETWORK_IDENTIFIER, Label.UNSUPPORTED_CONFIGURATION},
                 "Join_Request")
    if Label.NETWORK_IDENTIFIER not in body:
        raise ObjectError("CoJP Join_Request: network identifier (label 5) is missing",
                          Label.NETWORK_IDENTIFIER, UnsupportedCode.MALFORMED)
    unsupported = body.get(Label.UNSUPPORTED_CONFIGURATION)
    return _check(lambda: _validated(
        JoinRequest, _join_request_fields,
        network_identifier=body[Label.NETWORK_IDENTIFIER],
        role=body.get(Label.ROLE),
        unsupported=None if unsupported is None else _parse_unsupported(unsupported),
    ), ValidationError, "Join_Request")


def decode_configuration(data: bytes) -> Configuration:
    """Parse a Configuration strictly (labels 2, 3, 4, 6, 7 only)."""
    body = _load_map(data, "CoJP Configuration")
    _only_labels(body, {Label.LINK_LAYER_KEY_SET, Label.SHORT_IDENTIFIER, Label.JRC_ADDRESS,
                        Label.BLACKLIST, Label.JOIN_RATE}, "Configuration")
    keys = body.get(Label.LINK_LAYER_KEY_SET)
    sid = body.get(Label.SHORT_IDENTIFIER)
    blacklist = body.get(Label.BLACKLIST)
    return _check(lambda: _validated(
        Configuration, _configuration_fields,
        link_layer_keys=None if keys is None else _parse_keys(keys),
        short_identifier=None if sid is None else _parse_short_id(sid),
        jrc_address=body.get(Label.JRC_ADDRESS),
        blacklist=None if blacklist is None else _parse_blacklist(blacklist),
        join_rate=body.get(Label.JOIN_RATE),
    ), ValidationError, "Configuration")


def decode_unsupported_configuration(data: bytes) -> tuple[UnsupportedParameter, ...]:
    """Parse a bare Unsupported_Configuration (the payload of a 4.00 diagnostic response)."""
    return _check(lambda: _parse_unsupported(loads_exact(data, "CoJP Unsupported_Configuration",
                                                         MAX_OBJECT_SIZE)),
                  ValidationError, "Unsupported_Configuration")


def encode_unsupported_configuration(entries: tuple[UnsupportedParameter, ...]) -> bytes:
    if not entries:
        raise UsageError("an Unsupported_Configuration needs at least one entry")
    return _dump(_flat_unsupported(entries))


# ---------------------------------------------------------------------------------- internals

class _FieldError(Exception):
    """A field check failed; _check turns it into the caller's error class."""

    def __init__(self, reason: str, label: int) -> None:
        super().__init__(reason)
        self.label = label


def _check(build: Any, error: type[Exception], what: str | None = None) -> Any:
    try:
        return build()
    except _FieldError as exc:
        text = f"CoJP {what}: {exc}" if what else f"CoJP: {exc}"
        if error is ValidationError:
            raise ObjectError(text, exc.label, UnsupportedCode.MALFORMED) from None
        raise error(text) from None


def _validated(cls: type, check: Any, **values: Any) -> Any:
    """Build a frozen dataclass from wire values, checked by ``check`` (a _FieldError escapes)."""
    obj = cls.__new__(cls)
    for f in fields(cls):
        object.__setattr__(obj, f.name, values.get(f.name))
    check(obj)
    return obj


def _dump(body: Any) -> bytes:
    if isinstance(body, dict):
        body = {int(label): value for label, value in body.items()}
    encoded = cbor2.dumps(body, canonical=True)
    if len(encoded) > MAX_OBJECT_SIZE:
        raise UsageError(f"CoJP object of {len(encoded)} bytes exceeds {MAX_OBJECT_SIZE}")
    return encoded


def _load_map(data: bytes, what: str) -> dict[Any, Any]:
    if not isinstance(data, (bytes, bytearray)):
        raise UsageError(f"{what} must be bytes")
    if len(data) > MAX_OBJECT_SIZE:
        raise DecodeError(f"{what} of {len(data)} bytes exceeds {MAX_OBJECT_SIZE}")
    body = loads_exact(bytes(data), what, MAX_OBJECT_SIZE)
    if not isinstance(body, dict):
        raise ValidationError(f"{what} is a {type(body).__name__}, not a CBOR map")
    return body


def _only_labels(body: dict[Any, Any], allowed: set[Label], what: str) -> None:
    for label in body:
        if not _integer(label):
            raise ObjectError(f"CoJP {what}: map key {label!r} is not an integer label",
                              None, UnsupportedCode.MALFORMED)
        if label not in allowed:
            known = Label(label).name.lower() if label in Label._value2member_map_ else "unknown"
            raise ObjectError(f"CoJP {what}: label {label} ({known}) is not allowed in a {what}",
                              label, UnsupportedCode.UNSUPPORTED)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_uint(value: Any) -> bool:
    return _integer(value) and 0 <= value <= MAX_UINT64


def _is_int(value: Any) -> bool:
    return _integer(value) and -(2**64) <= value <= MAX_UINT64


def _need(label: int, ok: bool, reason: str) -> None:
    if not ok:
        raise _FieldError(reason, label)


def _key_fields(key: LinkLayerKey) -> None:
    _need(Label.LINK_LAYER_KEY_SET, _integer(key.key_id) and 0 <= key.key_id <= MAX_KEY_ID,
          f"link-layer key_id must be an integer 0..{MAX_KEY_ID}")
    _need(Label.LINK_LAYER_KEY_SET,
          key.key_usage is None or _is_int(key.key_usage), "link-layer key_usage must be an int")
    _need(Label.LINK_LAYER_KEY_SET,
          isinstance(key.key_value, bytes), "link-layer key_value must be a byte string")
    registered = key.key_usage is None or key.key_usage in KeyUsage._value2member_map_
    if registered:
        _need(Label.LINK_LAYER_KEY_SET, len(key.key_value) == AES_CCM_128_KEY,
              f"link-layer key_value must be {AES_CCM_128_KEY} bytes (AES-CCM-128), "
              f"not {len(key.key_value)}")
    else:
        _need(Label.LINK_LAYER_KEY_SET,
              0 < len(key.key_value) <= 64, "link-layer key_value must be 1..64 bytes")
    _need(Label.LINK_LAYER_KEY_SET,
          key.key_addinfo is None
          or (isinstance(key.key_addinfo, bytes) and len(key.key_addinfo) <= 16),
          "link-layer key_addinfo must be a byte string of at most 16 bytes")


def _short_id_fields(sid: ShortIdentifier) -> None:
    _need(Label.SHORT_IDENTIFIER, isinstance(sid.identifier, bytes) and len(sid.identifier) == 2,
          "short identifier must be a 2-byte string")
    _need(Label.SHORT_IDENTIFIER, sid.identifier not in SHORT_ID_RESERVED,
          f"short identifier {sid.identifier.hex()} is reserved by IEEE 802.15.4")
    _need(Label.SHORT_IDENTIFIER, sid.lease_time is None or _is_uint(sid.lease_time),
          "short identifier lease_time must be an unsigned integer (hours)")


def _join_request_fields(req: JoinRequest) -> None:
    _need(Label.NETWORK_IDENTIFIER, isinstance(req.network_identifier, bytes)
          and 0 < len(req.network_identifier) <= MAX_NETWORK_ID,
          f"network identifier (label 5) must be a byte string of 1..{MAX_NETWORK_ID} bytes")
    _need(Label.ROLE,
          req.role is None or (_integer(req.role) and req.role in Role._value2member_map_),
          f"role (label 1) must be one of {[r.value for r in Role]}, not {req.role!r}")
    if req.unsupported is not None:
        _need(Label.UNSUPPORTED_CONFIGURATION,
              isinstance(req.unsupported, tuple) and len(req.unsupported) > 0,
              "unsupported configuration (label 8) needs at least one entry")
        for entry in req.unsupported:
            _unsupported_fields(entry)


def _unsupported_fields(entry: UnsupportedParameter) -> None:
    _need(Label.UNSUPPORTED_CONFIGURATION,
          _is_int(entry.code), "unsupported configuration code must be an int")
    _need(Label.UNSUPPORTED_CONFIGURATION,
          _is_int(entry.label), "unsupported configuration parameter_label must be an int")


def _configuration_fields(conf: Configuration) -> None:
    if conf.link_layer_keys is not None:
        _need(Label.LINK_LAYER_KEY_SET,
              isinstance(conf.link_layer_keys, tuple) and len(conf.link_layer_keys) > 0,
              "link-layer key set (label 2) needs at least one key")
        for key in conf.link_layer_keys:
            _need(Label.LINK_LAYER_KEY_SET,
                  isinstance(key, LinkLayerKey), "link-layer key set holds LinkLayerKey items")
    _need(Label.SHORT_IDENTIFIER,
          conf.short_identifier is None or isinstance(conf.short_identifier, ShortIdentifier),
          "short identifier (label 3) must be a ShortIdentifier")
    _need(Label.JRC_ADDRESS, conf.jrc_address is None
          or (isinstance(conf.jrc_address, bytes) and len(conf.jrc_address) == 16),
          "JRC address (label 4) must be a 16-byte IPv6 address")
    if conf.blacklist is not None:
        _need(Label.BLACKLIST,
              isinstance(conf.blacklist, tuple) and len(conf.blacklist) <= MAX_BLACKLIST,
              f"blacklist (label 6) must be a list of at most {MAX_BLACKLIST} pledge IDs")
        for pledge_id in conf.blacklist:
            _need(Label.BLACKLIST,
                  isinstance(pledge_id, bytes) and 0 < len(pledge_id) <= MAX_PLEDGE_ID,
                  f"blacklist (label 6) entries must be pledge IDs of 1..{MAX_PLEDGE_ID} bytes")
    _need(Label.JOIN_RATE, conf.join_rate is None or _is_uint(conf.join_rate),
          "join rate (label 7) must be an unsigned integer (bytes per second)")


def _parse_keys(raw: Any) -> tuple[LinkLayerKey, ...]:
    """Split the flat key array by CBOR type: uint key_id, ? int usage, bstr value, ? bstr info."""
    _need(Label.LINK_LAYER_KEY_SET,
          isinstance(raw, list) and raw, "link-layer key set (label 2) must be a non-empty array")
    keys: list[LinkLayerKey] = []
    pos = 0
    while pos < len(raw):
        key_id = raw[pos]
        _need(Label.LINK_LAYER_KEY_SET,
              _integer(key_id), f"link-layer key set item {pos} must be a key_id (uint)")
        pos += 1
        usage = None
        if pos < len(raw) and _integer(raw[pos]):
            usage = raw[pos]
            pos += 1
        _need(Label.LINK_LAYER_KEY_SET, pos < len(raw) and isinstance(raw[pos], bytes),
              f"link-layer key set item {pos} must be a key_value (bstr)")
        value = raw[pos]
        pos += 1
        addinfo = None
        if pos < len(raw) and isinstance(raw[pos], bytes):
            addinfo = raw[pos]
            pos += 1
        keys.append(_validated(LinkLayerKey, _key_fields, key_id=key_id, key_value=value,
                               key_usage=usage, key_addinfo=addinfo))
    return tuple(keys)


def _flat_keys(keys: tuple[LinkLayerKey, ...]) -> list[Any]:
    flat: list[Any] = []
    for key in keys:
        flat.append(key.key_id)
        if key.key_usage is not None:
            flat.append(key.key_usage)
        flat.append(key.key_value)
        if key.key_addinfo is not None:
            flat.append(key.key_addinfo)
    return flat


def _parse_short_id(raw: Any) -> ShortIdentifier:
    _need(Label.SHORT_IDENTIFIER, isinstance(raw, list) and 1 <= len(raw) <= 2,
          "short identifier (label 3) must be [identifier, ? lease_time]")
    return _validated(ShortIdentifier, _short_id_fields, identifier=raw[0],
                      lease_time=raw[1] if len(raw) == 2 else None)


def _parse_blacklist(raw: Any) -> tuple[bytes, ...]:
    _need(Label.BLACKLIST,
          isinstance(raw, list), "blacklist (label 6) must be an array of pledge IDs "
          "(not openwsn's pre-RFC network prefix)")
    return tuple(raw)


def _parse_unsupported(raw: Any) -> tuple[UnsupportedParameter, ...]:
    _need(Label.UNSUPPORTED_CONFIGURATION, isinstance(raw, list) and raw and len(raw) % 3 == 0,
          "unsupported configuration (label 8) must be a non-empty array of "
          "(code, parameter_label, parameter_addinfo) triples")
    return tuple(_validated(UnsupportedParameter, _unsupported_fields, code=raw[i],
                            label=raw[i + 1], addinfo=raw[i + 2])
                 for i in range(0, len(raw), 3))


def _flat_unsupported(entries: tuple[UnsupportedParameter, ...]) -> list[Any]:
    flat: list[Any] = []
    for entry in entries:
        flat.extend((entry.code, entry.label, entry.addinfo))
    return flat
