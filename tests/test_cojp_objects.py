"""brski.cojp: RFC 9031 §8.4 objects, byte-exact against Appendix A, strict on bad input."""

from __future__ import annotations

import cbor2
import pytest

from brski import cojp
from brski.errors import DecodeError, UsageError, ValidationError

# RFC 9031 Appendix A (protocols.md §6.2): the Join_Request and the Configuration of the example.
APPENDIX_A_JOIN_REQUEST = bytes.fromhex("a10542cafe")
APPENDIX_A_CONFIGURATION = bytes.fromhex(
    "a202820150e6bf4287c2d7618d6a9687445ffd33e6038142af93")
KEY = bytes.fromhex("e6bf4287c2d7618d6a9687445ffd33e6")


def test_appendix_a_join_request_round_trip() -> None:
    request = cojp.decode_join_request(APPENDIX_A_JOIN_REQUEST)
    assert request == cojp.JoinRequest(network_identifier=b"\xca\xfe")
    assert request.role is None and request.effective_role is cojp.Role.NODE
    assert request.encode() == APPENDIX_A_JOIN_REQUEST


def test_appendix_a_configuration_round_trip() -> None:
    conf = cojp.decode_configuration(APPENDIX_A_CONFIGURATION)
    assert conf.link_layer_keys == (cojp.LinkLayerKey(key_id=1, key_value=KEY),)
    assert conf.short_identifier == cojp.ShortIdentifier(b"\xaf\x93")
    assert conf.jrc_address is None and conf.blacklist is None and conf.join_rate is None
    built = cojp.Configuration(link_layer_keys=(cojp.LinkLayerKey(1, KEY),),
                               short_identifier=cojp.ShortIdentifier(b"\xaf\x93"))
    assert built.encode() == APPENDIX_A_CONFIGURATION


def test_labels_are_the_iana_ones() -> None:
    assert {label.name: label.value for label in cojp.Label} == {
        "ROLE": 1, "LINK_LAYER_KEY_SET": 2, "SHORT_IDENTIFIER": 3, "JRC_ADDRESS": 4,
        "NETWORK_IDENTIFIER": 5, "BLACKLIST": 6, "JOIN_RATE": 7, "UNSUPPORTED_CONFIGURATION": 8}


def test_full_configuration_round_trip_is_byte_exact() -> None:
    conf = cojp.Configuration(
        link_layer_keys=(cojp.LinkLayerKey(1, KEY, key_usage=cojp.KeyUsage.K1K2_ENC_MIC64),
                         cojp.LinkLayerKey(0, bytes(16), key_addinfo=b"\x00\x01"),
                         cojp.LinkLayerKey(2, b"\x11" * 16)),
        short_identifier=cojp.ShortIdentifier(b"\x00\x07", lease_time=24),
        jrc_address=bytes.fromhex("fd00000000000000000000000000000a"),
        blacklist=(bytes.fromhex("0011223344556677"),),
        join_rate=100)
    data = conf.encode()
    expected = cbor2.dumps({2: [1, 1, KEY, 0, bytes(16), b"\x00\x01", 2, b"\x11" * 16],
                            3: [b"\x00\x07", 24], 4: conf.jrc_address,
                            6: [bytes.fromhex("0011223344556677")], 7: 100})
    assert data == expected
    assert cojp.decode_configuration(data) == conf


def test_join_request_with_role_and_unsupported_round_trip() -> None:
    request = cojp.JoinRequest(b"\x12\x34", role=1, unsupported=(
        cojp.UnsupportedParameter(cojp.UnsupportedCode.MALFORMED, 3, None),))
    data = request.encode()
    assert data == bytes.fromhex("a301010542123408830103f6")
    assert cojp.decode_join_request(data) == request


def test_unsupported_configuration_alone() -> None:
    data = cojp.encode_unsupported_configuration((cojp.UnsupportedParameter(0, 7, None),))
    assert data == bytes.fromhex("830007f6")
    assert cojp.decode_unsupported_configuration(data)[0].label == 7


@pytest.mark.parametrize(("hex_data", "words"), [
    ("a0", "network identifier (label 5) is missing"),
    ("a1054240", "exceeds"),  # 0x42 announces two bytes, one follows
    ("a10540", "1..32 bytes"),  # empty network identifier
    ("a10502", "network identifier"),  # uint where a bstr belongs
    ("a2010205422222", "role"),  # role 2 is not registered
    ("a201f505422222", "role"),  # true is not a uint
    ("a2054222220242aaaa", "label 2"),  # a Configuration label in a Join_Request
    ("a20542222218634100", "label 99 (unknown)"),
    ("a2054222226161f6", "not an integer label"),
    ("a205422222088101", "triples"),
    ("8105", "not a CBOR map"),
    ("a10542222200", "1 bytes after"),  # trailing byte
    ("a205422222054222", "CBOR"),  # duplicate label
])
def test_join_request_refusals(hex_data: str, words: str | None) -> None:
    with pytest.raises((DecodeError, ValidationError)) as info:
        cojp.decode_join_request(bytes.fromhex(hex_data))
    if words:
        assert words in str(info.value)


@pytest.mark.parametrize(("body", "words"), [
    ({2: []}, "non-empty array"),
    ({2: [1]}, "key_value"),
    ({2: [1, b"short"]}, "16 bytes"),
    ({2: [255, KEY]}, "0..254"),
    ({2: [1, KEY, 9]}, "key_value"),  # a key_id without a value
    ({2: [-1, KEY]}, "key_id"),
    ({3: [b"\xff\xff"]}, "reserved"),
    ({3: [b"\x01"]}, "2-byte"),
    ({3: [b"\x00\x01", -1]}, "lease_time"),
    ({3: [b"\x00\x01", 1, 2]}, "short identifier"),
    ({4: bytes(4)}, "16-byte"),
    ({6: bytes(8)}, "network prefix"),  # openwsn's pre-RFC meaning of label 6
    ({6: [b""]}, "blacklist"),
    ({6: [b"\x01"] * 65}, "at most 64"),
    ({7: -5}, "join rate"),
    ({7: 1.5}, "join rate"),
    ({5: b"\xca\xfe"}, "label 5 (network_identifier) is not allowed"),
    ({1: 0}, "label 1"),
])
def test_configuration_refusals(body: dict, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        cojp.decode_configuration(cbor2.dumps(body))
    assert words in str(info.value)


def test_oversized_objects_are_refused_before_decoding() -> None:
    big = cbor2.dumps({5: b"\x00" * 2000})
    with pytest.raises(DecodeError, match="exceeds 1024"):
        cojp.decode_join_request(big)
    with pytest.raises(DecodeError, match="exceeds 1024"):
        cojp.decode_configuration(b"\xa1\x07\x00" + b"\x00" * 2000)


def test_local_misuse_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="16-byte"):
        cojp.Configuration(jrc_address=b"\x00")
    with pytest.raises(UsageError, match="role"):
        cojp.JoinRequest(b"\x01", role=7)
    with pytest.raises(UsageError):
        cojp.encode_unsupported_configuration(())


def test_refusals_name_the_label_for_a_diagnostic_response() -> None:
    with pytest.raises(cojp.ObjectError) as info:
        cojp.decode_join_request(bytes.fromhex("a2010205422222"))
    assert info.value.label == cojp.Label.ROLE
    assert info.value.code == cojp.UnsupportedCode.MALFORMED
    with pytest.raises(cojp.ObjectError) as info:
        cojp.decode_join_request(bytes.fromhex("a20542222218634100"))
    assert info.value.label == 99 and info.value.code == cojp.UnsupportedCode.UNSUPPORTED
