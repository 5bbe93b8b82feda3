"""Status telemetry (voucher_status, enrollstatus) in JSON and CBOR, and the MASA audit log."""

import json

import cbor2
import pytest

from brski.errors import DecodeError, UsageError, ValidationError
from brski.telemetry import (
    Assertion,
    AuditEvent,
    AuditLog,
    StatusReport,
    Truncation,
)

# cBRSKI appendix, enrollstatus success payload: {"version": 1, "status": true}
ENROLLSTATUS_SUCCESS = bytes.fromhex("A26776657273696F6E0166737461747573F5")


def read_hex(path) -> bytes:
    return bytes.fromhex("".join(path.read_text().split()))


# --- status reports: vectors ------------------------------------------------------------------


def test_cbrski_voucher_status_vector(vectors):
    data = read_hex(vectors / "constrained-voucher" / "examples" / "voucher-status.hex")
    assert len(data) == 107
    report = StatusReport.decode_cbor(data)
    assert report == StatusReport(
        status=False,
        reason="Informative human-readable error message",
        reason_context={0: "Additional information"},
    )
    assert report.encode_cbor() == data


def test_cbrski_enrollstatus_success_example():
    assert StatusReport.decode_cbor(ENROLLSTATUS_SUCCESS) == StatusReport(status=True)
    assert StatusReport(status=True).encode_cbor() == ENROLLSTATUS_SUCCESS


@pytest.mark.parametrize(("name", "status"), [("example-telemetry.json", False),
                                              ("example-enrollstatus.json", True)])
def test_rfc8995_json_examples(vectors, name, status):
    report = StatusReport.decode_json((vectors / "anima-bootstrap" / name).read_bytes())
    assert report.version == 1
    assert report.status is status
    assert report.reason == "Informative human readable message"
    assert report.reason_context == {"additional": "JSON"}
    assert StatusReport.decode_json(report.encode_json()) == report


def test_json_encoding_is_compact_and_ordered():
    report = StatusReport(status=False, reason="no voucher", reason_context={"n": 1})
    assert report.encode_json() == (
        b'{"version":1,"status":false,"reason":"no voucher","reason-context":{"n":1}}'
    )


def test_cbor_round_trip_with_nested_context():
    report = StatusReport(False, "bad", {"a": [1, b"\x00", {"b": None}], 7: True}, version=3)
    assert StatusReport.decode_cbor(report.encode_cbor()) == report


def test_higher_versions_and_unknown_keys_are_accepted():
    data = json.dumps({"version": 2, "status": True, "new-field": [1]}).encode()
    assert StatusReport.decode_json(data) == StatusReport(status=True, version=2)


def test_non_ascii_reason_survives_json():
    report = StatusReport(status=False, reason="Zertifikat ungültig ✗")
    assert StatusReport.decode_json(report.encode_json()) == report


# --- status reports: every rule ---------------------------------------------------------------

BAD_REPORTS = [
    ({"status": True}, ValidationError, "no version"),
    ({"version": 1}, ValidationError, "no status"),
    ({"version": 1, "status": 1}, DecodeError, "status is not a boolean"),
    ({"version": 1, "status": "true"}, DecodeError, "status is not a boolean"),
    ({"version": 1, "status": None}, DecodeError, "status is not a boolean"),
    ({"version": -1, "status": True}, DecodeError, "version"),
    ({"version": 1.0, "status": True}, DecodeError, "version"),
    ({"version": True, "status": True}, DecodeError, "version"),
    ({"version": "1", "status": True}, DecodeError, "version"),
    ({"version": 1, "status": False, "reason": 5}, DecodeError, "reason is not text"),
    ({"version": 1, "status": False, "reason": None}, DecodeError, "reason is not text"),
    ({"version": 1, "status": False, "reason-context": ["x"]}, DecodeError, "not a map"),
    ({"version": 1, "status": False, "reason-context": "x"}, DecodeError, "not a map"),
]


@pytest.mark.parametrize(("body", "error", "why"), BAD_REPORTS)
def test_bad_json_reports(body, error, why):
    with pytest.raises(error, match=why):
        StatusReport.decode_json(json.dumps(body).encode())


@pytest.mark.parametrize(("body", "error", "why"), BAD_REPORTS)
def test_bad_cbor_reports(body, error, why):
    with pytest.raises(error, match=why):
        StatusReport.decode_cbor(cbor2.dumps(body))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not valid JSON"),
        (b"[]", "not a map"),
        (b'"status"', "not a map"),
        (b'{"version":1,"status":true', "not valid JSON"),
        (b'{"version":1,"status":true}x', "not valid JSON"),
        (b'{"version":1,"version":1,"status":true}', "duplicate key"),
        (b'{"version":NaN,"status":true}', "not JSON"),
        (b'{"version":1,"status":true,"reason":"\xff"}', "not valid JSON"),
        ('{"version":1,"status":true}'.encode("utf-16"), "not valid JSON"),
        (b"[" * 60_000, "not valid JSON"),  # nesting deeper than the recursion limit
        (b'{"version":' + b"9" * 5000 + b',"status":true}', "not valid JSON"),
    ],
)
def test_malformed_json_reports(data, why):
    with pytest.raises(DecodeError, match=why):
        StatusReport.decode_json(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (cbor2.dumps([1, True]), "not a map"),
        (cbor2.dumps({1: 1, 2: True}), "keys must be text"),
        (cbor2.dumps({"version": 1, "status": True, 0: "x"}), "keys must be text"),
        (ENROLLSTATUS_SUCCESS[:-1], "not valid CBOR"),
        (ENROLLSTATUS_SUCCESS + b"\x00", "after the status report"),
        (bytes.fromhex("a26776657273696f6e01fff5"), "stray break"),
    ],
)
def test_malformed_cbor_reports(data, why):
    with pytest.raises(DecodeError, match=why):
        StatusReport.decode_cbor(data)


def test_oversized_reports_are_refused():
    big = b'{"version":1,"status":true,"reason":"' + b"x" * 70_000 + b'"}'
    with pytest.raises(DecodeError, match="exceeds"):
        StatusReport.decode_json(big)
    with pytest.raises(DecodeError, match="exceeds"):
        StatusReport.decode_cbor(cbor2.dumps({"reason": "x" * 70_000}))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 1},
        {"status": True, "version": -1},
        {"status": True, "version": True},
        {"status": True, "reason": b"x"},
        {"status": True, "reason_context": [1]},
    ],
)
def test_status_report_constructor_checks_types(kwargs):
    with pytest.raises(UsageError):
        StatusReport(**kwargs)


def test_unencodable_context_is_a_usage_error():
    with pytest.raises(UsageError, match="JSON"):
        StatusReport(False, reason_context={"x": object()}).encode_json()
    with pytest.raises(UsageError, match="JSON"):
        StatusReport(False, reason_context={"x": float("nan")}).encode_json()
    with pytest.raises(UsageError, match="CBOR"):
        StatusReport(False, reason_context={"x": object()}).encode_cbor()


def test_decoders_take_bytes():
    with pytest.raises(UsageError):
        StatusReport.decode_json('{"version":1,"status":true}')  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        StatusReport.decode_cbor(ENROLLSTATUS_SUCCESS.hex())  # type: ignore[arg-type]


# --- audit log --------------------------------------------------------------------------------


def test_rfc8995_audit_log_example_parses_leniently(vectors):
    log = AuditLog.decode_json((vectors / "anima-bootstrap" / "example-auditlog.json").read_bytes())
    assert log.version == 1
    assert log.truncation == Truncation(0, 1, 2)
    first, second = log.events
    assert first == AuditEvent(
        "2019-05-15T17:25:55.644-04:00",
        "BduJhdHPpfhQLyponf48JzXSGZ8=",
        "VOUFT-WwrEv0NuAQEHoV7Q",
        Assertion.PROXIMITY,
        0,
    )
    assert second.truncated is None
    assert second.nonce == "f4G6Vi1t8nKo/FieCVgpBg=="
    # written back with numbers, and the strict parser accepts that
    assert AuditLog.decode_json(log.encode_json(), lenient_numbers=False) == log


def test_rfc8995_audit_log_example_fails_strictly(vectors):
    data = (vectors / "anima-bootstrap" / "example-auditlog.json").read_bytes()
    with pytest.raises(DecodeError, match="version is not an unsigned integer"):
        AuditLog.decode_json(data, lenient_numbers=False)


def event(**changes):
    body = {
        "date": "2021-04-13T17:32:10Z",
        "domainID": "BduJhdHPpfhQLyponf48JzXSGZ8=",
        "nonce": None,
        "assertion": "logged",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not DROP}


DROP = object()


def log_json(events=None, **changes) -> bytes:
    body = {"version": 1, "events": [event()] if events is None else events, "truncation": {}}
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def test_minimal_log_with_a_nonceless_event():
    log = AuditLog.decode_json(log_json())
    assert log.events[0].nonce is None
    assert log.events[0].assertion is Assertion.LOGGED
    assert log.truncation == Truncation()
    assert json.loads(log.encode_json())["truncation"] == {}


@pytest.mark.parametrize(
    ("data", "error", "why"),
    [
        (log_json(version=DROP), ValidationError, "no 'version'"),
        (log_json(events=DROP), ValidationError, "no 'events'"),
        (log_json(truncation=DROP), ValidationError, "no 'truncation'"),
        (log_json(events=[]), ValidationError, "no events"),
        (log_json(events={"a": 1}), DecodeError, "events is not an array"),
        (log_json(events=["x"]), DecodeError, "event is not an object"),
        (log_json(version=-1), DecodeError, "version"),
        (log_json(version="one"), DecodeError, "version"),
        (log_json(version="-1"), DecodeError, "version"),
        (log_json(version=1.0), DecodeError, "version"),
        (log_json(truncation=[]), DecodeError, "truncation is not an object"),
        (log_json(truncation={"arbitrary": -2}), DecodeError, "'arbitrary'"),
        (log_json(truncation={"nonced duplicates": "x"}), DecodeError, "nonced duplicates"),
        (log_json([event(date=DROP)]), ValidationError, "no 'date'"),
        (log_json([event(domainID=DROP)]), ValidationError, "no 'domainID'"),
        (log_json([event(nonce=DROP)]), ValidationError, "no 'nonce'"),
        (log_json([event(assertion=DROP)]), ValidationError, "no 'assertion'"),
        (log_json([event(date=20210413)]), DecodeError, "date is not text"),
        (log_json([event(date="yesterday")]), ValidationError, "RFC 3339"),
        (log_json([event(date="2021-04-13 17:32:10")]), ValidationError, "RFC 3339"),
        (log_json([event(domainID=None)]), DecodeError, "domainID"),
        (log_json([event(nonce=42)]), DecodeError, "nonce"),
        (log_json([event(assertion="agent-proximity")]), ValidationError, "assertion"),
        (log_json([event(assertion=1)]), DecodeError, "assertion is not text"),
        (log_json([event(truncated=-1)]), DecodeError, "truncated"),
        (log_json([event(truncated=1.5)]), DecodeError, "truncated"),
        (log_json([event(truncated="1e3")]), DecodeError, "truncated"),
        (b"[]", DecodeError, "not a JSON object"),
        (b"{", DecodeError, "not valid JSON"),
    ],
)
def test_audit_log_rules(data, error, why):
    with pytest.raises(error, match=why):
        AuditLog.decode_json(data)


def test_audit_log_size_cap():
    with pytest.raises(DecodeError, match="exceeds"):
        AuditLog.decode_json(b" " * (4 * 1024 * 1024 + 1))


@pytest.mark.parametrize(
    "build",
    [
        lambda: AuditEvent("now", "id", None, "logged"),
        lambda: AuditEvent("2021-04-13T17:32:10Z", 5, None, "logged"),  # type: ignore
        lambda: AuditEvent("2021-04-13T17:32:10Z", "id", b"n", "logged"),  # type: ignore
        lambda: AuditEvent("2021-04-13T17:32:10Z", "id", None, "trusted"),  # type: ignore
        lambda: AuditEvent("2021-04-13T17:32:10Z", "id", None, "logged", -1),
        lambda: Truncation(arbitrary=-1),
        lambda: AuditLog(()),
        lambda: AuditLog(("event",)),  # type: ignore[arg-type]
        lambda: AuditLog((AuditEvent("2021-04-13T17:32:10Z", "i", None, "logged"),), {}),
        lambda: AuditLog((AuditEvent("2021-04-13T17:32:10Z", "i", None, "logged"),), version=-1),
    ],
)
def test_audit_log_constructors_check_fields(build):
    with pytest.raises(UsageError):
        build()


def test_audit_log_round_trip():
    log = AuditLog(
        (
            AuditEvent("2021-04-13T17:32:10.5+02:00", "a2V5", "bm9uY2U", Assertion.VERIFIED, 3),
            AuditEvent("2021-04-14T00:00:00Z", "a2V5", None, "proximity"),
        ),
        Truncation(nonceless_duplicates=1025),
    )
    assert AuditLog.decode_json(log.encode_json(), lenient_numbers=False) == log
