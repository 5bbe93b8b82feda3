"""The cBRSKI COSE examples (constrained-voucher examples/cose-examples) through the registrar's
and the MASA's COSE code: the registrar rebuilds the example RVR payload byte for byte, the
MASA authenticates it once the pledge's chain is in the x5bag, and the example voucher passes
the registrar's strip unchanged. Skipped, with the reason, when the vectors are absent
(``vectors`` fixture; BRSKI_VECTORS overrides the path)."""

import binascii
import datetime
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from brski import certs, cose
from brski.voucher import VoucherRequest, decode_cbor
from registrar.constrained_voucher import check_pledge_request_cose, sign_rvr_cose
from registrar.masa import Masa
from registrar.masa_config import MasaConfig
from registrar.store import Store
from registrar.voucher_request import PledgeRequest
from registrar.web import Refusal

COSE = "constrained-voucher/examples/cose-examples"
AT = datetime.datetime(2023, 1, 1, tzinfo=datetime.UTC)  # every example cert is valid then
RVR_CREATED = datetime.datetime(2022, 12, 6, 20, 4, 15, 754000, tzinfo=datetime.UTC)


def hexfile(vectors: Path, name: str) -> bytes:
    return binascii.unhexlify(b"".join((vectors / COSE / name).read_bytes().split()))


def der_cert(vectors: Path, name: str) -> x509.Certificate:
    return x509.load_der_x509_certificate((vectors / COSE / f"{name}.der").read_bytes())


def text_key(vectors: Path, name: str) -> ec.EllipticCurvePrivateKey:
    """``openssl ec -text`` output (privkey_*.txt): the ``priv:`` hex block."""
    text = (vectors / COSE / f"privkey_{name}.txt").read_text()
    block = re.search(r"priv:\s*([0-9a-f:\s]+?)\s*pub:", text)
    assert block, "privkey file has no priv: block"
    value = int(re.sub(r"[:\s]", "", block.group(1)), 16)
    return ec.derive_private_key(value, ec.SECP256R1())


def masa_for(vectors: Path, tmp_path: Path) -> Masa:
    """A MASA whose manufacturer CA is the example's (masa_ca issued pledge.der)."""
    config = MasaConfig(
        source=tmp_path / "masa.toml", listen=[], cert_file=tmp_path / "x", key_file=tmp_path
        / "y", signer_chain=[der_cert(vectors, "masa_ca")],
        signer_key=text_key(vectors, "masa_ca"), manufacturer_cas=[der_cert(vectors, "masa_ca")],
        ownership="tofu", devices={}, assertion="proximity", nonceless=False, lifetime=600,
        store_path=tmp_path / "masa.db", log_level=20)
    return Masa(config, Store(tmp_path / "masa.db", "masa"))


def example_request(vectors: Path) -> PledgeRequest:
    pvr = hexfile(vectors, "pvr.hex")
    pledge = der_cert(vectors, "pledge")
    decoded = decode_cbor(cose.decode(pvr).payload, VoucherRequest)
    return PledgeRequest(decoded, pvr, pledge, certs.serial_number(pledge))


def test_registrar_accepts_the_example_pvr(vectors):
    """Its proximity-registrar-pubk is the key of the registrar certificate in the RVR."""
    registrar = cose.decode(hexfile(vectors, "rvr.hex")).x5bag[0]
    req = check_pledge_request_cose(hexfile(vectors, "pvr.hex"), [der_cert(vectors, "pledge")],
                                    registrar, [der_cert(vectors, "masa_ca")], AT)
    assert req.serial == "JADA123456789"


def test_registrar_rebuilds_the_example_rvr_byte_exact(vectors):
    example = cose.decode(hexfile(vectors, "rvr.hex"))
    rvr = sign_rvr_cose(example_request(vectors), text_key(vectors, "registrar"),
                        list(example.x5bag), [der_cert(vectors, "pledge")], RVR_CREATED)
    ours = cose.decode(rvr)
    assert ours.protected == example.protected
    assert ours.payload == example.payload == hexfile(vectors, "rvr-nonsigned.hex")
    assert ours.x5bag == (*example.x5bag, der_cert(vectors, "pledge"))


def test_masa_authenticates_the_example_with_the_pledge_chain(vectors, tmp_path):
    example = cose.decode(hexfile(vectors, "rvr.hex"))
    rvr = sign_rvr_cose(example_request(vectors), text_key(vectors, "registrar"),
                        list(example.x5bag), [der_cert(vectors, "pledge")], RVR_CREATED)
    req = masa_for(vectors, tmp_path).authenticate_cose(rvr, AT)
    assert req.serial == "JADA123456789"
    assert req.idevid == der_cert(vectors, "pledge")
    assert req.registrar == example.x5bag[0]
    assert req.registrar_certs == example.x5bag  # the registrar's chain, not the pledge's
    assert req.proximity and req.pvr is not None and req.pvr.nonce == req.rvr.nonce


def test_masa_refuses_the_example_rvr_as_published(vectors, tmp_path):
    """The published RVR's x5bag has the registrar chain only, no IDevID chain (cBRSKI §9.2
    requires it): the MASA cannot tell who signed the PVR, and says so."""
    with pytest.raises(Refusal) as caught:
        masa_for(vectors, tmp_path).authenticate_cose(hexfile(vectors, "rvr.hex"), AT)
    assert caught.value.status == 403
    assert "no certificate in the x5bag verifies" in caught.value.reason


def test_masa_refuses_the_example_after_the_registrar_cert_expired(vectors, tmp_path):
    example = cose.decode(hexfile(vectors, "rvr.hex"))
    rvr = sign_rvr_cose(example_request(vectors), text_key(vectors, "registrar"),
                        list(example.x5bag), [der_cert(vectors, "pledge")], RVR_CREATED)
    with pytest.raises(Refusal) as caught:
        masa_for(vectors, tmp_path).authenticate_cose(
            rvr, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
    assert caught.value.status == 403 and "not valid" in caught.value.reason


def test_example_voucher_survives_the_registrar_strip_byte_exact(vectors):
    """The published voucher is already in the stripped form (empty unprotected header)."""
    voucher = hexfile(vectors, "voucher.hex")
    assert cose.without_x5(voucher) == voucher
