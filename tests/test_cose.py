"""COSE_Sign1 vouchers: the cBRSKI examples verified, tampering, signing with fresh keys."""

import binascii
import dataclasses
import functools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from brski import cose
from brski.errors import BrskiError, DecodeError, SignatureError, UsageError, ValidationError
from brski.pki import create_test_pki
from brski.signed_voucher import (
    sign_voucher_cose,
    verify_voucher_cose,
    verify_voucher_request_cose,
)
from brski.voucher import Assertion, Voucher, VoucherRequest, encode_cbor

COSE = "constrained-voucher/examples/cose-examples"
AT = datetime(2023, 1, 1, tzinfo=UTC)  # every example certificate is valid then
TAMPER = (SignatureError, DecodeError)
# example, certificate whose key signed it (protocols.md "Test vectors" #3)
EXAMPLES = [("pvr", "pledge"), ("rvr", "registrar"), ("voucher", "masa_ca")]


def hexfile(vectors: Path, name: str) -> bytes:
    return binascii.unhexlify(b"".join((vectors / COSE / name).read_bytes().split()))


def der_cert(vectors: Path, name: str) -> x509.Certificate:
    return x509.load_der_x509_certificate((vectors / COSE / f"{name}.der").read_bytes())


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


# --- the cBRSKI examples ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "signer"), EXAMPLES)
def test_example_verifies_with_its_signer(vectors, name, signer):
    data = hexfile(vectors, f"{name}.hex")
    assert len(data) == {"pvr": 201, "rvr": 1604, "voucher": 724}[name]
    msg = cose.decode(data)
    assert msg.alg == cose.ES256 and msg.protected == b"\xa1\x01\x26" and msg.kid is None
    assert msg.payload == hexfile(vectors, f"{name}-nonsigned.hex")
    cose.verify(msg, der_cert(vectors, signer))


def test_voucher_does_not_verify_with_the_masa_tls_cert(vectors):
    with pytest.raises(SignatureError):
        cose.verify(cose.decode(hexfile(vectors, "voucher.hex")), der_cert(vectors, "masa"))


def test_voucher_high_level_with_masa_ca_anchor(vectors):
    voucher, signer = verify_voucher_cose(
        hexfile(vectors, "voucher.hex"), [der_cert(vectors, "masa_ca")], AT,
        serial_number="JADA123456789", nonce=bytes.fromhex("57EED786AD404907"),
    )  # fmt: skip
    assert signer == der_cert(vectors, "masa_ca")
    assert voucher.assertion is Assertion.PROXIMITY
    # the known inconsistency: the voucher's nonce is not the PVR's
    with pytest.raises(ValidationError, match="nonce"):
        verify_voucher_cose(
            hexfile(vectors, "voucher.hex"), [der_cert(vectors, "masa_ca")], AT,
            nonce=bytes.fromhex("23BFBBC9C2BCF213"),
        )  # fmt: skip


def test_pvr_high_level_with_the_pledge_cert_as_signer(vectors):
    pledge = der_cert(vectors, "pledge")
    pvr, signer = verify_voucher_request_cose(hexfile(vectors, "pvr.hex"), None, AT, signer=pledge)
    assert signer == pledge and pvr.serial_number == "JADA123456789"
    pvr, signer = verify_voucher_request_cose(
        hexfile(vectors, "pvr.hex"), None, AT, signer=pledge.public_key()
    )
    assert signer is None


def test_rvr_chain_from_x5bag_to_the_domain_ca(vectors):
    data = hexfile(vectors, "rvr.hex")
    msg = cose.decode(data)
    assert len(msg.x5bag) == 2
    rvr, signer = verify_voucher_request_cose(data, [der_cert(vectors, "domain_ca")], AT)
    assert signer == msg.x5bag[0]  # the registrar cert in the bag, not registrar.der
    assert rvr.prior_signed_voucher_request == hexfile(vectors, "pvr.hex")
    # the prior PVR verifies too, with the pledge certificate
    verify_voucher_request_cose(
        rvr.prior_signed_voucher_request, None, AT, signer=der_cert(vectors, "pledge")
    )


def test_rvr_x5bag_registrar_cert_expired_in_2025(vectors):
    data = hexfile(vectors, "rvr.hex")
    with pytest.raises(SignatureError):
        verify_voucher_request_cose(
            data, [der_cert(vectors, "domain_ca")], datetime(2026, 1, 1, tzinfo=UTC)
        )


def test_rvr_wrong_anchor(vectors):
    with pytest.raises(SignatureError, match="does not chain"):
        verify_voucher_request_cose(hexfile(vectors, "rvr.hex"), [der_cert(vectors, "masa_ca")], AT)


def test_voucher_without_x5bag_and_wrong_anchor(vectors):
    with pytest.raises(SignatureError, match="no candidate"):
        verify_voucher_cose(hexfile(vectors, "voucher.hex"), [der_cert(vectors, "domain_ca")], AT)


def test_registrar_strips_x5bag_and_the_signature_survives(vectors):
    stripped = cose.without_x5(hexfile(vectors, "rvr.hex"))
    msg = cose.decode(stripped)
    assert msg.x5bag == () and dict(msg.unprotected) == {}
    cose.verify(msg, der_cert(vectors, "registrar"))
    assert cose.without_x5(hexfile(vectors, "voucher.hex")) == hexfile(vectors, "voucher.hex")


@pytest.mark.parametrize(
    ("name", "key_file"),
    [("pvr", "privkey_pledge.pem"), ("rvr", "privkey_registrar.pem"),
     ("voucher", "privkey_masa_ca.pem")],
)  # fmt: skip
def test_our_encoder_reproduces_the_examples_except_the_signature(vectors, name, key_file):
    """Signing the example payload with the example key and x5bag gives the published bytes
    up to the 64-byte ES256 signature value (ECDSA is randomised)."""
    published = hexfile(vectors, f"{name}.hex")
    theirs = cose.decode(published)
    keys = vectors / "constrained-voucher/examples/script-cose-examples/keys"
    key = serialization.load_pem_private_key((keys / key_file).read_bytes(), None)
    ours = cose.sign(theirs.payload, key, x5bag=list(theirs.x5bag))
    assert ours[:-64] == published[:-64]
    assert ours[:-64] + theirs.signature == published
    cose.verify(cose.decode(ours), key.public_key())


# --- tampering -------------------------------------------------------------------------------


def tampered(data: bytes, where: str) -> bytes:
    msg = cose.decode(data)
    if where == "signature":
        return flip(data, data.rfind(msg.signature) + 10)
    if where == "payload":  # the serial number's last digit: still valid CBOR
        return flip(data, data.find(msg.payload) + msg.payload.rfind(b"JADA123456789") + 12)
    if where == "protected":  # {1: -7} -> {1: -8}: ES256 becomes EdDSA
        return flip(data, data.find(b"\x43\xa1\x01\x26") + 3)
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["signature", "payload", "protected"])
@pytest.mark.parametrize(("name", "signer"), EXAMPLES)
def test_tampered_copies_fail(vectors, name, signer, where):
    original = hexfile(vectors, f"{name}.hex")
    data = tampered(original, where)
    assert data != original
    with pytest.raises(TAMPER):
        cose.verify(cose.decode(data), der_cert(vectors, signer))
    verify = verify_voucher_cose if name == "voucher" else verify_voucher_request_cose
    with pytest.raises(TAMPER):
        verify(data, None, AT, signer=der_cert(vectors, signer))


@pytest.mark.parametrize(("name", "signer"), EXAMPLES)
def test_no_single_bit_flip_yields_a_different_accepted_artifact(vectors, name, signer):
    data = hexfile(vectors, f"{name}.hex")
    cert = der_cert(vectors, signer)
    verify = verify_voucher_cose if name == "voucher" else verify_voucher_request_cose
    original, _ = verify(data, None, AT, signer=cert)
    accepted = 0
    for i in range(len(data)):
        try:
            artifact, _ = verify(flip(data, i), None, AT, signer=cert)
        except BrskiError:
            continue
        accepted += 1  # only inside the unsigned, unused x5bag
        assert artifact == original
    assert accepted == 0 or name == "rvr"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"", b""])),  # COSE_Mac0, not Sign1
        cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {}, None, b""])),  # detached
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", [], b"", b""])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa0", {}, b"", b""])),  # no alg
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x00", {}, b"", b""])),  # alg 0
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {1: -7}, b"", b""])),  # both buckets
        cbor2.dumps(cbor2.CBORTag(18, [b"\x01", {}, b"", b""])),  # protected not a map
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {32: b"junk"}, b"", b""])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {32: []}, b"", b""])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {4: "text"}, b"", b""])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa1\x01\x26", {}, b"", b""])) + b"\x00",
    ],
)
def test_malformed_messages_are_decode_errors(data):
    with pytest.raises(DecodeError):
        cose.decode(data)


def test_untagged_sign1_is_accepted(vectors):
    tagged = cbor2.loads(hexfile(vectors, "pvr.hex"))
    msg = cose.decode(cbor2.dumps(tagged.value))
    cose.verify(msg, der_cert(vectors, "pledge"))


# --- signing with fresh keys -----------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@functools.cache
def lab_pki():
    return create_test_pki(NOW - timedelta(days=1), serials=["LAB-0001"])


def lab_voucher() -> Voucher:
    return Voucher(
        serial_number="LAB-0001",
        assertion=Assertion.PROXIMITY,
        created_on=NOW,
        nonce=b"\x01" * 8,
        pinned_domain_cert=lab_pki().domain_ca.cert.public_bytes(serialization.Encoding.DER),
    )


@pytest.mark.parametrize(
    ("make_key", "alg", "sig_len"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), cose.ES256, 64),
        (lambda: ec.generate_private_key(ec.SECP384R1()), cose.ES384, 96),
        (lambda: ec.generate_private_key(ec.SECP521R1()), cose.ES512, 132),
        (ed25519.Ed25519PrivateKey.generate, cose.EDDSA, 64),
    ],
)
def test_round_trip_every_algorithm(make_key, alg, sig_len):
    key = make_key()
    data = sign_voucher_cose(lab_voucher(), key, kid=b"masa-1")
    msg = cose.decode(data)
    assert (msg.alg, len(msg.signature), msg.kid) == (alg, sig_len, b"masa-1")
    assert msg.payload == encode_cbor(lab_voucher())
    voucher, cert = verify_voucher_cose(data, None, NOW, signer=key.public_key())
    assert voucher == lab_voucher() and cert is None
    with pytest.raises(SignatureError):
        cose.verify(msg, ec.generate_private_key(ec.SECP256R1()).public_key())


def test_es256_signature_verifies_with_pycose_too():
    """Our cryptography-made ES256 signature is what pycose (python-ecdsa) accepts."""
    from pycose.keys import EC2Key
    from pycose.keys.curves import P256
    from pycose.messages import Sign1Message

    key = ec.generate_private_key(ec.SECP256R1())
    data = cose.sign(b"payload", key)
    numbers = key.public_key().public_numbers()
    msg = Sign1Message.decode(data)
    msg.key = EC2Key(crv=P256, x=numbers.x.to_bytes(32, "big"), y=numbers.y.to_bytes(32, "big"))
    assert msg.verify_signature()


def test_masa_chain_in_x5bag():
    pki = lab_pki()
    signer = pki.masa_signer
    data = sign_voucher_cose(lab_voucher(), signer.key, x5bag=[signer.cert])
    assert isinstance(cbor2.loads(data).value[1][32], bytes)  # one cert: a bare bstr
    _, cert = verify_voucher_cose(data, [pki.masa_ca.cert], NOW, serial_number="LAB-0001")
    assert cert == signer.cert
    data = sign_voucher_cose(lab_voucher(), signer.key, x5bag=[pki.masa_ca.cert, signer.cert])
    assert len(cbor2.loads(data).value[1][32]) == 2  # several: an array, any order
    assert verify_voucher_cose(data, [pki.masa_ca.cert], NOW)[1] == signer.cert


def test_rvr_round_trip_with_the_pvr_inside():
    pki = lab_pki()
    idevid = pki.idevids["LAB-0001"]
    pvr = VoucherRequest(
        serial_number="LAB-0001",
        assertion=Assertion.PROXIMITY,
        nonce=b"\x02" * 8,
        proximity_registrar_pubk=pki.registrar.cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    pvr_data = sign_voucher_cose(pvr, idevid.key)  # cBRSKI: no x5bag in a PVR
    rvr = VoucherRequest(
        serial_number="LAB-0001",
        assertion=Assertion.PROXIMITY,
        created_on=NOW,
        nonce=pvr.nonce,
        prior_signed_voucher_request=pvr_data,
        idevid_issuer=b"\x04\x18\x30\x16\x80\x14" + b"\xaa" * 20,
    )
    rvr_data = sign_voucher_cose(
        rvr, pki.registrar.key, x5bag=[pki.registrar.cert, pki.domain_ca.cert, idevid.cert]
    )
    got, registrar = verify_voucher_request_cose(rvr_data, None, NOW)
    assert got == rvr and registrar == pki.registrar.cert
    inner, _ = verify_voucher_request_cose(
        got.prior_signed_voucher_request, [pki.manufacturer_ca.cert], NOW, signer=idevid.cert
    )
    assert inner == pvr


def test_signing_refuses_invalid_input():
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(UsageError, match="invalid"):
        sign_voucher_cose(dataclasses.replace(lab_voucher(), nonce=b"short"), key)
    with pytest.raises(UsageError):
        cose.sign(b"x", ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(UsageError):
        cose.sign("not bytes", key)  # type: ignore[arg-type]


def test_no_signer_no_anchors_no_x5bag():
    key = ec.generate_private_key(ec.SECP256R1())
    data = sign_voucher_cose(lab_voucher(), key)
    with pytest.raises(SignatureError, match="names no signer"):
        verify_voucher_cose(data, None, NOW)


def test_signer_given_as_expired_cert_is_refused():
    pki = lab_pki()
    data = sign_voucher_cose(lab_voucher(), pki.masa_signer.key)
    later = NOW + timedelta(days=3000)
    with pytest.raises(SignatureError, match="not valid"):
        verify_voucher_cose(data, None, later, signer=pki.masa_signer.cert)
