"""EST-coaps certificate payloads and resource links (brski.coap_formats, brski.linkformat)."""

import datetime

import cbor2
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from brski import coap_formats as cf
from brski.errors import DecodeError, UsageError
from brski.linkformat import format_resource_links, matches_query
from brski.pki import create_test_pki

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW, serials=["P1"])


@pytest.mark.parametrize("form", [281, 287, 62])
def test_certificate_payloads_round_trip(pki, form):
    ca = pki.domain_ca.cert
    assert cf.decode_certs(cf.encode_certs([ca], form), form) == [ca]


def test_multipart_core_is_format_value_pairs(pki):
    ca, reg = pki.domain_ca.cert, pki.registrar.cert
    payload = cf.encode_certs([reg, ca], 62)
    assert cbor2.loads(payload) == [287, reg.public_bytes(Encoding.DER),
                                    287, ca.public_bytes(Encoding.DER)]
    assert cf.decode_certs(payload, 62) == [reg, ca]


def test_pkix_cert_carries_one_certificate(pki):
    with pytest.raises(UsageError):
        cf.encode_certs([pki.domain_ca.cert, pki.registrar.cert], 287)


@pytest.mark.parametrize("payload, form", [
    (b"\x30\x03abc", 287), (b"", 281), (cbor2.dumps([287]), 62),
    (cbor2.dumps([281, b"\x30\x00"]), 62), (cbor2.dumps({"a": 1}), 62),
    (cbor2.dumps([287, "text"]), 62), (b"\xff", 62), (b"x" * (65 * 1024), 287),
    (b"\x30\x00", 60)])
def test_bad_certificate_payloads_raise_decode_error(payload, form):
    with pytest.raises(DecodeError):
        cf.decode_certs(payload, form)


def test_cose_sign1_sniffing():
    assert cf.looks_like_cose_sign1(b"\xd2\x84C\xa1\x01&")
    assert cf.looks_like_cose_sign1(b"\x84")
    assert not cf.looks_like_cose_sign1(b'{"ietf-voucher-request:voucher":{}}')
    assert not cf.looks_like_cose_sign1(b"")


LINKS = [("/.well-known/brski/rv", (("rt", "brski.rv"), ("ct", "836"))),
         ("/.well-known/est/crts", (("rt", "ace.est.crts"), ("ct", "281 287 62")))]


def test_resource_links_as_the_drafts_write_them():
    assert format_resource_links(LINKS) == (
        '</.well-known/brski/rv>;rt=brski.rv;ct=836,'
        '</.well-known/est/crts>;rt=ace.est.crts;ct="281 287 62"')


@pytest.mark.parametrize("query, wanted", [
    ([], [0, 1]), (["rt=brski*"], [0]), (["rt=ace.est*"], [1]), (["rt=brski"], []),
    (["ct=287"], [1]), (["rt=brski.rv", "ct=836"], [0]), (["rt=brski.rv", "ct=60"], []),
    (["novalue"], [0, 1]), (["if=x"], [])])
def test_link_filtering(query, wanted):
    assert [i for i, (_, params) in enumerate(LINKS) if matches_query(params, query)] == wanted
