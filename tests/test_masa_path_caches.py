"""The per-registrar facts issue 18 item 2 keeps on the MASA's request path never serve a
stale answer: id-kp-cmcRA is judged per registrar certificate, a proximity-registrar-pubk is
judged per key bytes, and a rotated MASA key or chain is signed with afresh."""

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from brski import certs, cms
from brski.errors import ValidationError
from brski.pki import create_test_pki, issue_idevid
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, VoucherRequest
from lab.masa_inprocess import in_process_masa
from registrar.masa import Masa
from registrar.voucher_request import PledgeRequest, build_rvr
from registrar.web import Refusal

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pkis():
    return create_test_pki(NOW - timedelta(days=1)), create_test_pki(NOW - timedelta(days=1))


def masa_for(pki, root: Path) -> Masa:
    return in_process_masa(pki, root)


def rvr_from(pki, registrar, serial: str) -> bytes:
    idevid = issue_idevid(pki.manufacturer_ca, serial, "masa.example", NOW - timedelta(1))
    pvr = VoucherRequest(serial_number=serial, assertion=Assertion.PROXIMITY, created_on=NOW,
                         nonce=b"n" * 16,
                         proximity_registrar_cert=registrar.cert.public_bytes(Encoding.DER))
    signed = sign_voucher_cms(pvr, idevid.key, [idevid.cert], NOW)
    rvr = build_rvr(PledgeRequest(pvr, signed, idevid.cert, serial), NOW)
    return sign_voucher_cms(rvr, registrar.key, [registrar.cert, pki.domain_ca.cert], NOW)


def test_a_changed_registrar_certificate_without_cmc_ra_is_refused_after_one_with_it(pkis):
    ours = pkis[0]
    # the same domain, a certificate that is no registration authority (client auth only)
    plain = issue_idevid(ours.domain_ca, "NOT-AN-RA", "masa.example", NOW - timedelta(1))
    assert certs.has_cmc_ra(ours.registrar.cert) and not certs.has_cmc_ra(plain.cert)
    with tempfile.TemporaryDirectory() as tmp:
        masa = masa_for(ours, Path(tmp))
        masa.request_voucher(rvr_from(ours, ours.registrar, "RA-1"), NOW)
        with pytest.raises(Refusal, match="lacks id-kp-cmcRA") as refused:
            masa.request_voucher(rvr_from(ours, plain, "RA-2"), NOW)
        assert refused.value.status == 403
        masa.request_voucher(rvr_from(ours, ours.registrar, "RA-3"), NOW)  # and back
        masa.store.close()


def test_a_proximity_key_is_judged_by_its_bytes(pkis):
    ours, other = pkis
    good = certs.spki_der(ours.registrar.cert)
    request = VoucherRequest(serial_number="PUBK-1", assertion=Assertion.PROXIMITY,
                             created_on=NOW, nonce=b"n" * 16, proximity_registrar_pubk=good)
    request.validate(now=NOW)
    broken = bytearray(good)
    broken[-1] ^= 0x01  # the point is no longer on the curve
    for bad in (bytes(broken), good[:-1], b"\x30\x00"):
        with pytest.raises(ValidationError, match="SubjectPublicKeyInfo"):
            VoucherRequest(serial_number="PUBK-2", assertion=Assertion.PROXIMITY,
                           created_on=NOW, nonce=b"n" * 16,
                           proximity_registrar_pubk=bad).validate(now=NOW)
    VoucherRequest(serial_number="PUBK-3", assertion=Assertion.PROXIMITY, created_on=NOW,
                   nonce=b"n" * 16,
                   proximity_registrar_pubk=certs.spki_der(other.registrar.cert)
                   ).validate(now=NOW)


def test_a_signing_plan_follows_a_reissued_certificate_of_the_same_key(pkis):
    ours = pkis[0]
    voucher = VoucherRequest(serial_number="PLAN-1", assertion=Assertion.PROXIMITY,
                             created_on=NOW, nonce=b"n" * 16)
    first = cms.parse(sign_voucher_cms(voucher, ours.masa_signer.key,
                                       [ours.masa_signer.cert], NOW))
    # the same key in a reissued certificate (another serial): the new one is named
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    reissued = (x509.CertificateBuilder()
                .subject_name(ours.masa_signer.cert.subject)
                .issuer_name(ours.masa_ca.cert.subject)
                .public_key(ours.masa_signer.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(NOW - timedelta(1)).not_valid_after(NOW + timedelta(30))
                .sign(ours.masa_ca.key, hashes.SHA256()))
    second = cms.parse(sign_voucher_cms(voucher, ours.masa_signer.key, [reissued], NOW))
    assert second.certificates == (reissued,)
    assert second.signer.serial == reissued.serial_number != first.signer.serial
    assert cms.find_signer(second) == reissued


def test_issuer_walk_skips_a_same_named_ca_of_another_key_in_either_order(pkis):
    from registrar import masa as masa_module

    ours, other = pkis  # same names, other keys
    leaf, real, impostor = ours.registrar.cert, ours.domain_ca.cert, other.domain_ca.cert
    idevid = issue_idevid(ours.manufacturer_ca, "WALK-1", "masa.example", NOW - timedelta(1))
    for pool in ([impostor, real], [real, impostor], [idevid.cert, impostor, leaf, real]):
        assert masa_module._issuer_path(leaf, pool) == (leaf, real)
    assert masa_module._issuer_path(leaf, [impostor, idevid.cert]) == (leaf,)
    assert masa_module._issuer_path(real, [impostor]) == (real,)  # self-issued: the top
