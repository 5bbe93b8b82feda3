"""brski.cms writes its DER directly (issue 18): the encoding rules it must keep."""

import base64
import random
from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import cms as acms

from brski import cms, der_codec
from brski.errors import DecodeError
from brski.pki import create_test_pki

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki():
    return create_test_pki(NOW - timedelta(days=1))


@pytest.mark.parametrize("year", [1949, 2050, 2051])
def test_signing_time_outside_utctime_years_is_generalized_time(pki, year):
    # RFC 5652 §11.3: GeneralizedTime before 1950 and from 2050 (this used to raise).
    when = datetime(year, 6, 1, 8, 30, tzinfo=UTC)
    data = cms.sign(b"{}", pki.masa_signer.key, [pki.masa_signer.cert], when)
    sd = cms.parse(data)
    assert sd.signer.signing_time == when
    cms.verify_signature(sd)
    attrs = acms.ContentInfo.load(data)["content"]["signer_infos"][0]["signed_attrs"]
    time_attr = next(a for a in attrs if a["type"].native == "signing_time")
    assert time_attr["values"][0].name == "generalized_time"


@pytest.mark.parametrize("size", [0, 127, 128, 255, 256, 70_000])
@pytest.mark.parametrize("order", [0, 1])
def test_certificates_kept_in_order_and_lengths_minimal(pki, size, order):
    certs = [pki.masa_signer.cert, pki.masa_ca.cert][:: 1 - 2 * order]
    data = cms.sign(b"a" * size, pki.masa_signer.key, certs, NOW)
    info = acms.ContentInfo.load(data, strict=True)
    assert info["content"]["encap_content_info"]["content"].native == b"a" * size
    # the headers worked out from the sizes are the ones written level by level
    sd_fields = info["content"]
    encap = der_codec.tlv(der_codec.SEQUENCE, der_codec.oid(cms.ANIMA_JSON_VOUCHER),
                          der_codec.tlv(0xA0, der_codec.tlv(der_codec.OCTET_STRING,
                                                            b"a" * size)))
    assert sd_fields["encap_content_info"].dump() == encap
    signer = sd_fields["signer_infos"][0]
    assert signer.dump() == der_codec.tlv(
        der_codec.SEQUENCE, *(signer[name].dump() for name in (
            "version", "sid", "digest_algorithm", "signed_attrs", "signature_algorithm",
            "signature")))
    assert data == der_codec.tlv(
        der_codec.SEQUENCE, info["content_type"].dump(), der_codec.tlv(
            0xA0, der_codec.tlv(der_codec.SEQUENCE, *(sd_fields[name].dump() for name in (
                "version", "digest_algorithms", "encap_content_info", "certificates",
                "signer_infos")))))
    sd = cms.parse(data)
    assert sd.content == b"a" * size and list(sd.certificates) == certs
    assert cms.verify_signature(sd) == pki.masa_signer.cert


# --- the direct reader agrees with asn1crypto ------------------------------------------------

APPC = "anima-bootstrap/examples"


def appc(vectors, stem: str) -> bytes:
    return base64.b64decode((vectors / APPC / f"{stem}_00-D0-E5-F2-00-02.b64").read_bytes())


def both(data: bytes):
    """(direct reader's result or None, asn1crypto's result or the DecodeError it raised)."""
    try:
        fast = cms._parse_canonical(data, cms.ACCEPTED_CONTENT_TYPES)
    except (der_codec.DerError, ValueError, IndexError, KeyError):
        fast = None
    except DecodeError as exc:
        fast = exc
    try:
        slow = cms._parse(data, cms.ACCEPTED_CONTENT_TYPES)
    except Exception as exc:  # any refusal counts as one
        slow = exc
    return fast, slow


def same(fast, slow) -> bool:
    if isinstance(fast, Exception):
        return isinstance(slow, Exception)
    return fast is None or (not isinstance(slow, Exception) and fast == slow)


@pytest.mark.parametrize("stem", ["voucher", "vr", "parboiled_vr"])
def test_direct_reader_matches_asn1crypto_on_the_appc_vectors(vectors, stem):
    fast, slow = both(appc(vectors, stem))
    assert same(fast, slow)


def test_direct_reader_reads_what_we_sign_and_matches_asn1crypto(pki):
    data = cms.sign(b"{}", pki.masa_signer.key, [pki.masa_signer.cert, pki.masa_ca.cert], NOW)
    fast, slow = both(data)
    assert fast is not None and fast == slow


def test_direct_reader_never_accepts_what_asn1crypto_reads_otherwise(pki):
    # Every single-byte change and every truncation of a signed voucher: where the direct
    # reader returns something, asn1crypto returns the same; where it refuses the content
    # type, asn1crypto refuses too.
    data = cms.sign(b'{"a":1}', pki.masa_signer.key, [pki.masa_signer.cert], NOW)
    rng = random.Random(18)
    cases = [data[:n] for n in range(0, len(data), 7)]
    for index in range(len(data)):
        for mask in (0x01, 0x80, rng.randrange(1, 256)):
            out = bytearray(data)
            out[index] ^= mask
            cases.append(bytes(out))
    accepted = 0
    for case in cases:
        fast, slow = both(case)
        assert same(fast, slow), case.hex()
        accepted += isinstance(fast, cms.SignedData)
    assert accepted > len(data)  # the fast path was exercised, not only the fallback


def test_fixed_byte_attribute_reader_agrees_with_the_element_walk(pki):
    # _usual_attrs matches the attributes sign() writes by their bytes; wherever it answers,
    # the general walk must give the same answer (every single-byte change of the region).
    sd_der = cms.sign(b'{"a":1}', pki.masa_signer.key, [pki.masa_signer.cert], NOW,
                      econtent_type=cms.DATA)
    attrs = cms.parse(sd_der).signer.signed_attrs
    _, start, end = der_codec.read(attrs, 0, len(attrs))
    assert cms._usual_attrs(attrs, start, end) == cms._any_attrs(attrs, start, end) is not None
    matched = 0
    for index in range(len(attrs)):
        for mask in (0x01, 0x80, 0x3F):
            out = bytearray(attrs)
            out[index] ^= mask
            data = bytes(out)
            try:
                _, start, end = der_codec.read(data, 0, len(data))
            except der_codec.DerError:
                continue
            usual = _answer(cms._usual_attrs, data, start, end)
            if usual is not None:
                matched += 1
                assert usual == _answer(cms._any_attrs, data, start, end), data.hex()
    assert matched  # changes inside the time and digest values still match


def _answer(reader, data: bytes, start: int, end: int):
    try:
        return reader(data, start, end)
    except ValueError as exc:  # DerError, a bad date: parse() reads those with asn1crypto
        return type(exc)
