"""The tables issue 18 added to the MASA's path and the voucher codecs never serve a stale
answer: a rotated MASA key or chain gets a new CMS signing plan, certificate DER is kept per
object, a registrar whose domain CA changed is walked afresh, and a withdrawn manufacturer CA
or another domain is refused after an earlier success."""

import gc
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from brski import chain, cms
from brski.errors import SignatureError, UsageError
from brski.pki import create_test_pki, issue_idevid
from brski.signed_voucher import sign_voucher_cms, verify_voucher_cms
from brski.voucher import Assertion, Voucher, VoucherRequest
from lab.masa_inprocess import in_process_masa
from registrar import masa as masa_module
from registrar.masa import Masa
from registrar.store import Store
from registrar.voucher_request import PledgeRequest, build_rvr
from registrar.web import Refusal

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pkis():
    return create_test_pki(NOW - timedelta(days=1)), create_test_pki(NOW - timedelta(days=1))


def voucher(pki) -> Voucher:
    return Voucher(serial_number="CACHE-1", assertion=Assertion.LOGGED, created_on=NOW,
                   nonce=b"0123456789abcdef",
                   pinned_domain_cert=pki.domain_ca.cert.public_bytes(Encoding.DER))


def test_cms_signing_plan_follows_a_rotated_masa_key_and_chain(pkis):
    ours, other = pkis
    first = sign_voucher_cms(voucher(ours), ours.masa_signer.key, [ours.masa_signer.cert], NOW)
    verify_voucher_cms(first, [ours.masa_ca.cert], NOW)
    # the key rotated, with its certificate: the new signer is named, the old anchor refuses
    rotated = sign_voucher_cms(voucher(ours), other.masa_signer.key, [other.masa_signer.cert],
                               NOW)
    assert cms.find_signer(cms.parse(rotated)) == other.masa_signer.cert
    verify_voucher_cms(rotated, [other.masa_ca.cert], NOW)
    with pytest.raises(SignatureError):
        verify_voucher_cms(rotated, [ours.masa_ca.cert], NOW)
    # the new key with the old chain is not served from the old key's plan
    with pytest.raises(UsageError, match="none of the certificates"):
        sign_voucher_cms(voucher(ours), other.masa_signer.key, [ours.masa_signer.cert], NOW)
    # the same key, a longer chain: the certificates block follows
    longer = sign_voucher_cms(voucher(ours), ours.masa_signer.key,
                              [ours.masa_signer.cert, ours.masa_ca.cert], NOW)
    assert cms.parse(longer).certificates == (ours.masa_signer.cert, ours.masa_ca.cert)
    assert cms.parse(first).certificates == (ours.masa_signer.cert,)


def test_sign_plans_are_bounded(pkis):
    ours = pkis[0]
    for i in range(70):
        cms.sign(b"{}", ours.masa_signer.key, [ours.masa_signer.cert] * (1 + i % 7), NOW,
                 econtent_type=cms.DATA if i % 2 else cms.ANIMA_JSON_VOUCHER)
    assert len(cms._SIGN_PLANS) <= 64


def test_certificate_der_is_kept_per_object_not_per_identity_number(pkis):
    ders = [c.public_bytes(Encoding.DER) for c in
            (pkis[0].masa_ca.cert, pkis[1].masa_ca.cert, pkis[0].registrar.cert)]
    # Objects come and go (their id() numbers are reused), the table overflows and is
    # cleared: every answer is still the object's own DER.
    for i in range(6 * chain.CACHE_SIZE):
        der = ders[i % 3]
        cert = x509.load_der_x509_certificate(der)
        assert chain.certificate_der(cert) == der
        del cert
        if i % 100 == 0:
            gc.collect()
    assert len(chain._DER_BY_ID) <= 4 * chain.CACHE_SIZE


def test_signer_issuer_names_do_not_cross_between_signers(pkis):
    ours, other = pkis
    for pki in (ours, other, ours):
        data = sign_voucher_cms(voucher(pki), pki.masa_signer.key, [pki.masa_signer.cert], NOW)
        assert cms.find_signer(cms.parse(data)) == pki.masa_signer.cert
        verify_voucher_cms(data, [pki.masa_ca.cert], NOW)


def test_registrar_issuer_walk_is_redone_for_a_changed_domain_ca(pkis):
    ours, other = pkis  # same names, other keys: a re-keyed domain CA
    leaf = ours.registrar.cert
    assert masa_module._issuer_path(leaf, [ours.domain_ca.cert]) == (leaf, ours.domain_ca.cert)
    assert masa_module._issuer_path(leaf, [other.domain_ca.cert]) == (leaf,)
    assert masa_module._chain_top(leaf, [other.domain_ca.cert]) == leaf
    assert masa_module._chain_top(leaf, [ours.domain_ca.cert]) == ours.domain_ca.cert


def masa_for(pki, root: Path, manufacturer_cas) -> Masa:
    return in_process_masa(pki, root, manufacturer_cas=manufacturer_cas)


def cms_rvr(manufacturer, domain, serial: str) -> bytes:
    """A registrar voucher-request of ``domain``'s registrar for a pledge of
    ``manufacturer`` (the registrar's own chain goes with it)."""
    idevid = issue_idevid(manufacturer.manufacturer_ca, serial, "masa.example", NOW - timedelta(1))
    pvr = VoucherRequest(serial_number=serial, assertion=Assertion.PROXIMITY, created_on=NOW,
                         nonce=b"n" * 16,
                         proximity_registrar_cert=domain.registrar.cert.public_bytes(Encoding.DER))
    signed = sign_voucher_cms(pvr, idevid.key, [idevid.cert], NOW)
    rvr = build_rvr(PledgeRequest(pvr, signed, idevid.cert, serial), NOW)
    return sign_voucher_cms(rvr, domain.registrar.key,
                            [domain.registrar.cert, domain.domain_ca.cert], NOW)


def test_masa_refuses_after_a_success_once_the_anchor_or_the_owner_changed(pkis):
    ours, other = pkis
    with tempfile.TemporaryDirectory() as tmp:
        masa = masa_for(ours, Path(tmp), [ours.manufacturer_ca.cert])
        masa.request_voucher(cms_rvr(ours, ours, "CACHE-SN-1"), NOW)  # claims the device
        masa.request_voucher(cms_rvr(ours, ours, "CACHE-SN-1"), NOW)  # the owner again
        # another domain's registrar (its walk ends at its own domain CA): refused
        with pytest.raises(Refusal, match="already owned by another domain"):
            masa.request_voucher(cms_rvr(ours, other, "CACHE-SN-1"), NOW)
        # the manufacturer CA withdrawn (another one configured): the PVR chain is refused
        masa.config.manufacturer_cas = [other.manufacturer_ca.cert]
        with pytest.raises(Refusal) as refused:
            masa.request_voucher(cms_rvr(ours, ours, "CACHE-SN-2"), NOW)
        assert refused.value.status == 403
        masa.store.close()
        with Store(Path(tmp) / "masa.db", "masa") as store:
            assert len(store.vouchers("CACHE-SN-1")) == 2
            assert store.vouchers("CACHE-SN-2") == []


def test_an_owner_read_on_record_spares_the_claim_only_for_that_domain(pkis):
    # _owner found the device owned by the registrar's domain: the record needs no claim (an
    # ownership row is never changed); a first contact still claims, in the write, and a
    # domain that loses the claim between _owner's read and the write is refused there.
    ours, other = pkis
    with tempfile.TemporaryDirectory() as tmp:
        masa = masa_for(ours, Path(tmp), [ours.manufacturer_ca.cert])
        first = masa.authenticate(cms_rvr(ours, ours, "CACHE-SN-3"), NOW)
        assert first.owner_on_record == []  # nobody owns it yet: this record claims it
        assert masa._record(first, *masa._voucher(first, NOW), b"v", NOW).claim is not None
        masa.request_voucher(cms_rvr(ours, ours, "CACHE-SN-3"), NOW)
        again = masa.authenticate(cms_rvr(ours, ours, "CACHE-SN-3"), NOW)
        voucher_again, ca = masa._voucher(again, NOW)
        assert again.owner_on_record == [masa_module._spki_sha256(ca)]
        assert masa._record(again, voucher_again, ca, b"v", NOW).claim is None
        masa._issued(again, voucher_again, ca, b"again", NOW)
        # another domain reads no owner of its own: it would claim, and loses in the write
        theirs = masa.authenticate(cms_rvr(ours, other, "CACHE-SN-4"), NOW)
        voucher_theirs, their_ca = masa._voucher(theirs, NOW)  # SN-4 is nobody's yet
        assert theirs.owner_on_record == []
        masa.request_voucher(cms_rvr(ours, ours, "CACHE-SN-4"), NOW)  # ours claims it first
        with pytest.raises(Refusal, match="already owned by another domain"):
            masa._issued(theirs, voucher_theirs, their_ca, b"x", NOW)
        masa.store.close()
        with Store(Path(tmp) / "masa.db", "masa") as store:
            assert [v.voucher for v in store.vouchers("CACHE-SN-3")][1:] == [b"again"]
            claims = [e for e in store.audit_events("CACHE-SN-3") if e.event == "owner-claimed"]
            assert len(claims) == 1
            assert len(store.vouchers("CACHE-SN-4")) == 1
            assert store.owner("CACHE-SN-4") == masa_module._spki_sha256(ours.domain_ca.cert)
