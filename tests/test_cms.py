"""CMS-signed vouchers: RFC 8995 App. C verified at a fixed time, tampering, signing."""

import base64
import dataclasses
import functools
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import cms as acms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from brski import cms
from brski.chain import verify_chain
from brski.errors import BrskiError, DecodeError, SignatureError, UsageError, ValidationError
from brski.pki import create_test_pki
from brski.signed_voucher import (
    sign_voucher_cms,
    verify_voucher_cms,
    verify_voucher_request_cms,
)
from brski.voucher import Assertion, Voucher, VoucherRequest, encode_json

APPC = "anima-bootstrap/examples"
SERIAL = "00-D0-E5-F2-00-02"
NONCE_TEXT = "-_XE9zK9q8Ll1qylMtLKeg"
AT = datetime(2021, 4, 13, 23, 0, tzinfo=UTC)  # after every App. C signature, certs valid
TAMPER = (SignatureError, DecodeError)

# stem, anchor file, class, signer CN fragment
APPC_BLOBS = [
    ("voucher", "vendor.crt", Voucher, "highway-test.example.com MASA"),
    ("vr", "vendor.crt", VoucherRequest, SERIAL),
    ("parboiled_vr", "ownerca_secp384r1.crt", VoucherRequest, "fountain-test.example.com"),
]


def blob(vectors: Path, stem: str) -> bytes:
    return base64.b64decode((vectors / APPC / f"{stem}_00-D0-E5-F2-00-02.b64").read_bytes())


def pem_cert(vectors: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((vectors / APPC / name).read_bytes())


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


# --- App. C vectors --------------------------------------------------------------------------


@pytest.mark.parametrize(("stem", "anchor", "cls", "signer"), APPC_BLOBS)
def test_appc_verifies_at_fixed_time(vectors, stem, anchor, cls, signer):
    data = blob(vectors, stem)
    assert len(data) == {"voucher": 1574, "vr": 1652, "parboiled_vr": 3943}[stem]
    sd = cms.parse(data)
    assert sd.econtent_type == cms.DATA and sd.version == 1
    assert sd.signer.signing_time.date() == AT.date()
    cert = cms.verify_signature(sd)
    chain = verify_chain(cert, sd.certificates, [pem_cert(vectors, anchor)], AT)
    assert chain[-1] == pem_cert(vectors, anchor)
    verify = verify_voucher_request_cms if cls is VoucherRequest else verify_voucher_cms
    artifact, signer_cert = verify(data, [pem_cert(vectors, anchor)], AT)
    assert type(artifact) is cls
    assert artifact.serial_number == SERIAL
    assert artifact.wire_text("nonce") == NONCE_TEXT
    assert signer in signer_cert.subject.rfc4514_string()


def test_appc_voucher_pledge_checks(vectors):
    data, anchor = blob(vectors, "voucher"), [pem_cert(vectors, "vendor.crt")]
    voucher, _ = verify_voucher_cms(data, anchor, AT, serial_number=SERIAL, nonce=NONCE_TEXT)
    assert voucher.assertion is Assertion.LOGGED
    raw_nonce = base64.urlsafe_b64decode(NONCE_TEXT + "==")
    verify_voucher_cms(data, anchor, AT, nonce=raw_nonce)
    with pytest.raises(ValidationError, match="serial-number"):
        verify_voucher_cms(data, anchor, AT, serial_number="00-D0-E5-F2-00-03")
    with pytest.raises(ValidationError, match="nonce"):
        verify_voucher_cms(data, anchor, AT, nonce=b"\x00" * 16)
    with pytest.raises(ValidationError, match="nonce"):
        verify_voucher_cms(data, anchor, AT, nonce="AAAAAAAAAAAAAAAAAAAAAA")


def test_appc_masa_cert_itself_as_trust_anchor(vectors):
    verify_voucher_cms(blob(vectors, "voucher"), [pem_cert(vectors, "masa.crt")], AT)


def test_appc_signature_only_without_anchors(vectors):
    # what a registrar does with a PVR from an unknown manufacturer (RFC 8995 §5.5)
    pvr, signer = verify_voucher_request_cms(blob(vectors, "vr"), None, AT)
    assert pvr.proximity_registrar_cert is not None
    assert signer.subject.rfc4514_string() == f"2.5.4.5={SERIAL}"


def test_appc_rvr_contains_the_verified_pvr(vectors):
    rvr, registrar = verify_voucher_request_cms(
        blob(vectors, "parboiled_vr"), [pem_cert(vectors, "ownerca_secp384r1.crt")], AT
    )
    pvr, _ = verify_voucher_request_cms(
        rvr.prior_signed_voucher_request, [pem_cert(vectors, "vendor.crt")], AT
    )
    assert pvr.serial_number == rvr.serial_number
    assert pvr.proximity_registrar_cert == registrar.public_bytes(serialization.Encoding.DER)


def test_appc_2020_rvr_verifies_in_2020(vectors):
    data = base64.b64decode((vectors / APPC / "parboiled_00-D0-E5-F2-00-02.b64").read_bytes())
    at = datetime(2020, 2, 26, tzinfo=UTC)
    rvr, _ = verify_voucher_request_cms(data, [pem_cert(vectors, "ownerca_secp384r1.crt")], at)
    assert rvr.serial_number == SERIAL


@pytest.mark.parametrize(
    ("at", "why"),
    [
        (datetime(2021, 4, 13, 12, 0, tzinfo=UTC), "before the MASA cert's notBefore"),
        (datetime(2023, 4, 14, tzinfo=UTC), "after the vendor CA expired"),
    ],
)
def test_appc_voucher_fails_outside_validity(vectors, at, why):
    with pytest.raises(SignatureError, match=r"not valid|does not chain"):
        verify_voucher_cms(blob(vectors, "voucher"), [pem_cert(vectors, "vendor.crt")], at)


def test_appc_voucher_wrong_anchor(vectors):
    with pytest.raises(SignatureError, match="does not chain"):
        verify_voucher_cms(
            blob(vectors, "voucher"), [pem_cert(vectors, "ownerca_secp384r1.crt")], AT
        )


def test_appc_pvr_is_not_a_voucher(vectors):
    with pytest.raises(ValidationError, match="expected ietf-voucher:voucher"):
        verify_voucher_cms(blob(vectors, "vr"), [pem_cert(vectors, "vendor.crt")], AT)


@pytest.mark.parametrize(
    ("stem", "key_file"),
    [
        ("voucher", "masa.key"),
        ("vr", "idevid_00-D0-E5-F2-00-02.key"),
        ("parboiled_vr", "jrc_prime256v1.key"),
    ],
)
def test_our_encoder_reproduces_appc_except_the_signature(vectors, stem, key_file):
    """Re-signing App. C content with the App. C key, certificates and signing time gives the
    published bytes once the (randomised) ECDSA signature value is swapped in."""
    published = blob(vectors, stem)
    theirs = cms.parse(published)
    key = serialization.load_pem_private_key((vectors / APPC / key_file).read_bytes(), None)
    ours = cms.sign(
        theirs.content, key, list(theirs.certificates), theirs.signer.signing_time,
        econtent_type=cms.DATA,
    )  # fmt: skip
    assert cms.parse(ours).signer.signed_attrs == theirs.signer.signed_attrs
    cms.verify_signature(cms.parse(ours))
    info = acms.ContentInfo.load(ours)
    info["content"]["signer_infos"][0]["signature"] = theirs.signer.signature
    assert info.dump(force=True) == published


# --- tampering -------------------------------------------------------------------------------


def tampered(data: bytes, where: str) -> bytes:
    sd = cms.parse(data)
    if where == "signature":
        return flip(data, data.rfind(sd.signer.signature) + len(sd.signer.signature) // 2)
    if where == "payload":
        # a semantic change that stays valid JSON: serial ...-02 becomes ...-03
        at = data.find(sd.content) + sd.content.find(SERIAL.encode()) + len(SERIAL) - 1
        return flip(data, at)
    if where == "signed-attrs-digest":
        return flip(data, data.find(sd.signer.message_digest) + 3)
    if where == "signed-attrs-time":
        stamp = sd.signer.signing_time.strftime("%y%m%d%H%M%SZ").encode()
        return flip(data, data.find(stamp) + 11)  # a seconds digit
    raise AssertionError(where)


@pytest.mark.parametrize(
    "where", ["signature", "payload", "signed-attrs-digest", "signed-attrs-time"]
)
@pytest.mark.parametrize(("stem", "anchor", "cls", "signer"), APPC_BLOBS)
def test_appc_tampered_copies_fail(vectors, stem, anchor, cls, signer, where):
    data = tampered(blob(vectors, stem), where)
    assert data != blob(vectors, stem)
    verify = verify_voucher_request_cms if cls is VoucherRequest else verify_voucher_cms
    with pytest.raises(TAMPER):
        verify(data, [pem_cert(vectors, anchor)], AT)


@pytest.mark.parametrize("stem", ["voucher", "vr"])
def test_no_single_bit_flip_yields_a_different_accepted_artifact(vectors, stem):
    """Every bit-0 flip anywhere in the blob either fails with a library error or (in the
    unsigned digestAlgorithms set, say) still yields exactly the original artifact."""
    data = blob(vectors, stem)
    anchors = [pem_cert(vectors, "vendor.crt")]
    verify = verify_voucher_cms if stem == "voucher" else verify_voucher_request_cms
    original, _ = verify(data, anchors, AT)
    accepted = 0
    for i in range(len(data)):
        try:
            artifact, _ = verify(flip(data, i), anchors, AT)
        except BrskiError:
            continue
        accepted += 1
        assert artifact == original and artifact.wire.texts == original.wire.texts
    assert accepted < 40  # only bytes outside what is signed, e.g. digestAlgorithms, tags


# --- structure -------------------------------------------------------------------------------


def reencoded(data: bytes, change) -> bytes:
    info = acms.ContentInfo.load(data)
    change(info["content"])
    return info.dump(force=True)


def test_missing_signed_attributes_are_refused(vectors):
    def drop(sd):
        sd["signer_infos"][0]["signed_attrs"] = None

    with pytest.raises(DecodeError, match="no signed attributes"):
        cms.parse(reencoded(blob(vectors, "voucher"), drop))


def test_content_type_attribute_must_match(vectors):
    def relabel(sd):
        sd["encap_content_info"]["content_type"] = cms.ANIMA_JSON_VOUCHER

    with pytest.raises(SignatureError, match="contentType"):
        cms.verify_signature(cms.parse(reencoded(blob(vectors, "voucher"), relabel)))


def test_two_signers_are_refused(vectors):
    def double(sd):
        sd["signer_infos"] = [sd["signer_infos"][0], sd["signer_infos"][0]]

    with pytest.raises(DecodeError, match="exactly one signer"):
        cms.parse(reencoded(blob(vectors, "voucher"), double))


def test_signer_cert_may_come_from_outside(vectors):
    def strip(sd):
        sd["certificates"] = None

    data = reencoded(blob(vectors, "voucher"), strip)
    with pytest.raises(SignatureError, match="not in the CMS"):
        verify_voucher_cms(data, [pem_cert(vectors, "vendor.crt")], AT)
    masa = pem_cert(vectors, "masa.crt")
    _, signer = verify_voucher_cms(data, [pem_cert(vectors, "vendor.crt")], AT, extra_certs=[masa])
    assert signer == masa


@pytest.mark.parametrize(
    "data",
    [b"", b"\x30", b"\x30\x00", b"\x04\x00", b"\x30\x03\x06\x01\x00", b"not DER at all"],
)
def test_garbage_is_a_decode_error(data):
    with pytest.raises(DecodeError):
        cms.parse(data)


def test_trailing_bytes_are_refused(vectors):
    with pytest.raises(DecodeError):
        cms.parse(blob(vectors, "voucher") + b"\x00")


# --- signing with fresh keys -----------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, 0, 0, 250000, tzinfo=UTC)


@functools.cache
def lab_pki():
    return create_test_pki(NOW - timedelta(days=1), serials=["LAB-0001"])


def lab_voucher(**changes) -> Voucher:
    pki = lab_pki()
    v = Voucher(
        serial_number="LAB-0001",
        assertion=Assertion.PROXIMITY,
        created_on=NOW,
        nonce=b"fresh-nonce-0001",
        pinned_domain_cert=pki.domain_ca.cert.public_bytes(serialization.Encoding.DER),
    )
    return dataclasses.replace(v, **changes)


def test_sign_and_verify_a_voucher_with_the_lab_pki():
    pki = lab_pki()
    voucher = lab_voucher()
    data = sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    sd = cms.parse(data)
    assert sd.econtent_type == cms.ANIMA_JSON_VOUCHER and sd.version == 3
    assert sd.content == encode_json(voucher)
    assert sd.signer.signing_time == NOW.replace(microsecond=0)
    got, signer = verify_voucher_cms(
        data, [pki.masa_ca.cert], NOW, serial_number="LAB-0001", nonce=b"fresh-nonce-0001"
    )
    assert got == voucher and signer == pki.masa_signer.cert


def test_sign_and_verify_a_pvr_with_an_idevid():
    pki = lab_pki()
    idevid = pki.idevids["LAB-0001"]
    pvr = VoucherRequest(
        serial_number="LAB-0001",
        assertion=Assertion.PROXIMITY,
        nonce=b"n" * 16,
        proximity_registrar_cert=pki.registrar.cert.public_bytes(serialization.Encoding.DER),
    )
    data = sign_voucher_cms(pvr, idevid.key, [idevid.cert], NOW)
    got, signer = verify_voucher_request_cms(data, [pki.manufacturer_ca.cert], NOW)
    assert got == pvr and signer == idevid.cert


def p384_chain():
    """A P-384 CA and a P-384 signer, as the RFC 8995 vendor CA is P-384."""
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731

    def cert(subject, issuer, public, signer, ca):
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA384())
        )

    ca = cert("P-384 CA", "P-384 CA", ca_key.public_key(), ca_key, True)
    return ca, cert("P-384 MASA", "P-384 CA", key.public_key(), ca_key, False), key


def test_p384_signer_uses_sha384():
    ca, signer_cert, key = p384_chain()
    data = sign_voucher_cms(lab_voucher(), key, [signer_cert, ca], NOW)
    sd = cms.parse(data)
    assert (sd.signer.digest_algorithm, sd.signer.signature_algorithm) == (
        "sha384",
        "sha384_ecdsa",
    )
    verify_voucher_cms(data, [ca], NOW)


def test_id_data_can_be_emitted_for_old_peers():
    pki = lab_pki()
    data = sign_voucher_cms(
        lab_voucher(), pki.masa_signer.key, [pki.masa_signer.cert], NOW, econtent_type=cms.DATA
    )
    sd = cms.parse(data)
    assert sd.econtent_type == cms.DATA and sd.version == 1
    verify_voucher_cms(data, [pki.masa_ca.cert], NOW)


def test_subject_key_identifier_signer_is_found():
    pki = lab_pki()
    data = sign_voucher_cms(lab_voucher(), pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    ski = pki.masa_signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    def by_ski(sd):  # SignerIdentifier is not signed: swapping its form keeps the signature
        sd["signer_infos"][0]["sid"] = acms.SignerIdentifier(
            {"subject_key_identifier": ski.value.digest}
        )

    verify_voucher_cms(reencoded(data, by_ski), [pki.masa_ca.cert], NOW)


def test_openssl_verifies_what_we_sign(tmp_path):
    pki = lab_pki()
    voucher = lab_voucher()
    data = sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    (tmp_path / "v.der").write_bytes(data)
    (tmp_path / "ca.pem").write_bytes(pki.masa_ca.cert_pem())
    out = subprocess.run(
        [
            "openssl",
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            tmp_path / "v.der",
            "-CAfile",
            tmp_path / "ca.pem",
            "-purpose",
            "any",
            "-attime",
            str(int(NOW.timestamp())),
        ],
        capture_output=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == encode_json(voucher)


def test_signing_refuses_invalid_input():
    pki = lab_pki()
    key, certs = pki.masa_signer.key, [pki.masa_signer.cert]
    with pytest.raises(UsageError, match="invalid"):
        sign_voucher_cms(lab_voucher(pinned_domain_cert=None), key, certs, NOW)
    with pytest.raises(UsageError, match="public key"):
        sign_voucher_cms(lab_voucher(), key, [pki.registrar.cert], NOW)
    with pytest.raises(UsageError):
        sign_voucher_cms(lab_voucher(), ed25519.Ed25519PrivateKey.generate(), certs, NOW)
    with pytest.raises(UsageError, match="aware"):
        sign_voucher_cms(lab_voucher(), key, certs, datetime(2026, 1, 1))


def test_expired_voucher_is_refused_on_verify():
    pki = lab_pki()
    voucher = lab_voucher(nonce=None, expires_on=NOW + timedelta(minutes=20))
    data = sign_voucher_cms(voucher, pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    verify_voucher_cms(data, [pki.masa_ca.cert], NOW + timedelta(minutes=19))
    with pytest.raises(ValidationError, match="expired"):
        verify_voucher_cms(data, [pki.masa_ca.cert], NOW + timedelta(minutes=21))
