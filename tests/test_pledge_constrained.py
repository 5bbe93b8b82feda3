"""pledge_sim.constrained: the constrained pledge's PVR, voucher checks and EST-coaps answers.

Pure functions, tested three ways: against the cBRSKI and RFC 9148 example vectors (skipped with
the reason when absent; BRSKI_VECTORS overrides the path), against vouchers from a real MASA
process (through the registrar's own COSE voucher function, as tests/test_masa_cose.py does),
and against vouchers forged or altered here.
"""

import binascii
import datetime
import os
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from brski import certs, cose
from brski import est as codec
from brski.errors import DecodeError, UsageError
from brski.pki import create_test_pki
from brski.signed_voucher import sign_voucher_cose, verify_voucher_request_cose
from brski.voucher import Assertion, Voucher, VoucherRequest, decode_cbor
from pledge_sim.constrained import (
    Proximity,
    accept_voucher_cose,
    build_cose_pvr,
    build_csr_der,
    check_registrar_pinned,
    decode_est_certs,
    enrolled_ldevid,
    join_proxies,
)
from pledge_sim.est import EstError, new_ldevid_key
from pledge_sim.identity import PledgeIdentity
from pledge_sim.voucher_check import VoucherRejected
from registrar.constrained_voucher import check_pledge_request_cose
from registrar.web import Refusal
from tests.test_masa_cose import Lab, obtain

COSE = "constrained-voucher/examples/cose-examples"
EST = "rfc9148-est-coaps"
AT = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)  # every example cert is valid then
NOW = datetime.datetime.now(datetime.UTC)


# -- helpers ---------------------------------------------------------------------------------


def identity(cert: x509.Certificate, key) -> PledgeIdentity:
    return PledgeIdentity(certs.serial_number(cert), cert, key, Path("-"), Path("-"))


def hexfile(vectors: Path, name: str) -> bytes:
    return binascii.unhexlify(b"".join((vectors / COSE / name).read_bytes().split()))


def der_cert(vectors: Path, name: str) -> x509.Certificate:
    return x509.load_der_x509_certificate((vectors / COSE / f"{name}.der").read_bytes())


def text_key(vectors: Path, name: str) -> ec.EllipticCurvePrivateKey:
    text = (vectors / COSE / f"privkey_{name}.txt").read_text()
    block = re.search(r"priv:\s*([0-9a-f:\s]+?)\s*pub:", text)
    assert block, "privkey file has no priv: block"
    return ec.derive_private_key(int(re.sub(r"[:\s]", "", block.group(1)), 16), ec.SECP256R1())


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["CP-1"])


@pytest.fixture(scope="module")
def other_pki():
    return create_test_pki(NOW, manufacturer="Other Manufacturer", serials=["CP-1"])


def masa_voucher(pki, *, serial="CP-1", nonce=b"n" * 16, signer=None, x5bag=True,
                 **fields) -> bytes:
    """A COSE voucher signed by this PKI's MASA signer (stripped unless x5bag)."""
    signer = signer or pki.masa_signer
    values = {"assertion": Assertion.PROXIMITY, "created_on": NOW, "serial_number": serial,
              "nonce": nonce,
              "pinned_domain_cert": pki.domain_ca.cert.public_bytes(Encoding.DER)}
    values.update(fields)
    signed = sign_voucher_cose(Voucher(**values), signer.key,
                               x5bag=[signer.cert, pki.masa_ca.cert])
    return signed if x5bag else cose.without_x5(signed)


def accept(pki, data, **kw):
    args = {"anchors": [pki.masa_ca.cert], "masa_signers": [pki.masa_signer.cert],
            "serial": "CP-1", "nonce": b"n" * 16, "now": NOW}
    args.update(kw)
    return accept_voucher_cose(data, **args)


def rejected(pki, data, **kw) -> str:
    with pytest.raises(VoucherRejected) as caught:
        accept(pki, data, **kw)
    return caught.value.code


# -- the PVR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(Proximity))
def test_pvr_in_every_proximity_form_passes_the_registrars_checks(pki, form):
    pledge = pki.idevids["CP-1"]
    nonce = os.urandom(16)
    pvr = build_cose_pvr(identity(pledge.cert, pledge.key), pki.registrar.cert, nonce, NOW,
                         form)
    assert cose.decode(pvr).x5bag == ()  # cBRSKI §9.2: the pledge sends none
    req = check_pledge_request_cose(pvr, [pledge.cert], pki.registrar.cert,
                                    [pki.manufacturer_ca.cert], NOW)
    assert req.serial == "CP-1" and req.pvr.nonce == nonce
    assert req.pvr.assertion is Assertion.PROXIMITY and req.pvr.created_on is not None
    # ... and names this registrar: another registrar of the same domain refuses it (MITM).
    stranger = create_test_pki(NOW, serials=[]).registrar.cert
    with pytest.raises(Refusal) as caught:
        check_pledge_request_cose(pvr, [pledge.cert], stranger, [pki.manufacturer_ca.cert], NOW)
    assert caught.value.status == 401


def test_pvr_fields_per_form(pki):
    pledge = pki.idevids["CP-1"]
    me = identity(pledge.cert, pledge.key)
    got = {}
    for form in Proximity:
        pvr = build_cose_pvr(me, pki.registrar.cert, b"x" * 8, NOW, form)
        got[form], _ = verify_voucher_request_cose(pvr, [pki.manufacturer_ca.cert], NOW,
                                                   signer=pledge.cert)
    assert got[Proximity.CERT].proximity_registrar_cert == pki.registrar.cert.public_bytes(
        Encoding.DER)
    assert got[Proximity.PUBK].proximity_registrar_pubk == certs.spki_der(pki.registrar.cert)
    assert (got[Proximity.PUBK_SHA256].proximity_registrar_pubk_sha256
            == certs.spki_sha256(pki.registrar.cert))
    assert got[Proximity.PUBK_SHA256].proximity_registrar_cert is None


def test_pvr_refuses_an_empty_nonce(pki):
    pledge = pki.idevids["CP-1"]
    with pytest.raises(UsageError):
        build_cose_pvr(identity(pledge.cert, pledge.key), pki.registrar.cert, b"", NOW)


def test_pvr_rebuilds_the_cbrski_example_byte_exact(vectors):
    """The example PVR (no created-on: a clockless pledge) from its key, nonce and registrar."""
    example = cose.decode(hexfile(vectors, "pvr.hex"))
    decoded = decode_cbor(example.payload, VoucherRequest)
    registrar = cose.decode(hexfile(vectors, "rvr.hex")).x5bag[0]
    pvr = build_cose_pvr(identity(der_cert(vectors, "pledge"), text_key(vectors, "pledge")),
                         registrar, decoded.nonce, None, Proximity.PUBK)
    ours = cose.decode(pvr)
    assert ours.payload == example.payload == hexfile(vectors, "pvr-nonsigned.hex")
    assert ours.protected == example.protected
    cose.verify(ours, der_cert(vectors, "pledge"))


# -- the voucher: vectors -------------------------------------------------------------------------


def test_example_voucher_accepted_with_the_masa_anchor_alone(vectors):
    """The published voucher is stripped and signed with masa_ca's own key."""
    got = accept_voucher_cose(hexfile(vectors, "voucher.hex"),
                              anchors=[der_cert(vectors, "masa_ca")], serial="JADA123456789",
                              nonce=bytes.fromhex("57EED786AD404907"), now=AT)
    assert got.signer == der_cert(vectors, "masa_ca")
    assert got.pinned.subject.rfc4514_string().endswith("CN=Custom-ER Global CA")
    clockless = accept_voucher_cose(hexfile(vectors, "voucher.hex"),
                                    anchors=[der_cert(vectors, "masa_ca")],
                                    serial="JADA123456789",
                                    nonce=bytes.fromhex("57EED786AD404907"), now=None)
    assert clockless.voucher == got.voucher


def test_example_voucher_rejected_for_the_example_pvrs_nonce(vectors):
    """The published voucher's nonce is not the published PVR's (a flaw of the examples):
    a pledge that sent the PVR must refuse that voucher."""
    pvr_nonce = decode_cbor(cose.decode(hexfile(vectors, "pvr.hex")).payload,
                            VoucherRequest).nonce
    with pytest.raises(VoucherRejected) as caught:
        accept_voucher_cose(hexfile(vectors, "voucher.hex"),
                            anchors=[der_cert(vectors, "masa_ca")], serial="JADA123456789",
                            nonce=pvr_nonce, now=AT)
    assert caught.value.code == "nonce"


def test_example_voucher_rejected_by_wrong_anchor_serial_or_signer(vectors):
    voucher = hexfile(vectors, "voucher.hex")
    nonce = bytes.fromhex("57EED786AD404907")
    cases = [
        ({"anchors": [der_cert(vectors, "domain_ca")], "serial": "JADA123456789"}, "signature"),
        ({"anchors": [der_cert(vectors, "masa_ca")], "serial": "JADA000000000"}, "serial"),
        # A pre-installed signer that did not sign it, and the anchor's key did: still fine.
        ({"anchors": [der_cert(vectors, "masa_ca")], "serial": "JADA123456789",
          "masa_signers": [der_cert(vectors, "masa")]}, None),
    ]
    for kw, code in cases:
        if code is None:
            accept_voucher_cose(voucher, nonce=nonce, now=AT, **kw)
            continue
        with pytest.raises(VoucherRejected) as caught:
            accept_voucher_cose(voucher, nonce=nonce, now=AT, **kw)
        assert caught.value.code == code, kw


# -- the voucher: forged and altered ----------------------------------------------------------


def test_stripped_voucher_needs_the_masa_signer_certificate(pki):
    stripped = masa_voucher(pki, x5bag=False)
    assert accept(pki, stripped).signer == pki.masa_signer.cert
    # Without the signer certificate the anchor alone cannot verify a leaf's signature.
    assert rejected(pki, stripped, masa_signers=[]) == "signature"
    # The unstripped voucher carries its signer: the anchor suffices.
    assert accept(pki, masa_voucher(pki), masa_signers=[]).signer == pki.masa_signer.cert


def test_voucher_from_another_manufacturer_rejected(pki, other_pki):
    forged = masa_voucher(other_pki, x5bag=False)
    assert rejected(pki, forged) == "signature"
    # Its signer pre-installed by mistake still does not chain to our MASA anchor.
    assert rejected(pki, forged, masa_signers=[other_pki.masa_signer.cert]) == "signature"
    assert rejected(pki, masa_voucher(other_pki)) == "signature"


def test_altered_or_garbage_voucher_rejected(pki):
    good = bytearray(masa_voucher(pki, x5bag=False))
    good[-5] ^= 0x01  # inside the signature
    assert rejected(pki, bytes(good)) == "signature"
    assert rejected(pki, b"\xd2\x84") == "malformed"
    assert rejected(pki, b"") == "malformed"
    assert rejected(pki, b"\xff" * 100) == "malformed"


def test_voucher_checks_serial_nonce_assertion_pin_and_time(pki):
    assert rejected(pki, masa_voucher(pki, serial="CP-2")) == "serial"
    assert rejected(pki, masa_voucher(pki, nonce=b"m" * 16)) == "nonce"
    nonceless = masa_voucher(pki, nonce=None, expires_on=NOW + datetime.timedelta(minutes=5))
    assert rejected(pki, nonceless) == "nonce"
    assert accept(pki, nonceless, accept_nonceless=True).voucher.nonce is None
    pubk_only = masa_voucher(pki, pinned_domain_cert=None,
                             pinned_domain_pubk=certs.spki_der(pki.domain_ca.cert))
    assert rejected(pki, pubk_only) == "pinned-domain-cert"
    short = masa_voucher(pki, nonce=None, expires_on=NOW + datetime.timedelta(seconds=1))
    assert rejected(pki, short, now=NOW + datetime.timedelta(hours=1),
                    accept_nonceless=True) == "expired"
    # Clockless: validity is not held against it, the signature still is.
    assert accept(pki, short, now=None, accept_nonceless=True).pinned == pki.domain_ca.cert


# -- the voucher from a real MASA process --------------------------------------------------------


@pytest.fixture(scope="module")
def masa_lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("pledge-constrained"))
    lab.masa.start()
    yield lab
    lab.masa.stop()
    assert "Traceback" not in lab.masa.log(), lab.masa.log()


@pytest.mark.parametrize("form", list(Proximity))
def test_real_masa_voucher_accepted_by_the_pledge(masa_lab, form):
    idevid = masa_lab.idevid("SN-A")
    nonce = os.urandom(16)
    pvr = build_cose_pvr(identity(idevid.cert, idevid.key), masa_lab.registrar.cert, nonce,
                         NOW, form)
    got = obtain(masa_lab, pvr, [idevid.cert])
    assert cose.decode(got.for_pledge).x5bag == ()  # what reaches the pledge: stripped
    accepted = accept_voucher_cose(got.for_pledge, anchors=[masa_lab.masa_ca],
                                   masa_signers=[masa_lab.masa_signer], serial="SN-A",
                                   nonce=nonce, now=datetime.datetime.now(datetime.UTC))
    assert accepted.pinned == masa_lab.domain_ca
    assert accepted.signer == masa_lab.masa_signer
    # The same voucher for someone else, or for another attempt: refused.
    with pytest.raises(VoucherRejected) as caught:
        accept_voucher_cose(got.for_pledge, anchors=[masa_lab.masa_ca],
                            masa_signers=[masa_lab.masa_signer], serial="SN-B", nonce=nonce,
                            now=None)
    assert caught.value.code == "serial"
    with pytest.raises(VoucherRejected) as caught:
        accept_voucher_cose(got.for_pledge, anchors=[masa_lab.masa_ca],
                            masa_signers=[masa_lab.masa_signer], serial="SN-A",
                            nonce=os.urandom(16), now=None)
    assert caught.value.code == "nonce"
    with pytest.raises(VoucherRejected) as caught:
        accept_voucher_cose(got.for_pledge, anchors=[masa_lab.masa_ca], serial="SN-A",
                            nonce=nonce, now=None)
    assert caught.value.code == "signature"  # stripped: the pledge needs the signer cert


# -- EST-coaps ------------------------------------------------------------------------------


def est_vector(vectors: Path, name: str) -> bytes:
    return (vectors / EST / name).read_bytes()


def test_est_coaps_crts_and_sen_answers_from_rfc9148(vectors):
    crts = decode_est_certs(est_vector(vectors, "A.1-payload1.bin"), 281)
    assert len(crts) == 1 and crts[0].issuer == crts[0].subject
    issued = decode_est_certs(est_vector(vectors, "A.2-payload2.bin"), 281)
    assert len(issued) == 1
    # A.2's request is the CSR the answer is for: same public key.
    csr = codec.decode_csr_body(codec.encode_base64(est_vector(vectors, "A.2-payload1.bin")))
    assert issued[0].public_key() == csr.public_key()


def test_est_coaps_refuses_wrong_format_or_body(vectors):
    pkcs7 = est_vector(vectors, "A.1-payload1.bin")
    cert_der = (vectors / COSE / "pledge.der").read_bytes()
    assert decode_est_certs(cert_der, 287) == [der_cert(vectors, "pledge")]
    bad = [(pkcs7, 287), (cert_der, 281), (pkcs7, None), (pkcs7, 62), (pkcs7[:-10], 281),
           (cert_der + b"\0", 287), (b"", 281), (b"", 287),
           (codec.encode_base64(pkcs7), 281)]  # base64 is HTTPS EST's form, not EST-coaps'
    for payload, cf in bad:
        with pytest.raises(EstError):
            decode_est_certs(payload, cf)


def issue(ca, key, now):
    return (x509.CertificateBuilder().subject_name(
        x509.Name.from_rfc4514_string("CN=pledge CP-1")).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256()))


def test_csr_is_der_pkcs10_for_our_key():
    key = new_ldevid_key()
    csr = x509.load_der_x509_csr(build_csr_der("CP-1", key))
    assert csr.is_signature_valid and csr.public_key() == key.public_key()


def test_shortcut_done_when_the_pinned_root_signed_the_ldevid(pki):
    key = new_ldevid_key()
    ldevid = issue(pki.domain_ca, key, NOW)
    got = enrolled_ldevid([ldevid], key, pki.domain_ca.cert, None, NOW)
    assert got is not None and got[0] == ldevid and got[1][-1] == pki.domain_ca.cert
    # Not our key: refused, whatever signed it.
    with pytest.raises(EstError):
        enrolled_ldevid([ldevid], new_ldevid_key(), pki.domain_ca.cert, None, NOW)


def test_shortcut_needs_crts_when_the_pin_is_not_the_issuer(pki):
    other = create_test_pki(NOW, domain="Other Domain", serials=[])
    key = new_ldevid_key()
    ldevid = issue(other.domain_ca, key, NOW)  # another CA: /crts must decide
    assert enrolled_ldevid([ldevid], key, pki.domain_ca.cert, None, NOW) is None
    # /crts with that CA chains it; /crts without it does not.
    assert enrolled_ldevid([ldevid], key, pki.domain_ca.cert, [other.domain_ca.cert],
                           NOW) is not None
    with pytest.raises(EstError):
        enrolled_ldevid([ldevid], key, pki.domain_ca.cert, [pki.domain_ca.cert], NOW)


def test_shortcut_refuses_a_forged_ldevid_in_the_pinned_cas_name(pki):
    """Same issuer name as the pinned CA, signed by another key: not done, not chained."""
    impostor = create_test_pki(NOW, domain="Example Domain", serials=[])
    assert impostor.domain_ca.cert.subject == pki.domain_ca.cert.subject
    key = new_ldevid_key()
    forged = issue(impostor.domain_ca, key, NOW)
    with pytest.raises(EstError):
        enrolled_ldevid([forged], key, pki.domain_ca.cert, None, NOW)


# -- discovery and the pinned registrar -----------------------------------------------------------


def test_join_proxies_from_a_core_answer():
    answer = b'<>;brski-jp=8485,<>;brski-jp="63245",<>;brski-jp=61617;var="c509 v2"'
    assert join_proxies(answer, "fe80::1%join0") == [("fe80::1%join0", 8485),
                                                     ("fe80::1%join0", 63245)]
    legacy = b"<coaps://[fe80::2]:8485>;rt=brski.jp"
    # A link-local address in the legacy form is on the link the answer came from: its zone.
    assert join_proxies(legacy, "fe80::9%join0") == [("fe80::2%join0", 8485)]
    assert join_proxies(b"<coaps://[fd00::2]:8485>;rt=brski.jp", "fe80::9%join0") == [
        ("fd00::2", 8485)]
    assert join_proxies(b"</sensors>;rt=temp", "fe80::1%join0") == []
    with pytest.raises(DecodeError):
        join_proxies(b"<>;brski-jp=99999", "fe80::1%join0")


def test_registrar_must_chain_to_the_pinned_cert(pki, other_pki):
    chain = [pki.registrar.cert, pki.domain_ca.cert]
    check_registrar_pinned(chain, pki.domain_ca.cert, NOW)
    check_registrar_pinned(chain[:1], pki.domain_ca.cert, None)
    check_registrar_pinned(chain[:1], pki.registrar.cert, NOW)  # the EE cert pinned itself
    for bad in ([other_pki.registrar.cert, other_pki.domain_ca.cert], []):
        with pytest.raises(VoucherRejected) as caught:
            check_registrar_pinned(bad, pki.domain_ca.cert, NOW)
        assert caught.value.code == "registrar-not-pinned"
