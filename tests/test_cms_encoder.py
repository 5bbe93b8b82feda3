"""brski.cms writes its DER directly (issue 18): the encoding rules it must keep."""

from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto import cms as acms

from brski import cms
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
    sd = cms.parse(data)
    assert sd.content == b"a" * size and list(sd.certificates) == certs
    assert cms.verify_signature(sd) == pki.masa_signer.cert
