"""Status telemetry and the MASA audit log.

Status telemetry (RFC 8995 §5.7 voucher_status, §5.9.4 enrollstatus; one shape for both):

    { "version": uint, "status": bool, ? "reason": text, ? "reason-context": { * any => any } }

sent as JSON (``application/json``) in BRSKI and as a CBOR map with the same text keys
(Content-Format 60) in cBRSKI. The registrar receives these: unknown top-level keys are ignored
(a newer pledge may add some), a higher version is accepted and left to the caller to log
(§5.9.4 asks for a human to be alerted).

Audit log (RFC 8995 §5.8.1–5.8.3), JSON only, what the MASA returns to the registrar:

    { "version": uint, "events": [+ event],
      "truncation": { ? "nonced duplicates": uint, ? "nonceless duplicates": uint,
                      ? "arbitrary": uint } }
    event = { "date": text, "domainID": text, "nonce": text / null,
              "assertion": "verified" / "logged" / "proximity", ? "truncated": uint }

The RFC's own example writes the uints as JSON strings ("1", "0"), so decoding accepts decimal
strings there by default (``lenient_numbers``); encoding always writes numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import cbor2

from .cbor_strict import loads_exact
from .errors import DecodeError, UsageError, ValidationError
from .json_strict import loads_strict

TELEMETRY_VERSION: Final = 1
AUDIT_LOG_VERSION: Final = 1
# Far above any real report or log; bounds what a peer can make us parse.
MAX_TELEMETRY_SIZE: Final = 64 * 1024
MAX_AUDIT_LOG_SIZE: Final = 4 * 1024 * 1024


# Versions and counters: JSON and CBOR can carry larger numbers, but a registrar must store
# what it accepts (SQLite INTEGER is signed 64-bit) and nothing real comes near this.
UINT_MAX: Final = 2**63 - 1


def _is_uint(value: object) -> bool:
    # bool is an int subclass: exclude it
    return type(value) is int and 0 <= value <= UINT_MAX


# ---------------------------------------------------------------------------------------------
# Shared input handling: bytes in, one JSON value or one CBOR item out, failures as DecodeError


def _json_value(data: bytes, limit: int, what: str) -> Any:
    if not isinstance(data, bytes | bytearray):
        raise UsageError(f"{what} input must be bytes")
    if len(data) > limit:
        raise DecodeError(f"{what} of {len(data)} bytes exceeds {limit}")
    return loads_strict(data, what)


@dataclass(frozen=True)
class StatusReport:
    """A voucher_status or enrollstatus report (the two share one format)."""

    status: bool
    reason: str | None = None
    reason_context: Mapping[Any, Any] | None = None
    version: int = TELEMETRY_VERSION

    def __post_init__(self) -> None:
        if type(self.status) is not bool:
            raise UsageError("status must be a bool")
        if not _is_uint(self.version):
            raise UsageError("version must be an unsigned int")
        if self.reason is not None and not isinstance(self.reason, str):
            raise UsageError("reason must be a string or None")
        if self.reason_context is not None and not isinstance(self.reason_context, Mapping):
            raise UsageError("reason_context must be a mapping or None")

    def _to_map(self) -> dict[str, Any]:
        # Key order as in RFC 8995 and the cBRSKI example, so encodings match them.
        out: dict[str, Any] = {"version": self.version, "status": self.status}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.reason_context is not None:
            out["reason-context"] = dict(self.reason_context)
        return out

    def encode_json(self) -> bytes:
        try:
            text = json.dumps(self._to_map(), ensure_ascii=False, allow_nan=False,
                              separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"reason_context cannot be written as JSON: {exc}") from exc
        return text.encode("utf-8")

    def encode_cbor(self) -> bytes:
        try:
            return cbor2.dumps(self._to_map())
        except Exception as exc:  # an object cbor2 has no encoding for
            raise UsageError(f"reason_context cannot be written as CBOR: {exc}") from exc

    @classmethod
    def decode_json(cls, data: bytes) -> StatusReport:
        return cls._from_map(_json_value(data, MAX_TELEMETRY_SIZE, "status report"))

    @classmethod
    def decode_cbor(cls, data: bytes) -> StatusReport:
        return cls._from_map(loads_exact(data, "status report", MAX_TELEMETRY_SIZE))

    @classmethod
    def _from_map(cls, item: Any) -> StatusReport:
        if not isinstance(item, dict):
            raise DecodeError("status report is not a map")
        if not all(isinstance(key, str) for key in item):
            raise DecodeError("status report keys must be text strings")
        if "version" not in item:
            raise ValidationError("status report has no version")
        if "status" not in item:
            raise ValidationError("status report has no status")
        version, status = item["version"], item["status"]
        if not _is_uint(version):
            raise DecodeError("status report version is not an unsigned integer below 2^63")
        if type(status) is not bool:
            raise DecodeError("status report status is not a boolean")
        reason = item.get("reason")
        if "reason" in item and not isinstance(reason, str):
            raise DecodeError("status report reason is not text")
        context = item.get("reason-context")
        if "reason-context" in item and not isinstance(context, dict):
            raise DecodeError("status report reason-context is not a map")
        return cls(status=status, reason=reason, reason_context=context, version=version)


# ---------------------------------------------------------------------------------------------
# The audit log


class Assertion(StrEnum):
    VERIFIED = "verified"
    LOGGED = "logged"
    PROXIMITY = "proximity"


_ASSERTIONS: Final = frozenset(a.value for a in Assertion)

# RFC 3339 date-time (YANG date-and-time), which is what the MASA logs.
_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DECIMAL = re.compile(r"[0-9]{1,20}")


def _uint_field(value: object, what: str, lenient: bool) -> int:
    if _is_uint(value):
        return value  # type: ignore[return-value]
    if lenient and isinstance(value, str) and _DECIMAL.fullmatch(value) and (
            int(value) <= UINT_MAX):
        return int(value)
    raise DecodeError(f"{what} is not an unsigned integer below 2^63")


@dataclass(frozen=True)
class AuditEvent:
    """One voucher the MASA issued for this pledge."""

    date: str
    domain_id: str
    nonce: str | None
    assertion: Assertion
    truncated: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.date, str) or not _DATE_TIME.fullmatch(self.date):
            raise UsageError(f"date {self.date!r} is not an RFC 3339 date-time")
        if not isinstance(self.domain_id, str):
            raise UsageError("domain_id must be a string")
        if self.nonce is not None and not isinstance(self.nonce, str):
            raise UsageError("nonce must be a string or None")
        if self.assertion not in _ASSERTIONS:
            raise UsageError(f"assertion {self.assertion!r} is not verified/logged/proximity")
        object.__setattr__(self, "assertion", Assertion(self.assertion))
        if self.truncated is not None and not _is_uint(self.truncated):
            raise UsageError("truncated must be an unsigned int or None")

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "date": self.date,
            "domainID": self.domain_id,
            "nonce": self.nonce,
            "assertion": str(self.assertion),
        }
        if self.truncated is not None:
            out["truncated"] = self.truncated
        return out

    @classmethod
    def from_map(cls, item: object, *, lenient_numbers: bool = True) -> AuditEvent:
        if not isinstance(item, dict):
            raise DecodeError("audit-log event is not an object")
        for key in ("date", "domainID", "nonce", "assertion"):
            if key not in item:
                raise ValidationError(f"audit-log event has no {key!r}")
        date, domain_id, nonce, assertion = (
            item["date"], item["domainID"], item["nonce"], item["assertion"]
        )
        if not isinstance(date, str):
            raise DecodeError("audit-log event date is not text")
        if not _DATE_TIME.fullmatch(date):
            raise ValidationError(f"audit-log event date {date!r} is not an RFC 3339 date-time")
        if not isinstance(domain_id, str):
            raise DecodeError("audit-log event domainID is not text")
        if nonce is not None and not isinstance(nonce, str):
            raise DecodeError("audit-log event nonce is neither text nor null")
        if not isinstance(assertion, str):
            raise DecodeError("audit-log event assertion is not text")
        if assertion not in _ASSERTIONS:
            raise ValidationError(f"audit-log event assertion {assertion!r} is not one of "
                                  "verified, logged, proximity")
        truncated = None
        if "truncated" in item:
            truncated = _uint_field(item["truncated"], "event truncated", lenient_numbers)
        return cls(date, domain_id, nonce, Assertion(assertion), truncated)


@dataclass(frozen=True)
class Truncation:
    """How many events the MASA left out, by kind (§5.8.3); absent counters are None."""

    nonced_duplicates: int | None = None
    nonceless_duplicates: int | None = None
    arbitrary: int | None = None

    _KEYS = (
        ("nonced duplicates", "nonced_duplicates"),
        ("nonceless duplicates", "nonceless_duplicates"),
        ("arbitrary", "arbitrary"),
    )

    def __post_init__(self) -> None:
        for _, attr in self._KEYS:
            value = getattr(self, attr)
            if value is not None and not _is_uint(value):
                raise UsageError(f"{attr} must be an unsigned int or None")

    def to_map(self) -> dict[str, int]:
        return {key: getattr(self, attr) for key, attr in self._KEYS
                if getattr(self, attr) is not None}

    @classmethod
    def from_map(cls, item: object, *, lenient_numbers: bool = True) -> Truncation:
        if not isinstance(item, dict):
            raise DecodeError("audit-log truncation is not an object")
        values = {
            attr: _uint_field(item[key], f"truncation {key!r}", lenient_numbers)
            for key, attr in cls._KEYS
            if key in item
        }
        return cls(**values)


@dataclass(frozen=True)
class AuditLog:
    events: tuple[AuditEvent, ...]
    truncation: Truncation = field(default_factory=Truncation)
    version: int = AUDIT_LOG_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple) or not self.events:
            raise UsageError("an audit log has a non-empty tuple of events")
        if not all(isinstance(e, AuditEvent) for e in self.events):
            raise UsageError("audit-log events must be AuditEvent objects")
        if not isinstance(self.truncation, Truncation):
            raise UsageError("truncation must be a Truncation")
        if not _is_uint(self.version):
            raise UsageError("version must be an unsigned int")

    def encode_json(self) -> bytes:
        body = {
            "version": self.version,
            "events": [event.to_map() for event in self.events],
            "truncation": self.truncation.to_map(),
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode_json(cls, data: bytes, *, lenient_numbers: bool = True) -> AuditLog:
        """Parse a MASA audit log. With ``lenient_numbers`` (default) uints may be decimal
        strings, as in RFC 8995's example; set it False to require JSON numbers."""
        item = _json_value(data, MAX_AUDIT_LOG_SIZE, "audit log")
        if not isinstance(item, dict):
            raise DecodeError("audit log is not a JSON object")
        for key in ("version", "events", "truncation"):
            if key not in item:
                raise ValidationError(f"audit log has no {key!r}")
        version = _uint_field(item["version"], "audit-log version", lenient_numbers)
        events = item["events"]
        if not isinstance(events, list):
            raise DecodeError("audit-log events is not an array")
        if not events:
            raise ValidationError("audit log has no events (at least one is required)")
        return cls(
            events=tuple(AuditEvent.from_map(e, lenient_numbers=lenient_numbers)
                         for e in events),
            truncation=Truncation.from_map(item["truncation"], lenient_numbers=lenient_numbers),
            version=version,
        )
