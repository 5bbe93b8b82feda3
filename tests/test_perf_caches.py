"""The memo tables behind voucher verification (issue 18): they are hit, and they never make a
changed trust anchor, a rotated key or an expired certificate pass."""

from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from pycose import algorithms, headers
from pycose.messages import Sign1Message

from brski import chain, cose
from brski.errors import DecodeError, SignatureError
from brski.pki import create_test_pki
from brski.signed_voucher import sign_voucher_cms, verify_voucher_cms
from brski.voucher import Assertion, Voucher

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pkis():
    return create_test_pki(NOW - timedelta(days=1)), create_test_pki(NOW - timedelta(days=1))


def der(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_a_second_check_of_the_same_chain_builds_no_verifier(pkis, monkeypatch):
    pki = pkis[0]
    chain._PATHS.clear()
    calls = []
    real = chain._verify_chain
    monkeypatch.setattr(chain, "_verify_chain", lambda *a: calls.append(1) or real(*a))
    first = chain.verify_chain(pki.masa_signer.cert, [], [pki.masa_ca.cert], NOW)
    again = chain.verify_chain(pki.masa_signer.cert, [], [pki.masa_ca.cert], NOW + timedelta(1))
    assert first == again == [pki.masa_signer.cert, pki.masa_ca.cert]
    assert len(calls) == 1


def test_a_changed_or_removed_trust_anchor_is_not_served_from_the_table(pkis):
    ours, other = pkis
    chain.verify_chain(ours.masa_signer.cert, [], [ours.masa_ca.cert], NOW)  # now cached
    with pytest.raises(SignatureError):  # anchor replaced (a rotated CA key, another CA)
        chain.verify_chain(ours.masa_signer.cert, [], [other.masa_ca.cert], NOW)
    with pytest.raises(SignatureError):  # anchor withdrawn, another one left
        chain.verify_chain(ours.masa_signer.cert, [], [other.domain_ca.cert], NOW)


def test_a_cached_path_does_not_outlive_its_certificates(pkis):
    pki = pkis[0]
    leaf = pki.masa_signer.cert
    chain.verify_chain(leaf, [], [pki.masa_ca.cert], NOW)
    for at in (leaf.not_valid_after_utc + timedelta(seconds=1),
               leaf.not_valid_before_utc - timedelta(seconds=1)):
        with pytest.raises(SignatureError, match="expired or not yet valid"):
            chain.verify_chain(leaf, [], [pki.masa_ca.cert], at)


def test_a_voucher_from_a_rotated_masa_key_fails_after_the_old_one_passed(pkis):
    ours, other = pkis
    voucher = Voucher(serial_number="CACHE-1", assertion=Assertion.LOGGED, created_on=NOW,
                      nonce=b"0123456789abcdef", pinned_domain_cert=der(ours.domain_ca.cert))
    good = sign_voucher_cms(voucher, ours.masa_signer.key, [ours.masa_signer.cert], NOW)
    verify_voucher_cms(good, [ours.masa_ca.cert], NOW)
    rotated = sign_voucher_cms(voucher, other.masa_signer.key, [other.masa_signer.cert], NOW)
    with pytest.raises(SignatureError):
        verify_voucher_cms(rotated, [ours.masa_ca.cert], NOW)


def test_certificate_table_serves_equal_bytes_only(pkis):
    data = der(pkis[0].registrar.cert)
    first = chain.load_certificate(data)
    assert chain.load_certificate(bytearray(data)) is first
    broken = data[:-5]
    with pytest.raises(DecodeError):
        chain.load_certificate(broken)


def test_tables_are_bounded(pkis):
    leaf, anchor = pkis[0].masa_signer.cert, pkis[0].masa_ca.cert
    for i in range(chain.CACHE_SIZE + 10):
        chain.verify_chain(leaf, [leaf] * (i % 3), [anchor] * (1 + i // 3), NOW)
    assert len(chain._PATHS) <= chain.CACHE_SIZE


@pytest.mark.parametrize("kid", [None, b"k1"])
@pytest.mark.parametrize("bag", [0, 1, 2])
def test_cose_ecdsa_encoding_is_the_one_pycose_emits(pkis, kid, bag):
    pki = pkis[0]
    certs = [pki.masa_signer.cert, pki.masa_ca.cert][:bag]
    data = cose.sign(b"payload", pki.masa_signer.key, x5bag=certs, kid=kid)
    tag = cbor2.loads(data)
    uhdr = {}
    if kid is not None:
        uhdr[headers.KID] = kid
    if certs:
        ders = [der(c) for c in certs]
        uhdr[headers.X5bag] = ders[0] if len(ders) == 1 else ders
    ref = Sign1Message(phdr={headers.Algorithm: algorithms.Es256}, uhdr=uhdr, payload=b"payload")
    ref.signature = tag.value[3]
    assert ref.encode(sign=False) == data
    cose.verify(cose.decode(data), pki.masa_signer.cert)


def test_jpy_endpoint_table_never_skips_the_header_check():
    import os
    from ipaddress import IPv6Address

    from brski import jpy
    from brski.errors import ValidationError

    pledge = jpy.PledgeEndpoint(IPv6Address("fe80::1:2"), 5684, 7)
    sealer = jpy.FlowHeaderSealer(os.urandom(32))
    header = sealer.seal(pledge)
    assert sealer.open(header) == pledge and sealer.open(header) == pledge  # second: table
    forged = header[:20] + bytes([header[20] ^ 1]) + header[21:]
    with pytest.raises(SignatureError):
        sealer.open(forged)
    sealer.rotate(os.urandom(32))
    sealer.rotate(os.urandom(32))
    with pytest.raises(ValidationError):  # its key is gone: the table does not keep it alive
        sealer.open(header)
    with pytest.raises(SignatureError):  # another key's sealer, same key id
        jpy.FlowHeaderSealer(os.urandom(32)).open(header)
    for i in range(jpy._UNPACKED_MAX + 5):
        jpy._unpack(jpy._pack(jpy.PledgeEndpoint(IPv6Address("fe80::1:2"), 1 + i, 7)))
    assert len(jpy._UNPACKED) <= jpy._UNPACKED_MAX


def test_issued_by_table_keeps_only_yes_answers(pkis):
    ours, other = pkis
    leaf = ours.registrar.cert
    assert chain.directly_issued_by(leaf, ours.domain_ca.cert)
    assert chain.directly_issued_by(leaf, ours.domain_ca.cert)  # from the table
    # the same name under another key (a rotated domain CA key) does not issue it
    assert not chain.directly_issued_by(leaf, other.domain_ca.cert)
    assert not chain.directly_issued_by(leaf, other.domain_ca.cert)
