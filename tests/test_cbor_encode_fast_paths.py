"""The encoders written by hand for speed (issue 18) give exactly the bytes cbor2 gives, and
the same errors: brski.cbor_strict.dumps on plain and other values, encode_cbor on vouchers
and voucher-requests of every leaf kind (unknown entries, dates with offsets, extensions),
and cose.sign's message for every ECDSA curve, with and without kid and x5bag."""

import enum
import random
from datetime import UTC, datetime, timedelta, timezone

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from brski import cbor_strict, cose
from brski.errors import DecodeError, UsageError
from brski.pki import create_test_pki
from brski.signed_voucher import sign_voucher_cose, verify_voucher_cose
from brski.voucher import (
    Assertion,
    LeafType,
    Voucher,
    VoucherRequest,
    decode_cbor,
    encode_cbor,
)
from brski.voucher_cbor import encode_checked_cbor

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def random_plain(rng: random.Random, depth: int = 0):
    kinds = ["int", "big", "neg", "bytes", "text", "bool", "none"]
    if depth < 4:
        kinds += ["list", "dict"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
    if kind == "big":
        return rng.randrange(2**70)
    if kind == "neg":
        return -rng.choice([1, 24, 25, 256, 257, 2**32, 2**64])
    if kind == "bytes":
        return rng.randbytes(rng.choice([0, 5, 23, 24, 255, 256, 70000]))
    if kind == "text":
        return "é€𝄞a"[rng.randrange(4)] * rng.choice([0, 1, 23, 24, 300])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_plain(rng, depth + 1) for _ in range(rng.randrange(30))]
    return {random_plain(rng, 4): random_plain(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_dumps_writes_what_cbor2_writes():
    rng = random.Random(18)
    for _ in range(3000):
        value = random_plain(rng)
        assert cbor_strict.dumps(value) == cbor2.dumps(value), repr(value)[:200]


class Small(enum.IntEnum):
    ONE = 1


@pytest.mark.parametrize("value", [
    1.5, -0.0, float("nan"), (1, 2), bytearray(b"ab"), Small.ONE, 2**64, -(2**64) - 1,
    cbor2.CBORTag(47, 2451), cbor2.undefined, cbor2.CBORSimpleValue(99), {1: [1.5]},
    datetime(2026, 1, 1, tzinfo=UTC), [1, (2, 3)], {(1, 2): 3},
])
def test_dumps_hands_other_values_to_cbor2(value):
    assert cbor_strict.dumps(value) == cbor2.dumps(value)


@pytest.mark.parametrize("value", ["\ud800", ["ok", {1: "\udfff"}], object(), [object()]])
def test_dumps_raises_what_cbor2_raises(value):
    with pytest.raises(Exception) as ours:
        cbor_strict.dumps(value)
    with pytest.raises(Exception) as theirs:
        cbor2.dumps(value)
    assert type(ours.value) is type(theirs.value)


def test_head_is_the_shortest_form():
    for major in range(8):
        for n in (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1):
            expected = cbor2.dumps(n)  # major 0 in cbor2's shortest form
            assert cbor_strict.head(major, n) == bytes((expected[0] | major << 5,)) + expected[1:]


# --- encode_cbor ------------------------------------------------------------------------------


def reference_encoding(artifact) -> bytes:
    """What encode_cbor wrote before issue 18: a dict of delta SIDs, then cbor2.dumps."""
    top = artifact.TOP_SID
    body: dict = {}
    for leaf in type(artifact).leaves():
        value = getattr(artifact, leaf.attr)
        if value is None or value == ():
            continue
        if leaf.type is LeafType.ASSERTION:
            value = int(value)
        elif leaf.type is LeafType.DATETIME:
            value = artifact.wire_text(leaf.name)
        elif leaf.type is LeafType.EXTENSIONS:
            value = list(value)
        body[leaf.sid(artifact.IS_REQUEST) - top] = value
    for key, value in artifact.wire.unknown_cbor:
        body.setdefault(key, value)
    return cbor2.dumps({top: body})


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW - timedelta(days=1))


def artifacts(pki):
    cert = pki.domain_ca.cert.public_bytes(serialization.Encoding.DER)
    plus2 = timezone(timedelta(hours=2))
    yield Voucher(serial_number="SN-1", assertion=Assertion.VERIFIED, created_on=NOW,
                  nonce=b"n" * 16, pinned_domain_cert=cert)
    yield Voucher(serial_number="é" * 40, assertion=Assertion.AGENT_PROXIMITY,
                  created_on=datetime(2026, 6, 1, 12, 30, 5, 120000, tzinfo=plus2),
                  expires_on=datetime(2027, 1, 1, tzinfo=UTC),
                  last_renewal_date=datetime(2026, 12, 1, tzinfo=UTC),
                  domain_cert_revocation_checks=False, pinned_domain_pubk_sha256=b"h" * 32,
                  idevid_issuer=b"i" * 300, est_domain="https://est.example",
                  additional_configuration_url="https://c.example",
                  manufacturer_proprietary=b"", extensions=(0, 2**64 - 1, "text"))
    yield Voucher(serial_number="SN-2", pinned_domain_cert=cert,
                  domain_cert_revocation_checks=True)
    yield VoucherRequest(serial_number="SN-3", assertion=Assertion.PROXIMITY, created_on=NOW,
                         nonce=b"m" * 32, proximity_registrar_cert=cert,
                         prior_signed_voucher_request=b"p" * 70000)
    # decoded, with the original date text, unknown entries and a voucher-only leaf kept
    yield decode_cbor(cbor2.dumps({2451: {11: "SN-4", 2: "2026-06-01T14:00:00+02:00",
                                          8: cert, 99: [1.5, {"x": None}]}}))
    yield decode_cbor(cbor2.dumps({2501: {13: "SN-5", 7: b"v" * 20, 2: "2026-06-01T00:00:00Z",
                                          8: b"voucher-only, kept as unknown",
                                          cbor2.CBORTag(47, 9999): "unknown"}}))
    yield decode_cbor(cbor2.dumps({"ietf-voucher:voucher": {"serial-number": "SN-6",
                                                             "assertion": "logged",
                                                             "pinned-domain-cert": cert}}))


def test_encode_cbor_writes_what_it_wrote_before(pki):
    for artifact in artifacts(pki):
        expected = reference_encoding(artifact)
        assert encode_cbor(artifact) == expected, artifact
        assert encode_checked_cbor(artifact) == expected
        assert decode_cbor(expected) == artifact


def test_encode_cbor_refusals_are_unchanged():
    with pytest.raises(DecodeError, match="cannot re-encode"):
        encode_cbor(Voucher(serial_number="\ud800", pinned_domain_pubk_sha256=b"h" * 32))
    with pytest.raises(UsageError, match="nonce"):
        encode_cbor(Voucher(serial_number="SN", nonce="text"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="timezone-aware"):
        encode_cbor(Voucher(serial_number="SN", created_on=datetime(2026, 1, 1)))


# --- cose.sign ----------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
@pytest.mark.parametrize("kid", [None, b"", b"k" * 30])
@pytest.mark.parametrize("bag", [0, 1, 2])
def test_cose_sign_writes_what_cbor2_writes(pki, curve, kid, bag):
    key = ec.generate_private_key(curve)
    certs = [pki.masa_signer.cert, pki.masa_ca.cert][:bag]
    payload = b"p" * 300
    data = cose.sign(payload, key, x5bag=certs, kid=kid)
    msg = cose.decode(data)
    uhdr: dict = {}
    if kid is not None:
        uhdr[4] = kid
    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
    if ders:
        uhdr[32] = ders[0] if len(ders) == 1 else ders
    assert data == cbor2.dumps(cbor2.CBORTag(18, [msg.protected, uhdr, payload, msg.signature]))
    cose.verify(msg, key.public_key())
    with pytest.raises(Exception, match="does not verify"):
        cose.verify(cose.decode(data.replace(payload, b"q" * 300)), key.public_key())


def test_signing_with_something_that_is_not_a_key_is_refused(pki):
    with pytest.raises(UsageError, match="cannot sign COSE with a str"):
        cose.sign(b"p", "not a key")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unsupported curve"):
        cose.sign(b"p", ec.generate_private_key(ec.SECP256K1()))
    voucher = next(artifacts(pki))
    with pytest.raises(UsageError, match="sign a Voucher"):
        sign_voucher_cose(object(), pki.masa_signer.key)  # type: ignore[arg-type]
    data = sign_voucher_cose(voucher, pki.masa_signer.key, x5bag=[pki.masa_signer.cert])
    assert verify_voucher_cose(data, [pki.masa_ca.cert], NOW)[0] == voucher


def test_decode_makes_the_sign1_the_constructor_makes(pki):
    import dataclasses

    data = cose.sign(b"payload", pki.masa_signer.key, x5bag=[pki.masa_signer.cert], kid=b"k")
    msg = cose.decode(data)
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(cose.Sign1)}
    assert msg == cose.Sign1(**fields)
    assert repr(msg) == repr(cose.Sign1(**fields))
    assert fields["kid"] == b"k" and fields["x5bag"] == (pki.masa_signer.cert,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.payload = b"other"  # type: ignore[misc]
