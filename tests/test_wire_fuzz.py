"""Every decoder in telemetry, grasp, jpy and linkformat, fed junk: arbitrary bytes or text,
mutated valid inputs (bytes flipped, inserted, deleted, cut, repeated) and valid structures
with one node replaced by an arbitrary CBOR/JSON value. Only brski.errors exceptions may come
out (habit 5), and whatever decodes must re-encode consistently.

Fixed example counts and a fixed seed (derandomize), so CI runs the same 500 examples per test
every time; run with --hypothesis-show-statistics to see the counts.
"""

import json
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import cbor2
import pytest
from fuzzkit import examples, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from brski.cbor_strict import loads_exact
from brski.errors import BrskiError
from brski.grasp import Flood, IPv6Locator, proxy_flood, registrar_flood
from brski.jpy import FlowHeaderSealer, JpyMessage, PledgeEndpoint, SequencedHeaderSealer
from brski.linkformat import format_links, parse_links
from brski.telemetry import AuditEvent, AuditLog, StatusReport, Truncation

EXAMPLES = examples(500)  # make fuzz raises it (tests/fuzzkit.py)
fuzz = fuzz_settings(500)


# --- strategies -------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x1F, 0x3F, 0x5F, 0x7F, 0x9F, 0xBF, 0xFF,
                                             0xF4, 0xF5, 0xF6, 0xF7, 0x18, 0x19, 0x1B]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        elif op == "repeat" and data:
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


TAGS = [0, 1, 2, 3, 4, 5, 24, 28, 29, 30, 32, 35, 36, 37, 256, 258, 55799, 65535]

cbor_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.binary(max_size=24)
    | st.text(max_size=12)
)
cbor_values = st.recursive(
    cbor_leaves,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5), inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.sampled_from(TAGS), inner),
    max_leaves=20,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, list):
        for i, child in enumerate(node):
            found += _paths(child, (*prefix, i))
    elif isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*prefix, key))
    return found


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, list):
        return [_replace(c, rest, value) if i == head else c for i, c in enumerate(node)]
    return {k: (_replace(v, rest, value) if k == head else v) for k, v in node.items()}


@st.composite
def one_node_replaced(draw: st.DrawFn, template: Any, values: st.SearchStrategy) -> Any:
    path = draw(st.sampled_from(_paths(template)))
    return _replace(template, path, draw(values))


def same_cbor(a: bytes, b: bytes) -> bool:
    """Equal as CBOR data. Canonical form sorts sets (tag 258), whose order follows Python's
    per-process hash seed, and makes NaN comparable."""
    return cbor2.dumps(loads_exact(a, "a"), canonical=True) == cbor2.dumps(
        loads_exact(b, "b"), canonical=True)


def must_only_raise_brski_errors(decode, data):
    try:
        return decode(data)
    except BrskiError:
        return None


# --- seeds ------------------------------------------------------------------------------------

LL = IPv6Address("fe80::1")
ACP = IPv6Address("fda3:79a6:f6ee:0:200:0:6400:1")
JPY_TEMPLATE = [bytes(range(16)), b"\x16\xfe\xfd" + bytes(range(40))]
JPY_SEEDS = [cbor2.dumps(JPY_TEMPLATE), cbor2.dumps([*JPY_TEMPLATE, 1])]

FLOOD_TEMPLATE = [9, 12340815, LL.packed, 180000,
                  [["AN_Proxy", 4, 1, ""], [103, LL.packed, 6, 4443]]]
FLOOD_SEEDS = [
    cbor2.dumps(FLOOD_TEMPLATE),
    proxy_flood(lambda n: bytes(n), LL, 4443, value=None).encode(),
    registrar_flood(lambda n: b"\x01" * n, ACP,
                    [IPv6Locator(ACP, 6, 8443), IPv6Locator(LL, 41, None)]).encode(),
    cbor2.dumps([9, 1, LL.packed, 1, [["X", 4, 1], []], [["Y", 0, 0], [105, "a.example"]]]),
]

STATUS_TEMPLATE = {"version": 1, "status": False, "reason": "why",
                   "reason-context": {"additional": "JSON"}}
STATUS_JSON_SEEDS = [json.dumps(STATUS_TEMPLATE).encode(),
                     StatusReport(status=True).encode_json()]
STATUS_CBOR_SEEDS = [cbor2.dumps(STATUS_TEMPLATE), StatusReport(status=True).encode_cbor(),
                     cbor2.dumps({**STATUS_TEMPLATE, "reason-context": {0: "info"}})]

AUDIT_TEMPLATE = {
    "version": "1",
    "events": [
        {"date": "2019-05-15T17:25:55.644-04:00", "domainID": "BduJhdHPpfhQLyponf48JzXSGZ8=",
         "nonce": "VOUFT-WwrEv0NuAQEHoV7Q", "assertion": "proximity", "truncated": "0"},
        {"date": "2021-04-13T00:00:00Z", "domainID": "a2V5", "nonce": None,
         "assertion": "logged"},
    ],
    "truncation": {"nonced duplicates": "0", "nonceless duplicates": 1, "arbitrary": "2"},
}
AUDIT_SEEDS = [
    json.dumps(AUDIT_TEMPLATE).encode(),
    AuditLog((AuditEvent("2021-04-13T00:00:00Z", "a2V5", "n", "verified", 3),),
             Truncation(1, 2, 3)).encode_json(),
]

LINK_SEEDS = [
    b"<>;brski-jp=8485",
    b'<>;brski-jp="63245",<>;brski-jp=61617;var="c509 v2"',
    b"<coaps://[2001:db8:0:abcd::52]/b>;rt=brski,<jpy://[2001:db8:0:abcd::52]:7634>;rt=brski.rjp",
    b'<coaps://[fe80::1]:61616>;rt="brski.jp",</s>;rt=temp;if=sensor;obs',
    b"<coaps://192.0.2.1:5684/b>;rt=brski",
]
LINK_ALPHABET = st.sampled_from(list("<>;,=\"\\ []:/.*%@-_") + list("0123456789")
                                + list("abcjpsyrtkfe") + ["brski", "jpy", "coaps://", "rt="])

PLEDGES = [PledgeEndpoint(LL, 5684, 1), PledgeEndpoint(IPv4Address("169.254.1.2"), 1, 2**32 - 1)]
SIV_KEY, CCM_KEY = bytes(range(32)), bytes(range(16))
FLOW_SEEDS = [FlowHeaderSealer(SIV_KEY).seal(p) for p in PLEDGES]


def seq_seeds() -> list[bytes]:
    sealer = SequencedHeaderSealer(CCM_KEY)
    return [sealer.seal(p) for p in PLEDGES]


SEQ_SEEDS = seq_seeds()


# --- JPY --------------------------------------------------------------------------------------


def check_jpy(data: bytes) -> None:
    msg = must_only_raise_brski_errors(JpyMessage.decode, data)
    if msg is not None:
        assert JpyMessage.decode(msg.encode()) == msg


@fuzz
@given(st.binary(max_size=200))
def test_jpy_decode_arbitrary_bytes(data):
    check_jpy(data)


@fuzz
@given(mutated(JPY_SEEDS))
def test_jpy_decode_mutated(data):
    check_jpy(data)


@fuzz
@given(one_node_replaced(JPY_TEMPLATE, cbor_values))
def test_jpy_decode_structure(item):
    check_jpy(cbor2.dumps(item))


@fuzz
@given(st.binary(min_size=28, max_size=34) | st.binary(max_size=64))
def test_flow_header_open_arbitrary_bytes(header):
    must_only_raise_brski_errors(FlowHeaderSealer(SIV_KEY).open, header)


@fuzz
@given(st.sampled_from(range(len(FLOW_SEEDS))), st.data())
def test_flow_header_open_mutated_never_yields_another_pledge(index, data):
    header = data.draw(mutated([FLOW_SEEDS[index]]))
    opened = must_only_raise_brski_errors(FlowHeaderSealer(SIV_KEY).open, header)
    assert opened is None or (header == FLOW_SEEDS[index] and opened == PLEDGES[index])


@fuzz
@given(st.binary(min_size=26, max_size=32) | st.binary(max_size=64))
def test_sequenced_header_open_arbitrary_bytes(header):
    must_only_raise_brski_errors(SequencedHeaderSealer(CCM_KEY).open, header)


@fuzz
@given(st.sampled_from(range(len(SEQ_SEEDS))), st.data())
def test_sequenced_header_open_mutated_never_yields_another_pledge(index, data):
    header = data.draw(mutated([SEQ_SEEDS[index]]))
    opened = must_only_raise_brski_errors(SequencedHeaderSealer(CCM_KEY).open, header)
    assert opened is None or (header == SEQ_SEEDS[index] and opened == PLEDGES[index])


# --- GRASP ------------------------------------------------------------------------------------


def check_flood(data: bytes) -> None:
    flood = must_only_raise_brski_errors(Flood.decode, data)
    if flood is None:
        return
    try:
        encoded = flood.encode()
    except BrskiError:
        return  # e.g. a half-precision float that no longer fits 2048 bytes as a double
    assert same_cbor(Flood.decode(encoded).encode(), encoded)


@fuzz
@given(st.binary(max_size=300))
def test_grasp_decode_arbitrary_bytes(data):
    check_flood(data)


@fuzz
@given(mutated(FLOOD_SEEDS))
def test_grasp_decode_mutated(data):
    check_flood(data)


@fuzz
@given(one_node_replaced(FLOOD_TEMPLATE, cbor_values))
def test_grasp_decode_structure(item):
    check_flood(cbor2.dumps(item))


# --- telemetry --------------------------------------------------------------------------------


def check_status_json(data: bytes) -> None:
    report = must_only_raise_brski_errors(StatusReport.decode_json, data)
    if report is not None:
        assert StatusReport.decode_json(report.encode_json()) == report


def check_status_cbor(data: bytes) -> None:
    report = must_only_raise_brski_errors(StatusReport.decode_cbor, data)
    if report is not None:
        encoded = report.encode_cbor()
        assert same_cbor(StatusReport.decode_cbor(encoded).encode_cbor(), encoded)


def check_audit(data: bytes) -> None:
    log = must_only_raise_brski_errors(AuditLog.decode_json, data)
    if log is not None:
        assert AuditLog.decode_json(log.encode_json(), lenient_numbers=False) == log


@fuzz
@given(st.binary(max_size=200))
def test_status_json_arbitrary_bytes(data):
    check_status_json(data)


@fuzz
@given(mutated(STATUS_JSON_SEEDS))
def test_status_json_mutated(data):
    check_status_json(data)


@fuzz
@given(one_node_replaced(STATUS_TEMPLATE, json_values))
def test_status_json_structure(item):
    check_status_json(json.dumps(item).encode())


@fuzz
@given(st.binary(max_size=200))
def test_status_cbor_arbitrary_bytes(data):
    check_status_cbor(data)


@fuzz
@given(mutated(STATUS_CBOR_SEEDS))
def test_status_cbor_mutated(data):
    check_status_cbor(data)


@fuzz
@given(one_node_replaced(STATUS_TEMPLATE, cbor_values))
def test_status_cbor_structure(item):
    check_status_cbor(cbor2.dumps(item))


@fuzz
@given(st.binary(max_size=300))
def test_audit_log_arbitrary_bytes(data):
    check_audit(data)


@fuzz
@given(mutated(AUDIT_SEEDS))
def test_audit_log_mutated(data):
    check_audit(data)


@fuzz
@given(one_node_replaced(AUDIT_TEMPLATE, json_values))
def test_audit_log_structure(item):
    check_audit(json.dumps(item).encode())


# --- link-format ------------------------------------------------------------------------------


def check_links(payload: bytes | str) -> None:
    links = must_only_raise_brski_errors(parse_links, payload)
    if not links:
        return
    # aiocoap's parser unescapes only \" inside quotes, so leave backslashes out of the check
    if not any("\\" in (v or "") for link in links for _, v in getattr(link, "params", ())):
        assert parse_links(format_links(links)) == links


@fuzz
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_linkformat_arbitrary_input(payload):
    check_links(payload)


@fuzz
@given(st.lists(LINK_ALPHABET, max_size=60).map("".join))
def test_linkformat_link_alphabet(text):
    check_links(text)


@fuzz
@given(mutated(LINK_SEEDS))
def test_linkformat_mutated(data):
    check_links(data)


def test_seeds_are_valid():
    """The mutation seeds must decode, or the mutated tests start from junk."""
    for data in JPY_SEEDS:
        JpyMessage.decode(data)
    for data in FLOOD_SEEDS:
        Flood.decode(data)
    for data in STATUS_JSON_SEEDS:
        StatusReport.decode_json(data)
    for data in STATUS_CBOR_SEEDS:
        StatusReport.decode_cbor(data)
    for data in AUDIT_SEEDS:
        AuditLog.decode_json(data)
    assert all(parse_links(data) for data in LINK_SEEDS)
    assert [FlowHeaderSealer(SIV_KEY).open(h) for h in FLOW_SEEDS] == PLEDGES
    sealer = SequencedHeaderSealer(CCM_KEY)
    assert [sealer.open(h) for h in SEQ_SEEDS] == PLEDGES


@pytest.mark.parametrize("decoder", [JpyMessage.decode, Flood.decode, StatusReport.decode_json,
                                     StatusReport.decode_cbor, AuditLog.decode_json, parse_links])
def test_every_decoder_handles_the_empty_input(decoder):
    must_only_raise_brski_errors(decoder, b"")
