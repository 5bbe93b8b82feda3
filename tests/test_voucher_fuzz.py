"""Property tests: every voucher decoder raises only library errors, whatever the input, and
no mutation of a signed voucher verifies as a different voucher.

Each property runs EXAMPLES examples (16 properties: 8,000 examples in all).
"""

import binascii
import functools
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from fuzzkit import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brski import cms, cose
from brski.cli.voucher import read_input, unverified
from brski.errors import BrskiError
from brski.pki import create_test_pki
from brski.signed_voucher import (
    sign_voucher_cms,
    sign_voucher_cose,
    verify_voucher_cms,
    verify_voucher_cose,
    verify_voucher_request_cms,
    verify_voucher_request_cose,
)
from brski.voucher import (
    LEAVES,
    Assertion,
    Voucher,
    VoucherRequest,
    b64decode_lenient,
    b64encode,
    decode_cbor,
    decode_json,
    encode_cbor,
    encode_json,
    parse_datetime,
)

DEFAULT_EXAMPLES = 500
EXAMPLES = examples(DEFAULT_EXAMPLES)  # make fuzz raises it (tests/fuzzkit.py)
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,  # chain validation time varies with the machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NOW = datetime(2026, 6, 1, tzinfo=UTC)
APPC_AT = datetime(2021, 4, 13, 23, 0, tzinfo=UTC)
COSE_AT = datetime(2023, 1, 1, tzinfo=UTC)


# --- seeds: freshly signed artifacts ---------------------------------------------------------


@functools.cache
def seeds() -> dict[str, object]:
    pki = create_test_pki(NOW - timedelta(days=1), serials=["FUZZ-1"])
    voucher = Voucher(
        serial_number="FUZZ-1",
        assertion=Assertion.LOGGED,
        created_on=NOW,
        nonce=b"fuzz-nonce-12345",
        pinned_domain_cert=pki.domain_ca.cert.public_bytes(serialization.Encoding.DER),
    )
    request = VoucherRequest(
        serial_number="FUZZ-1",
        assertion=Assertion.PROXIMITY,
        created_on=NOW,
        nonce=b"fuzz-nonce-12345",
        proximity_registrar_cert=pki.registrar.cert.public_bytes(serialization.Encoding.DER),
    )
    signer = pki.masa_signer
    return {
        "pki": pki,
        "voucher": voucher,
        "json": [encode_json(voucher), encode_json(request)],
        "cbor": [encode_cbor(voucher), encode_cbor(request)],
        "cms": sign_voucher_cms(voucher, signer.key, [signer.cert], NOW),
        "cose": sign_voucher_cose(voucher, signer.key, x5bag=[signer.cert, pki.masa_ca.cert]),
    }


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """1 to 4 edits of a valid input: bit flips, byte sets, inserts, deletes, truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def only_library_errors(fn, *args, **kwargs):
    """Call fn; BrskiError is fine, anything else fails the test. Returns the result or None."""
    try:
        return fn(*args, **kwargs)
    except BrskiError:
        return None


# --- JSON ------------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=400))
def test_json_decoder_arbitrary_bytes(data):
    only_library_errors(decode_json, data)


@fuzz
@given(st.data())
def test_json_decoder_mutated(data):
    seed = data.draw(st.sampled_from(seeds()["json"]))
    artifact = only_library_errors(decode_json, data.draw(mutated(seed)))
    if artifact is not None:
        only_library_errors(artifact.validate)
        assert decode_json(encode_json(artifact)) == artifact


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
plausible_texts = st.sampled_from(
    ["AAECAwQFBgc=", "-_XE9zK9q8Ll1qylMtLKeg", "2021-04-13T17:43:24.589-04:00", "logged",
     "proximity", "agent-proximity", "S1", "", "====", "2021-02-30T00:00:00Z"]
)  # fmt: skip
member_names = st.sampled_from(
    [leaf.name for leaf in LEAVES] + ["ietf-voucher:nonce", "ietf-voucher-request:nonce",
                                      "extension:x", "unknown"]
)  # fmt: skip


@fuzz
@given(
    st.sampled_from(["ietf-voucher:voucher", "ietf-voucher-request:voucher", "voucher"]),
    st.dictionaries(member_names, plausible_texts | json_values, max_size=8),
)
def test_json_decoder_structured(top, container):
    data = json.dumps({top: container}).encode()
    artifact = only_library_errors(decode_json, data)
    if artifact is not None:
        only_library_errors(artifact.validate)
        again = decode_json(encode_json(artifact))
        assert again == artifact and encode_json(again) == encode_json(artifact)


# --- CBOR ------------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=400))
def test_cbor_decoder_arbitrary_bytes(data):
    only_library_errors(decode_cbor, data)


@fuzz
@given(st.data())
def test_cbor_decoder_mutated(data):
    seed = data.draw(st.sampled_from(seeds()["cbor"]))
    artifact = only_library_errors(decode_cbor, data.draw(mutated(seed)))
    if artifact is not None:
        only_library_errors(artifact.validate)
        assert decode_cbor(encode_cbor(artifact)) == artifact


cbor_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=40)
    | st.text(max_size=20) | st.floats(allow_nan=False) | plausible_texts
)  # fmt: skip
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.integers(-3, 30), inner, max_size=3)
    ),
    max_leaves=8,
)
cbor_keys = (
    st.integers(-5, 30)
    | st.sampled_from([leaf.name for leaf in LEAVES])
    | st.builds(lambda sid: cbor2.CBORTag(47, sid), st.integers(2450, 2530))
)


@fuzz
@given(
    st.sampled_from([2451, 2501, "ietf-voucher:voucher", "ietf-voucher-request:voucher", 7]),
    st.dictionaries(cbor_keys, cbor_values, max_size=8),
)
def test_cbor_decoder_structured(top, container):
    data = cbor2.dumps({top: container})
    artifact = only_library_errors(decode_cbor, data)
    if artifact is not None:
        only_library_errors(artifact.validate)
        assert decode_cbor(encode_cbor(artifact)) == artifact


# --- the model round-trips through both encodings --------------------------------------------

offsets = st.sampled_from(
    [UTC, timezone(timedelta(hours=-4)), timezone(timedelta(hours=5, minutes=30))]
)
dates = st.none() | st.datetimes(timezones=offsets)
binaries = st.none() | st.binary(max_size=64)
texts = st.none() | st.text(max_size=30)
extensions = st.lists(st.integers(0, 2**64 - 1) | st.text(max_size=10), max_size=3).map(tuple)
common = {
    "serial_number": st.text(min_size=1, max_size=30),
    "assertion": st.none() | st.sampled_from(Assertion),
    "created_on": dates,
    "expires_on": dates,
    "idevid_issuer": binaries,
    "nonce": st.none() | st.binary(min_size=8, max_size=32),
    "additional_configuration_url": texts,
    "est_domain": texts,
    "manufacturer_proprietary": binaries,
    "extensions": extensions,
}


@fuzz
@given(
    st.builds(
        Voucher,
        **common,
        domain_cert_revocation_checks=st.none() | st.booleans(),
        last_renewal_date=dates,
        pinned_domain_cert=binaries,
        pinned_domain_pubk=binaries,
        pinned_domain_pubk_sha256=binaries,
    )
    | st.builds(
        VoucherRequest,
        **common,
        prior_signed_voucher_request=binaries,
        proximity_registrar_cert=binaries,
        proximity_registrar_pubk=binaries,
        proximity_registrar_pubk_sha256=binaries,
        agent_provided_proximity_registrar_cert=binaries,
        agent_sign_cert=binaries,
        agent_signed_data=binaries,
    )
)
def test_model_round_trips_json_and_cbor(artifact):
    as_json = encode_json(artifact)
    assert decode_json(as_json) == artifact
    assert encode_json(decode_json(as_json)) == as_json
    as_cbor = encode_cbor(artifact)
    assert decode_cbor(as_cbor) == artifact
    assert encode_cbor(decode_cbor(as_cbor)) == as_cbor


# --- CMS -------------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=600) | st.builds(lambda b: b"\x30\x82" + b, st.binary(max_size=600)))
def test_cms_parser_arbitrary_bytes(data):
    parsed = only_library_errors(cms.parse, data)
    if parsed is not None:
        only_library_errors(cms.verify_signature, parsed)


@fuzz
@given(st.data())
def test_cms_mutated_fresh_voucher_never_verifies_as_another(data):
    s = seeds()
    anchors = [s["pki"].masa_ca.cert]
    result = only_library_errors(verify_voucher_cms, data.draw(mutated(s["cms"])), anchors, NOW)
    if result is not None:
        assert result[0] == s["voucher"]


@fuzz
@given(st.data())
def test_cms_mutated_appc_never_verifies_as_another(vectors, data):
    stem = data.draw(st.sampled_from(["voucher", "vr"]))
    original = appc(vectors, stem)
    anchors = [anchor(vectors)]
    verify = verify_voucher_cms if stem == "voucher" else verify_voucher_request_cms
    expected, _ = verify(original, anchors, APPC_AT)
    result = only_library_errors(verify, data.draw(mutated(original)), anchors, APPC_AT)
    if result is not None:
        assert result[0] == expected


# --- COSE ------------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=400) | st.builds(lambda b: b"\xd2\x84" + b, st.binary(max_size=400)))
def test_cose_decoder_arbitrary_bytes(data):
    msg = only_library_errors(cose.decode, data)
    if msg is not None:
        key = seeds()["pki"].masa_signer.cert
        only_library_errors(cose.verify, msg, key)


@fuzz
@given(st.data())
def test_cose_mutated_fresh_voucher_never_verifies_as_another(data):
    s = seeds()
    result = only_library_errors(
        verify_voucher_cose, data.draw(mutated(s["cose"])), [s["pki"].masa_ca.cert], NOW
    )
    if result is not None:
        assert result[0] == s["voucher"]


@fuzz
@given(st.data())
def test_cose_mutated_cbrski_never_verifies_as_another(vectors, data):
    name, signer = data.draw(st.sampled_from([("pvr", "pledge"), ("voucher", "masa_ca")]))
    original = cbrski(vectors, f"{name}.hex")
    cert = cbrski_cert(vectors, signer)
    verify = verify_voucher_cose if name == "voucher" else verify_voucher_request_cose
    expected, _ = verify(original, None, COSE_AT, signer=cert)
    result = only_library_errors(verify, data.draw(mutated(original)), None, COSE_AT, signer=cert)
    if result is not None:
        assert result[0] == expected


# --- text helpers and the CLI's format sniffing ----------------------------------------------


@fuzz
@given(st.text(max_size=60) | st.binary(max_size=40).map(b64encode))
def test_base64_decoder_arbitrary_text(text):
    raw = only_library_errors(b64decode_lenient, text)
    if raw is not None and "=" not in text:
        url = text.replace("+", "-").replace("/", "_")
        assert b64decode_lenient(url) == raw


@fuzz
@given(st.text(max_size=40) | st.datetimes(timezones=offsets).map(lambda d: d.isoformat()))
def test_datetime_parser_arbitrary_text(text):
    parsed = only_library_errors(parse_datetime, text)
    if parsed is not None:
        assert parsed.tzinfo is not None


@fuzz
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_cli_input_sniffing_arbitrary_bytes(data):
    only_library_errors(lambda: unverified(*read_input(data)))


# --- vector helpers --------------------------------------------------------------------------


def appc(vectors: Path, stem: str) -> bytes:
    path = vectors / "anima-bootstrap/examples" / f"{stem}_00-D0-E5-F2-00-02.b64"
    return binascii.a2b_base64(path.read_bytes())


def anchor(vectors: Path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(
        (vectors / "anima-bootstrap/examples/vendor.crt").read_bytes()
    )


def cbrski(vectors: Path, name: str) -> bytes:
    path = vectors / "constrained-voucher/examples/cose-examples" / name
    return binascii.unhexlify(b"".join(path.read_bytes().split()))


def cbrski_cert(vectors: Path, name: str):
    from cryptography import x509

    path = vectors / "constrained-voucher/examples/cose-examples" / f"{name}.der"
    return x509.load_der_x509_certificate(path.read_bytes())


def test_example_count_is_what_the_docstring_says():
    given_tests = [
        name for name, fn in globals().items()
        if name.startswith("test_") and hasattr(fn, "hypothesis")
    ]  # fmt: skip
    assert len(given_tests) * DEFAULT_EXAMPLES == 8000, given_tests
    pytest.importorskip("hypothesis")
