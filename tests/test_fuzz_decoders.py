"""A fuzz harness per decoder of the protocol library (issue 11, "make fuzzing part of the
project"): arbitrary bytes and mutations of valid inputs, seeded both from the library's own
encoders and from the published test vectors (../shared/vectors, or $BRSKI_VECTORS; only the
vector-seeded cases skip without them).

Every decoder is held to the contract in brski/errors.py — only ProtocolError subclasses come
out, whatever the input — and, where the format has an encoder, to the round trip: what
decodes re-encodes, and decoding that gives the same value again (decode -> encode -> decode).
``make test`` runs a short derandomized pass; ``make fuzz`` a long randomized one.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fuzzkit import decoded_or_none, fuzz_settings, mutated
from hypothesis import given
from hypothesis import strategies as st
from test_wire_fuzz import (
    AUDIT_SEEDS,
    FLOOD_SEEDS,
    JPY_SEEDS,
    LINK_SEEDS,
    STATUS_CBOR_SEEDS,
    STATUS_JSON_SEEDS,
)

from brski import cms, cose, est
from brski.cbor_strict import loads_exact
from brski.chain import load_certificate
from brski.coap_datagram import CoapDatagram, MessageType
from brski.cojp_token import TokenSealer, TokenState
from brski.errors import DecodeError
from brski.grasp import Flood
from brski.jpy import JpyMessage, PledgeEndpoint
from brski.json_strict import loads_strict
from brski.linkformat import format_links, parse_links
from brski.telemetry import AuditLog, StatusReport
from brski.voucher import Assertion, Voucher, VoucherRequest
from brski.voucher_cbor import decode_cbor, encode_cbor
from brski.voucher_json import decode_json, encode_json

fuzz = fuzz_settings(100)
NOW = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)


# --- round trips: decode -> encode -> decode gives the same value ------------------------------


def _canonical(value: Any) -> bytes:
    # NaN != NaN: compare CBOR data by its canonical encoding
    return cbor2.dumps(value, canonical=True)


def rt_cbor(value: Any) -> None:
    assert _canonical(loads_exact(cbor2.dumps(value), "again")) == _canonical(value)


def rt_flood(flood: Flood) -> None:
    data = flood.encode()
    assert Flood.decode(data).encode() == data


def rt_jpy(msg: JpyMessage) -> None:
    assert JpyMessage.decode(msg.encode()) == msg


def rt_cose(msg: cose.Sign1) -> None:
    data = cbor2.dumps(cbor2.CBORTag(cose.SIGN1_TAG, [msg.protected, dict(msg.unprotected),
                                                      msg.payload, msg.signature]))
    again = cose.decode(data)
    assert (again.protected, again.payload, again.signature, again.x5bag, again.kid) == (
        msg.protected, msg.payload, msg.signature, msg.x5bag, msg.kid)
    assert _canonical(dict(again.unprotected)) == _canonical(dict(msg.unprotected))


def rt_voucher_cbor(artifact: Any) -> None:
    assert decode_cbor(encode_cbor(artifact)) == artifact


def rt_voucher_json(artifact: Any) -> None:
    data = encode_json(artifact)
    again = decode_json(data)
    assert again == artifact and encode_json(again) == data


def rt_status_json(report: StatusReport) -> None:
    assert StatusReport.decode_json(report.encode_json()) == report


def rt_status_cbor(report: StatusReport) -> None:
    data = report.encode_cbor()
    assert StatusReport.decode_cbor(data).encode_cbor() == data


def rt_audit(log: AuditLog) -> None:
    assert AuditLog.decode_json(log.encode_json()) == log


def rt_links(links: list) -> None:
    assert parse_links(format_links(links)) == links


def rt_base64(der: bytes) -> None:
    assert est.decode_base64(est.encode_base64(der)) == der


def rt_csr(csr: x509.CertificateSigningRequest) -> None:
    der = csr.public_bytes(serialization.Encoding.DER)
    assert est.decode_csr_body(est.encode_base64(der)).public_bytes(
        serialization.Encoding.DER) == der


def _ders(certs: list[x509.Certificate]) -> set[bytes]:
    return {c.public_bytes(serialization.Encoding.DER) for c in certs}


def rt_certs_only(certs: list[x509.Certificate]) -> None:
    assert _ders(est.decode_certs_only(est.encode_certs_only(certs))) == _ders(certs)


def rt_csrattrs(items: list[est.CsrAttribute]) -> None:
    assert est.decode_csrattrs(est.encode_csrattrs(items)) == items


def rt_certificate(cert: x509.Certificate) -> None:
    der = cert.public_bytes(serialization.Encoding.DER)
    assert load_certificate(der).public_bytes(serialization.Encoding.DER) == der


def rt_json(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)  # must not raise
    assert loads_strict(text.encode("utf-8"), "again") == value


# --- seeds ------------------------------------------------------------------------------------


def _pem_or_der(data: bytes) -> bytes:
    if data.lstrip().startswith(b"-----BEGIN"):
        body = re.sub(rb"-----[^-]+-----", b"", data)
        return base64.b64decode(b"".join(body.split()))
    return data


def _hex(data: bytes) -> bytes:
    return binascii.unhexlify(b"".join(data.split()))


def _own_pki() -> dict[str, list[bytes]]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name.from_rfc4514_string("CN=fuzz,2.5.4.5=SN-1")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7).not_valid_before(NOW)
            .not_valid_after(NOW + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    certs_only = est.encode_certs_only([cert])
    csrattrs = est.encode_csrattrs([est.CsrAttribute(est.OID_ECDSA_WITH_SHA256),
                                    est.CsrAttribute("2.5.4.5", (b"\x13\x02ab",))])
    return {"cert": [cert_der], "csr": [csr_der, est.encode_base64(csr_der)],
            "certs_only": [certs_only], "csrattrs": [csrattrs],
            "base64": [est.encode_base64(cert_der), est.encode_base64(csr_der)]}


_PKI = _own_pki()
_REQUEST = VoucherRequest(assertion=Assertion.PROXIMITY, created_on=NOW, serial_number="SN-1",
                          nonce=bytes(range(16)), proximity_registrar_cert=_PKI["cert"][0])
_VOUCHER = Voucher(assertion=Assertion.LOGGED, created_on=NOW, serial_number="SN-1",
                   nonce=bytes(16), pinned_domain_cert=_PKI["cert"][0])
_COSE = cose.sign(encode_cbor(_REQUEST), ec.generate_private_key(ec.SECP256R1()))


def rt_coap(msg: CoapDatagram) -> None:
    assert CoapDatagram.decode(msg.encode()) == msg


# The CoJP proxy's token state (brski/cojp_token.py): sealed at time 0, opened at time 0.
_TOKENS = TokenSealer(bytes(32), 1)
_TOKEN = _TOKENS.seal(TokenState(PledgeEndpoint(IPv6Address("fe80::1:2"), 5683, 3), 7,
                                 b"\x08", True), 0)
_COAP_SEEDS = [
    CoapDatagram(MessageType.CON, 2, 1, b"\x08", ((3, b"6tisch.arpa"), (9, b"\x09\x00a"),
                                                   (39, b"coap")), b"oscore").encode(),
    CoapDatagram(MessageType.NON, 0x44, 2, _TOKEN, ((9, b""),), b"cfg").encode(),
    CoapDatagram(MessageType.NON, 2, 3, bytes(300), ((300, b"x" * 20),)).encode()]


@dataclass(frozen=True)
class Decoder:
    decode: Callable[[bytes], Any]
    round_trip: Callable[[Any], None] | None
    seeds: list[bytes]
    vectors: tuple[str, ...] = ()  # glob patterns under the vectors root
    read: Callable[[bytes], bytes] = lambda data: data  # vector file -> decoder input


DECODERS: dict[str, Decoder] = {
    "cbor": Decoder(lambda d: loads_exact(d, "fuzz"), rt_cbor,
                    [*FLOOD_SEEDS, *JPY_SEEDS, _COSE, encode_cbor(_REQUEST)],
                    ("constrained-join-proxy/*.cbor",
                     "constrained-voucher/examples/cose-examples/*.hex"),
                    lambda d: d if not re.fullmatch(rb"[0-9a-fA-F\s]+", d) else _hex(d)),
    "grasp": Decoder(Flood.decode, rt_flood, FLOOD_SEEDS),
    "jpy": Decoder(JpyMessage.decode, rt_jpy, JPY_SEEDS, ("constrained-join-proxy/*.cbor",)),
    "coap-datagram": Decoder(CoapDatagram.decode, rt_coap, _COAP_SEEDS),
    "cojp-token": Decoder(lambda d: _TOKENS.open(d, 0), None, [_TOKEN]),
    "cose": Decoder(cose.decode, rt_cose, [_COSE],
                    ("constrained-voucher/examples/cose-examples/[prv]*r.hex",
                     "constrained-voucher/examples/cose-examples/voucher.hex"), _hex),
    "voucher-cbor": Decoder(decode_cbor, rt_voucher_cbor,
                            [encode_cbor(_REQUEST), encode_cbor(_VOUCHER)],
                            ("constrained-voucher/examples/cose-examples/*-nonsigned.hex",),
                            _hex),
    "voucher-json": Decoder(decode_json, rt_voucher_json,
                            [encode_json(_REQUEST), encode_json(_VOUCHER)],
                            ("anima-bootstrap/examples/*.json",
                             "anima-bootstrap/example-voucher.json"),
                            lambda d: d.replace(b"\n", b"") if b'":' in d[:40] else d),
    "status-json": Decoder(StatusReport.decode_json, rt_status_json, STATUS_JSON_SEEDS,
                           ("anima-bootstrap/example-telemetry.json",
                            "anima-bootstrap/example-enrollstatus.json")),
    "status-cbor": Decoder(StatusReport.decode_cbor, rt_status_cbor, STATUS_CBOR_SEEDS,
                           ("constrained-voucher/examples/voucher-status.hex",), _hex),
    "audit-log": Decoder(AuditLog.decode_json, rt_audit, AUDIT_SEEDS,
                         ("anima-bootstrap/example-auditlog.json",)),
    "link-format": Decoder(parse_links, rt_links, LINK_SEEDS),
    "cms": Decoder(cms.parse, None, [],
                   ("anima-bootstrap/examples/*.pkcs", "constrained-voucher/examples/cms-*.bin"),
                   _pem_or_der),
    "est-base64": Decoder(est.decode_base64, rt_base64, _PKI["base64"]),
    "csr": Decoder(est.decode_csr_body, rt_csr, _PKI["csr"],
                   ("rfc9148-est-coaps/A.2-payload1.bin", "rfc9148-est-coaps/A.3-payload1.bin")),
    "certs-only": Decoder(est.decode_certs_only, rt_certs_only, _PKI["certs_only"],
                          ("rfc9148-est-coaps/A.1-payload1.bin",
                           "rfc9148-est-coaps/A.2-payload2.bin",
                           "rfc9148-est-coaps/A.3-payload3.bin")),
    "csrattrs": Decoder(est.decode_csrattrs, rt_csrattrs, _PKI["csrattrs"],
                        ("rfc9148-est-coaps/A.4-payload1.bin",)),
    "certificate": Decoder(load_certificate, rt_certificate, _PKI["cert"],
                           ("constrained-voucher/examples/cose-examples/*.der",
                            "anima-bootstrap/examples/*.crt"), _pem_or_der),
    "json": Decoder(lambda d: loads_strict(d, "fuzz"), rt_json,
                    [*STATUS_JSON_SEEDS, *AUDIT_SEEDS, encode_json(_REQUEST)],
                    ("anima-bootstrap/example-*.json",)),
}


def _check(name: str, data: bytes) -> None:
    decoder = DECODERS[name]
    value = decoded_or_none(decoder.decode, data)
    if value is not None and decoder.round_trip is not None:
        decoder.round_trip(value)


def _vector_seeds(root: Path, decoder: Decoder) -> list[bytes]:
    files = sorted({p for pattern in decoder.vectors for p in root.glob(pattern)})
    return [decoder.read(p.read_bytes()) for p in files]


# --- the harnesses ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DECODERS))
@fuzz
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes(name, data):
    _check(name, data)


@pytest.mark.parametrize("name", [n for n, d in DECODERS.items() if d.seeds])
@fuzz
@given(data=st.data())
def test_mutated_own_encodings(name, data):
    for seed in DECODERS[name].seeds:  # the seeds themselves decode and round-trip
        _check(name, seed)
    _check(name, data.draw(mutated(DECODERS[name].seeds)))


@pytest.fixture(scope="module")
def vector_seeds(vectors) -> dict[str, list[bytes]]:
    seeds = {name: _vector_seeds(vectors, d) for name, d in DECODERS.items() if d.vectors}
    missing = [name for name, found in seeds.items() if not found]
    assert not missing, f"no vectors found for {missing} under {vectors}"
    return seeds


@pytest.mark.parametrize("name", [n for n, d in DECODERS.items() if d.vectors])
@fuzz
@given(data=st.data())
def test_mutated_vectors(vector_seeds, name, data):
    _check(name, data.draw(mutated(vector_seeds[name])))


@pytest.mark.parametrize("name", [n for n, d in DECODERS.items() if d.vectors])
def test_vectors_decode_and_round_trip(vector_seeds, name):
    decoded = 0
    for seed in vector_seeds[name]:
        value = decoded_or_none(DECODERS[name].decode, seed)
        if value is not None:
            decoded += 1
            if DECODERS[name].round_trip is not None:
                DECODERS[name].round_trip(value)
    assert decoded, f"none of the {name} vectors decodes"


# --- structured CBOR: every kind of item, keys of every type ----------------------------------

cbor_leaves = (st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1)
               | st.floats() | st.binary(max_size=16) | st.text(max_size=8)
               | st.just(cbor2.undefined))
cbor_items = st.recursive(
    cbor_leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.integers(-3, 30) | st.text(max_size=4) | st.binary(max_size=3),
                      inner, max_size=4)
    | st.builds(cbor2.CBORTag, st.integers(0, 2**16), inner),
    max_leaves=16,
)


@fuzz
@given(cbor_items)
def test_cbor_items_decode_to_themselves(item):
    data = cbor2.dumps(item)
    assert _canonical(loads_exact(data, "fuzz")) == _canonical(item)


@fuzz
@given(st.lists(st.floats(allow_nan=False) | st.booleans() | st.none() | st.lists(st.none()),
                min_size=1, max_size=3))
def test_cbor_map_keys_other_than_int_text_bytes_are_refused(keys):
    # cbor2 read {7.0: ..} and {true: ..} as the keys 7 and 1 (issue 11)
    data = b"\xa1" + cbor2.dumps(keys[0]) + b"\x00"
    with pytest.raises(DecodeError, match="map key of type"):
        loads_exact(data, "fuzz")


@fuzz
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_survive(value):
    again = loads_exact(cbor2.dumps(value), "fuzz")
    assert (math.isnan(value) and math.isnan(again)) or again == value


def _flood_with_value(value: Any) -> bytes:
    return cbor2.dumps([9, 1, IPv6Address("fe80::1").packed, 1, [["X", 0, 1, value], []]])


@fuzz
@given(cbor_items)
def test_grasp_objective_values_round_trip(value):
    _check("grasp", _flood_with_value(value))
