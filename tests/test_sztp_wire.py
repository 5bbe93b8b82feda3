"""RFC 8572 wire formats (brski/sztp.py): round trips in JSON and XML, CMS wrappings, and the
strict refusals (unknown nodes, bad types, YANG must/when rules, nonce length)."""

from __future__ import annotations

import base64
import datetime
import json

import pytest
from asn1crypto import cms as acms

from brski import cms, pki, sztp
from brski.errors import DecodeError, SignatureError, ValidationError

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
ONBOARD = sztp.OnboardingInformation(
    boot_image=sztp.BootImage("ExampleOS", "2.1", ("https://img.example/os-2.1",),
                              bytes(range(32))),
    configuration_handling="merge",
    pre_configuration_script=b"#!/bin/sh\necho pre\n",
    configuration=b"hostname r1\n",
    post_configuration_script=b"#!/bin/sh\necho post\n",
)
REDIRECT = sztp.RedirectInformation((
    sztp.BootstrapServer("fd00::1", 8443, b"\x30\x03\x02\x01\x00"),
    sztp.BootstrapServer("sztp.example"),
))


@pytest.mark.parametrize("encoding", ["json", "xml"])
@pytest.mark.parametrize("ci", [ONBOARD, REDIRECT], ids=["onboarding", "redirect"])
def test_conveyed_information_round_trips(encoding: str, ci: sztp.ConveyedInformation) -> None:
    data = sztp.encode_conveyed(ci, encoding)
    assert sztp.decode_conveyed(data, encoding) == ci


def test_conveyed_json_is_the_rfc_shape() -> None:
    doc = json.loads(sztp.encode_conveyed(ONBOARD, "json"))
    body = doc["ietf-sztp-conveyed-info:onboarding-information"]
    assert body["configuration-handling"] == "merge"
    assert base64.b64decode(body["configuration"]) == b"hostname r1\n"
    (check,) = body["boot-image"]["image-verification"]
    assert check["hash-algorithm"] == "ietf-sztp-conveyed-info:sha-256"
    assert check["hash-value"].count(":") == 31


@pytest.mark.parametrize(("doc", "reason"), [
    ({"ietf-sztp-conveyed-info:onboarding-information": {"configuration": "aGk="}},
     "must come together"),
    ({"ietf-sztp-conveyed-info:onboarding-information": {"bogus": 1}}, "unknown node 'bogus'"),
    ({"ietf-sztp-conveyed-info:redirect-information": {"bootstrap-server": []}},
     "min-elements"),
    ({"ietf-sztp-conveyed-info:redirect-information": {"bootstrap-server": [
        {"address": "a", "port": 70000}]}}, "out of range"),
    ({"ietf-sztp-conveyed-info:onboarding-information": {"boot-image": {"image-verification": [
        {"hash-algorithm": "ietf-sztp-conveyed-info:sha-256", "hash-value": "00:11"}]}}},
     "32-byte"),
    ({"ietf-sztp-conveyed-info:onboarding-information": {"configuration-handling": "merge",
                                                        "configuration": "!!"}},
     "not valid base64"),
    ({"other:onboarding-information": {}}, "neither"),
])
def test_conveyed_json_refusals(doc: dict, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        sztp.decode_conveyed(json.dumps(doc).encode(), "json")


def test_xml_identityref_is_in_the_default_namespace() -> None:
    data = sztp.encode_conveyed(ONBOARD, "xml")
    assert b"<hash-algorithm>sha-256</hash-algorithm>" in data
    assert b"ietf-sztp-conveyed-info:sha-256" not in data


def test_xml_with_doctype_is_refused() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]>'
            b'<onboarding-information xmlns="urn:ietf:params:xml:ns:yang:'
            b'ietf-sztp-conveyed-info">&x;</onboarding-information>')
    with pytest.raises(DecodeError, match="DOCTYPE"):
        sztp.decode_conveyed(bomb, "xml")


def test_xml_in_the_wrong_namespace_is_refused() -> None:
    with pytest.raises(ValidationError, match="not in namespace"):
        sztp.decode_conveyed(b"<onboarding-information/>", "xml")


@pytest.fixture(scope="module")
def owner() -> pki.TestPki:
    return pki.create_test_pki(NOW, serials=["sn-1"])


@pytest.mark.parametrize("encoding", ["json", "xml"])
def test_signed_conveyed_information(owner: pki.TestPki, encoding: str) -> None:
    data = sztp.encode_conveyed(ONBOARD, encoding)
    reg = owner.registrar
    der = sztp.sign_conveyed(data, encoding, reg.key, [reg.cert], NOW)
    got = sztp.unwrap_conveyed(der)
    assert got.encoding == encoding and got.data == data and got.signed is not None
    assert got.signed.econtent_type == (sztp.CONVEYED_JSON if encoding == "json"
                                        else sztp.CONVEYED_XML)
    assert cms.verify_signature(got.signed) == reg.cert
    # altered content: the messageDigest no longer matches
    tampered = der.replace(b"merge", b"mergf")
    assert tampered != der
    with pytest.raises(SignatureError, match="messageDigest"):
        cms.verify_signature(sztp.unwrap_conveyed(tampered).signed)  # type: ignore[arg-type]


def test_unsigned_conveyed_information_is_a_content_info() -> None:
    data = sztp.encode_conveyed(REDIRECT, "json")
    der = sztp.wrap_unsigned(data, "json")
    info = acms.ContentInfo.load(der)
    assert info["content_type"].dotted == "1.2.840.113549.1.9.16.1.43"
    got = sztp.unwrap_conveyed(der)
    assert (got.encoding, got.data, got.signed) == ("json", data, None)


def test_cms_of_another_type_is_refused_as_conveyed_information(owner: pki.TestPki) -> None:
    voucher_like = cms.sign(b"{}", owner.masa_signer.key, [owner.masa_signer.cert], NOW)
    with pytest.raises(DecodeError, match="not accepted here"):
        sztp.unwrap_conveyed(voucher_like)
    with pytest.raises(DecodeError, match="not a CMS ContentInfo"):
        sztp.unwrap_conveyed(b"\x30\x03garbage")


def test_owner_certificate_is_a_degenerate_signed_data(owner: pki.TestPki) -> None:
    der = sztp.degenerate_certs([owner.registrar.cert, owner.domain_ca.cert])
    info = acms.ContentInfo.load(der)
    assert len(info["content"]["signer_infos"]) == 0
    # certificates is a SET OF: DER sorts it, the order given is not kept
    assert set(sztp.parse_degenerate(der, "owner-certificate")) == {owner.registrar.cert,
                                                                    owner.domain_ca.cert}
    with pytest.raises(DecodeError, match="owner-certificate"):
        sztp.parse_degenerate(b"\x04\x00", "owner-certificate")


@pytest.mark.parametrize("encoding", ["json", "xml"])
def test_rpc_round_trips(encoding: str) -> None:
    inp = sztp.GetBootstrappingDataInput(True, "model-x", "ExampleOS", "1.0", bytes(16))
    assert sztp.GetBootstrappingDataInput.decode(inp.encode(encoding), encoding) == inp
    out = sztp.GetBootstrappingDataOutput(b"ci", b"oc", b"ov", "verbose")
    assert sztp.GetBootstrappingDataOutput.decode(out.encode(encoding), encoding) == out
    rep = sztp.ReportProgressInput("bootstrap-complete", "ok", (b"ta",), (("ssh-ed25519", b"k"),))
    assert sztp.ReportProgressInput.decode(rep.encode(encoding), encoding) == rep
    for kind in sztp.PROGRESS_TYPES:
        one = sztp.ReportProgressInput(kind)
        assert sztp.ReportProgressInput.decode(one.encode(encoding), encoding) == one
    assert len(sztp.PROGRESS_TYPES) == 27


def test_rpc_input_json_is_the_restconf_shape() -> None:
    body = json.loads(sztp.GetBootstrappingDataInput(True, nonce=bytes(16)).encode("json"))
    assert body == {"ietf-sztp-bootstrap-server:input": {
        "signed-data-preferred": [None], "nonce": base64.b64encode(bytes(16)).decode()}}


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"ietf-sztp-bootstrap-server:input": {"nonce": "AAAA"}}', "16..32"),
    (b'{"ietf-sztp-bootstrap-server:input": {"hw-model": 5}}', "must be a string"),
    (b'{"ietf-sztp-bootstrap-server:input": {"serial": "x"}}', "unknown node"),
    (b'{"ietf-sztp-bootstrap-server:output": {}}', "top-level member"),
    (b'{"ietf-sztp-bootstrap-server:input": {"signed-data-preferred": true}}', "empty leaf"),
])
def test_get_bootstrapping_data_input_refusals(body: bytes, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        sztp.GetBootstrappingDataInput.decode(body, "json")


def test_malformed_bodies_are_decode_errors() -> None:
    for body, encoding in ((b"{", "json"), (b"[]", "json"), (b"<input", "xml"),
                           (b"x" * (sztp.MAX_BODY + 1), "json")):
        with pytest.raises(DecodeError):
            sztp.GetBootstrappingDataInput.decode(body, encoding)


def test_report_progress_refusals() -> None:
    with pytest.raises(ValidationError, match="27 RFC 8572"):
        sztp.ReportProgressInput.decode(
            b'{"ietf-sztp-bootstrap-server:input": {"progress-type": "done"}}', "json")
    with pytest.raises(ValidationError, match="'when'"):
        sztp.ReportProgressInput.decode(json.dumps({"ietf-sztp-bootstrap-server:input": {
            "progress-type": "informational",
            "trust-anchor-certs": {"trust-anchor-cert": ["AA=="]}}}).encode(), "json")
    with pytest.raises(ValidationError, match="mandatory"):
        sztp.ReportProgressInput.decode(b'{"ietf-sztp-bootstrap-server:input": {}}', "json")


def test_output_needs_owner_certificate_and_voucher_together() -> None:
    with pytest.raises(ValidationError, match="together"):
        sztp.GetBootstrappingDataOutput.decode(json.dumps({
            "ietf-sztp-bootstrap-server:output": {"conveyed-information": "AA==",
                                                  "owner-certificate": "AA=="}}).encode(),
            "json")


@pytest.mark.parametrize("encoding", ["json", "xml"])
def test_restconf_errors(encoding: str) -> None:
    body = sztp.errors_body("protocol", "invalid-value", "nonce: 3 bytes", encoding)
    assert sztp.parse_errors(body, encoding) == [{
        "error-type": "protocol", "error-tag": "invalid-value",
        "error-message": "nonce: 3 bytes"}]


def test_dhcpv6_option_136() -> None:
    data = sztp.encode_dhcpv6_uris(["https://[fd00::1]:8443", "ftp://x", "https://sztp.example"])
    assert sztp.decode_dhcpv6_uris(data) == ["https://[fd00::1]:8443", "https://sztp.example"]
    assert sztp.uri_server("https://[fd00::1]:8443") == sztp.BootstrapServer("fd00::1", 8443)
    assert sztp.uri_server("https://sztp.example").port == 443
    with pytest.raises(DecodeError, match=r"truncated|runs past"):
        sztp.decode_dhcpv6_uris(data[:-3])
    with pytest.raises(DecodeError, match="no valid"):
        sztp.decode_dhcpv6_uris(sztp.encode_dhcpv6_uris(["http://x"]))


def test_media_types() -> None:
    assert sztp.encoding_of("application/yang-data+json; charset=utf-8") == "json"
    assert sztp.encoding_of("application/yang-data+xml") == "xml"
    with pytest.raises(DecodeError, match="yang-data"):
        sztp.encoding_of("application/json")


def test_xml_declaring_an_unknown_encoding_is_a_decode_error() -> None:
    # found by test_sztp_fuzz: expat's LookupError escaped the decoder (a 500, not a 400)
    body = b"<?xml version='1.0' encoding='ttf-8'?><input/>"
    with pytest.raises(DecodeError, match="not XML"):
        sztp.GetBootstrappingDataInput.decode(body, "xml")
