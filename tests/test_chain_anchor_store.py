"""brski.chain keeps one cryptography Store per trust-anchor set (issue 18: the anchors' parsed
keys outlive one check). A changed, added or removed anchor gets its own Store, and the time,
the leaf and the intermediates are still checked on every verification."""

from datetime import UTC, datetime, timedelta

import pytest

from brski import chain
from brski.errors import SignatureError
from brski.pki import create_test_pki, issue_idevid

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pkis():
    return create_test_pki(NOW - timedelta(days=1)), create_test_pki(NOW - timedelta(days=1))


def fresh(pki, serial: str):
    return issue_idevid(pki.manufacturer_ca, serial, "masa.example", NOW - timedelta(1)).cert


def check(leaf, anchors, at=NOW):
    chain._PATHS.clear()  # the path table would answer first: make the Store do the work
    return chain.verify_chain(leaf, [], anchors, at)


def test_one_store_serves_every_check_against_the_same_anchors(pkis):
    ours = pkis[0]
    chain._STORES.clear()
    anchor = ours.manufacturer_ca.cert
    for serial in ("STORE-1", "STORE-2", "STORE-3"):
        leaf = fresh(ours, serial)
        assert check(leaf, [anchor]) == [leaf, anchor]
    assert len(chain._STORES) == 1
    assert chain._store([anchor]) is chain._store([anchor])


def test_a_changed_added_or_removed_anchor_gets_its_own_store(pkis):
    ours, other = pkis
    mine, theirs = fresh(ours, "ROTATE-1"), fresh(other, "ROTATE-2")
    old, new = ours.manufacturer_ca.cert, other.manufacturer_ca.cert
    check(mine, [old])  # the old anchor's Store is now kept
    with pytest.raises(SignatureError, match="does not chain"):
        check(theirs, [old])  # a leaf of another CA against the kept Store
    with pytest.raises(SignatureError, match="does not chain"):
        check(mine, [new])  # the anchor replaced (a rotated CA key): ours no longer passes
    assert check(theirs, [new]) == [theirs, new]
    assert check(mine, [new, old]) == [mine, old]  # an anchor added
    with pytest.raises(SignatureError):
        check(mine, [new])  # and withdrawn again
    assert chain._store([old]) is not chain._store([new])
    assert chain._store([new, old]) is not chain._store([old, new])  # order is part of the key


def test_a_kept_store_still_checks_validity_at_each_time(pkis):
    ours = pkis[0]
    leaf, anchor = ours.masa_signer.cert, ours.masa_ca.cert
    check(leaf, [anchor])
    for at in (leaf.not_valid_after_utc + timedelta(seconds=1),
               leaf.not_valid_before_utc - timedelta(seconds=1)):
        with pytest.raises(SignatureError, match="expired or not yet valid"):
            check(leaf, [anchor], at)
    assert check(leaf, [anchor]) == [leaf, anchor]


def test_a_kept_store_does_not_let_a_non_ca_issue(pkis):
    # A certificate the anchor issued that is not a CA (the registrar's) cannot act as an
    # intermediate: the CA policy runs on every verification, not once per Store.
    ours = pkis[0]
    check(ours.registrar.cert, [ours.domain_ca.cert])
    pledge_of_registrar = issue_idevid(ours.registrar, "NOT-A-CA", "masa.example",
                                       NOW - timedelta(1)).cert
    chain._PATHS.clear()
    with pytest.raises(SignatureError):
        chain.verify_chain(pledge_of_registrar, [ours.registrar.cert], [ours.domain_ca.cert], NOW)


def test_the_store_table_is_bounded(pkis):
    ours, other = pkis
    anchors = [ours.manufacturer_ca.cert, other.manufacturer_ca.cert, ours.domain_ca.cert]
    for i in range(80):
        chain._store(anchors[: 1 + i % 3] * (1 + i // 3))
    assert len(chain._STORES) <= 64


def test_every_certificate_load_certificate_accepts_has_printable_names_and_its_der(pkis):
    # load_certificate parses the names up front and leaves their RFC 4514 text to messages,
    # and keeps the input as the certificate's DER: under every single-byte change of an
    # IDevID, what it accepts also formats, and writes back as the input.
    import random

    from cryptography.hazmat.primitives.serialization import Encoding

    from brski.errors import DecodeError

    data = fresh(pkis[0], "NAMES-1").public_bytes(Encoding.DER)
    rng = random.Random(24)
    accepted = 0
    for index in range(len(data)):
        out = bytearray(data)
        out[index] ^= rng.randrange(1, 256)
        try:
            cert = chain.load_certificate(bytes(out))
        except DecodeError:
            continue
        accepted += 1
        # the DER kept for it is the input, and the same bytes cryptography writes back
        assert chain.certificate_der(cert) == cert.public_bytes(Encoding.DER) == bytes(out)
        assert cert.subject.rfc4514_string() is not None
        assert cert.issuer.rfc4514_string() is not None
    assert accepted  # changes in the key, signature or serial still load
