"""GRASP M_FLOOD: the RFC 8995 §4.1.1 and §4.3 examples, byte for byte, and every rule."""

from ipaddress import IPv6Address

import cbor2
import pytest

from brski.errors import DecodeError, UsageError
from brski.grasp import (
    ALL_GRASP_NEIGHBORS,
    AN_JOIN_REGISTRAR,
    AN_PROXY,
    F_SYNCH,
    GRASP_MAX_SIZE,
    GRASP_PORT,
    IPPROTO_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    M_FLOOD,
    NO_VALUE,
    O_IPV6_LOCATOR,
    Flood,
    FloodEntry,
    IPv6Locator,
    Objective,
    OtherLocator,
    proxy_flood,
    registrar_flood,
)


def hexbytes(text: str) -> bytes:
    """Hex with '#' comments and whitespace, as written below from the diagnostic notation."""
    lines = (line.split("#")[0] for line in text.splitlines())
    return bytes.fromhex("".join("".join(lines).split()))


# RFC 8995 §4.1.1, with M_FLOOD=9, O_IPv6_LOCATOR=103, IPPROTO_TCP=6:
# [M_FLOOD, 12340815, h'fe800000000000000000000000000001', 180000,
#   [["AN_Proxy", 4, 1, ""],
#    [O_IPv6_LOCATOR, h'fe800000000000000000000000000001', IPPROTO_TCP, 4443]]]
PROXY_EXAMPLE = hexbytes("""
85                                        # array(5)
  09                                      #   M_FLOOD
  1a 00bc4e4f                             #   session-id 12340815
  50 fe800000000000000000000000000001     #   initiator, bytes(16)
  1a 0002bf20                             #   ttl 180000
  82                                      #   [objective, locator]
    84                                    #     objective, array(4)
      68 414e5f50726f7879                 #       "AN_Proxy"
      04                                  #       flags: sync-only
      01                                  #       loop-count 1
      60                                  #       ""
    84                                    #     locator, array(4)
      18 67                               #       O_IPv6_LOCATOR
      50 fe800000000000000000000000000001 #       address
      06                                  #       IPPROTO_TCP
      19 115b                             #       port 4443
""")

# RFC 8995 §4.3:
# [M_FLOOD, 51804321, h'fda379a6f6ee00000200000064000001', 180000,
#   [["AN_join_registrar", 4, 255, "EST-TLS"],
#    [O_IPv6_LOCATOR, h'fda379a6f6ee00000200000064000001', IPPROTO_TCP, 8443]]]
REGISTRAR_EXAMPLE = hexbytes("""
85
  09
  1a 031678a1                             # 51804321
  50 fda379a6f6ee00000200000064000001
  1a 0002bf20
  82
    84
      71 414e5f6a6f696e5f726567697374726172   # "AN_join_registrar"
      04
      18 ff                               # loop-count 255
      67 4553542d544c53                   # "EST-TLS"
    84
      18 67
      50 fda379a6f6ee00000200000064000001
      06
      19 20fb                             # 8443
""")

LL1 = IPv6Address("fe80::1")
ACP = IPv6Address("fda3:79a6:f6ee:0:200:0:6400:1")


def flood_items(session=1, initiator=None, ttl=180000, *entries):
    """A flood as Python data, for tampering with single fields."""
    initiator = LL1.packed if initiator is None else initiator
    entries = entries or ([["AN_Proxy", 4, 1, ""], [103, LL1.packed, 6, 4443]],)
    return [M_FLOOD, session, initiator, ttl, *entries]


def test_constants():
    assert (M_FLOOD, O_IPV6_LOCATOR, GRASP_PORT, GRASP_MAX_SIZE) == (9, 103, 7017, 2048)
    assert IPv6Address("ff02::13") == ALL_GRASP_NEIGHBORS
    assert (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_IPV6, F_SYNCH) == (6, 17, 41, 4)


def test_hand_assembled_examples_match_the_diagnostic_notation():
    # The hex above was written by hand; cbor2 agrees it is the diagnostic notation.
    assert cbor2.dumps(flood_items(12340815)) == PROXY_EXAMPLE
    registrar = [["AN_join_registrar", 4, 255, "EST-TLS"], [103, ACP.packed, 6, 8443]]
    assert cbor2.dumps(flood_items(51804321, ACP.packed, 180000, registrar)) == REGISTRAR_EXAMPLE


def test_rfc8995_proxy_example_decodes_to_its_fields_and_re_encodes_identically():
    flood = Flood.decode(PROXY_EXAMPLE)
    assert flood.session_id == 12340815
    assert flood.initiator == LL1
    assert flood.ttl_ms == 180000
    (entry,) = flood.entries
    assert entry.objective == Objective("AN_Proxy", 4, 1, "")
    assert entry.locator == IPv6Locator(LL1, IPPROTO_TCP, 4443)
    assert flood.encode() == PROXY_EXAMPLE


def test_rfc8995_registrar_example_decodes_to_its_fields_and_re_encodes_identically():
    flood = Flood.decode(REGISTRAR_EXAMPLE)
    assert (flood.session_id, flood.initiator, flood.ttl_ms) == (51804321, ACP, 180000)
    (entry,) = flood.entries
    assert entry.objective == Objective(AN_JOIN_REGISTRAR, 4, 255, "EST-TLS")
    assert flood.locators_for(AN_JOIN_REGISTRAR) == [IPv6Locator(ACP, 6, 8443)]
    assert flood.encode() == REGISTRAR_EXAMPLE


def test_every_truncation_of_the_examples_fails():
    for example in (PROXY_EXAMPLE, REGISTRAR_EXAMPLE):
        for cut in range(len(example)):
            with pytest.raises(DecodeError):
                Flood.decode(example[:cut])


@pytest.mark.parametrize("garbage", [b"\x00", b"\xff", b"\x85\x09"])
def test_garbage_after_a_flood_fails(garbage):
    with pytest.raises(DecodeError, match="after the GRASP message"):
        Flood.decode(PROXY_EXAMPLE + garbage)


@pytest.mark.parametrize(("type_byte", "name"), [(0x01, "M_DISCOVERY"), (0x08, "M_SYNCH"),
                                                  (0xF5, "true"), (0x00, "M_NOOP")])
def test_a_different_message_type_fails(type_byte, name):
    tampered = bytearray(PROXY_EXAMPLE)
    tampered[1] = type_byte
    with pytest.raises(DecodeError, match="not M_FLOOD"):
        Flood.decode(bytes(tampered))


def test_ipip_locator_with_nil_port():
    # RFC 8995 §4.3: [O_IPv6_LOCATOR, fe80::1234, 41, nil]
    entry = [["AN_join_registrar", 4, 255, "EST-TLS"], [103, IPv6Address("fe80::1234").packed,
                                                        41, None]]
    data = cbor2.dumps(flood_items(7, ACP.packed, 180000, entry))
    flood = Flood.decode(data)
    assert flood.locators_for(AN_JOIN_REGISTRAR) == [
        IPv6Locator(IPv6Address("fe80::1234"), IPPROTO_IPV6, None)
    ]
    assert flood.encode() == data


def test_several_locators_and_objectives_in_one_flood():
    entries = [
        [["AN_join_registrar", 4, 255, "EST-TLS"], [103, ACP.packed, 6, 443]],
        [["AN_join_registrar", 4, 255, "EST-TLS"], [103, ACP.packed, 17, 5683]],
        [["AN_Proxy", 4, 1, ""], []],
        [["SomethingElse", 0, 6], [105, "registrar.example", 6, 443]],
    ]
    data = cbor2.dumps(flood_items(7, ACP.packed, 1000, *entries))
    flood = Flood.decode(data)
    assert [loc.port for loc in flood.locators_for("AN_join_registrar")] == [443, 5683]
    assert flood.locators_for(AN_PROXY) == []
    assert flood.entries[2].locator is None
    assert flood.entries[3].objective.value is NO_VALUE
    assert flood.entries[3].locator == OtherLocator(105, ("registrar.example", 6, 443))
    assert flood.encode() == data


def test_capitalised_registrar_name_is_accepted_and_the_iana_name_emitted():
    entry = [["AN_Join_Registrar", 4, 255, "EST-TLS"], [103, ACP.packed, 6, 8443]]
    flood = Flood.decode(cbor2.dumps(flood_items(51804321, ACP.packed, 180000, entry)))
    assert flood.entries[0].objective.name == AN_JOIN_REGISTRAR
    assert flood.locators_for("AN_Join_Registrar") == flood.locators_for(AN_JOIN_REGISTRAR)
    assert flood.encode() == REGISTRAR_EXAMPLE
    assert Objective("AN_Join_Registrar", 4, 255).name == AN_JOIN_REGISTRAR


def test_objective_value_null_and_absent_stay_distinct():
    with_null = cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1, None], []]))
    without = cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], []]))
    assert Flood.decode(with_null).entries[0].objective.value is None
    assert Flood.decode(without).entries[0].objective.value is NO_VALUE
    assert Flood.decode(with_null).encode() == with_null
    assert Flood.decode(without).encode() == without


def test_oversized_message_fails_before_parsing():
    big = cbor2.dumps(flood_items(1, None, 1, [["AN_Proxy", 4, 1, "x" * GRASP_MAX_SIZE], []]))
    with pytest.raises(DecodeError, match="exceeds"):
        Flood.decode(big)


TAMPERED = [
    (cbor2.dumps({"a": 1}), "not a non-empty array"),
    (cbor2.dumps([]), "not a non-empty array"),
    (cbor2.dumps(9), "not a non-empty array"),
    (cbor2.dumps([9.0, 1, LL1.packed, 1, [["X", 4, 1], []]]), "not M_FLOOD"),
    (cbor2.dumps([9, 1, LL1.packed, 1]), "at least 5"),
    (cbor2.dumps(flood_items(-1)), "session id"),
    (cbor2.dumps(flood_items(1 << 32)), "session id"),
    (cbor2.dumps(flood_items(True)), "session id"),
    (cbor2.dumps(flood_items("1")), "session id"),
    (cbor2.dumps(flood_items(1, LL1.packed[:15])), "initiator"),
    (cbor2.dumps(flood_items(1, bytes(4))), "initiator"),
    (cbor2.dumps(flood_items(1, "fe80::1")), "initiator"),
    (cbor2.dumps(flood_items(1, None, -1)), "ttl"),
    (cbor2.dumps(flood_items(1, None, 1.5)), "ttl"),
    (cbor2.dumps(flood_items(1, None, 1 << 32)), "ttl"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1, ""]])), "pair"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1, ""], [], []])), "pair"),
    (cbor2.dumps(flood_items(1, None, 1, "AN_Proxy")), "pair"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4], []])), "3 or 4"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1, "", 5], []])), "3 or 4"),
    (cbor2.dumps(flood_items(1, None, 1, [{"X": 4}, []])), "3 or 4"),
    (cbor2.dumps(flood_items(1, None, 1, [["", 4, 1], []])), "name"),
    (cbor2.dumps(flood_items(1, None, 1, [[b"X", 4, 1], []])), "name"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 256, 1], []])), "flags"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", True, 1], []])), "flags"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 256], []])), "loop count"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, -1], []])), "loop count"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], "locator"])), "locator is not an array"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], ["103"]])), "option number"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, LL1.packed, 6]])), "not 4"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, bytes(4), 6, 1]])), "16-byte"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, "fe80::1", 6, 1]])), "16-byte"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, LL1.packed, 256, 1]])), "protocol"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, LL1.packed, None, 1]])),
     "protocol"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, LL1.packed, 6, 65536]])), "port"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, LL1.packed, 6, "443"]])), "port"),
    (cbor2.dumps(flood_items(1, None, 1, [["X", 4, 1], [103, LL1.packed, 6, False]])), "port"),
    (bytes.fromhex("8509"), "not valid CBOR"),
    (bytes.fromhex("ff"), "stray break"),
]


@pytest.mark.parametrize(("data", "why"), TAMPERED)
def test_tampered_floods_fail_with_a_clear_reason(data, why):
    with pytest.raises(DecodeError, match=why):
        Flood.decode(data)


def test_decode_takes_bytes():
    with pytest.raises(UsageError):
        Flood.decode(PROXY_EXAMPLE.hex())  # type: ignore[arg-type]


# --- building floods --------------------------------------------------------------------------


def fixed_rng(value: bytes):
    def rng(n: int) -> bytes:
        assert n == len(value)
        return value

    return rng


def test_proxy_flood_rebuilds_the_rfc_example():
    flood = proxy_flood(fixed_rng((12340815).to_bytes(4, "big")), LL1, 4443)
    assert flood.encode() == PROXY_EXAMPLE


def test_registrar_flood_rebuilds_the_rfc_example():
    flood = registrar_flood(
        fixed_rng((51804321).to_bytes(4, "big")), ACP, [IPv6Locator(ACP, IPPROTO_TCP, 8443)]
    )
    assert flood.encode() == REGISTRAR_EXAMPLE


def test_registrar_flood_with_several_locators():
    locators = [IPv6Locator(ACP, 6, 443), IPv6Locator(ACP, 17, 5683)]
    flood = registrar_flood(fixed_rng(b"\xff" * 4), ACP, locators, ttl_ms=60000)
    assert flood.session_id == 0xFFFFFFFF
    assert Flood.decode(flood.encode()).locators_for(AN_JOIN_REGISTRAR) == locators


def test_builders_refuse_bad_arguments():
    rng = fixed_rng(bytes(4))
    with pytest.raises(UsageError, match="link-local"):
        proxy_flood(rng, ACP, 4443)
    with pytest.raises(UsageError, match="at least one locator"):
        registrar_flood(rng, ACP, [])
    with pytest.raises(UsageError, match="4 bytes"):
        proxy_flood(lambda n: b"\x00", LL1, 4443)
    with pytest.raises(UsageError):
        proxy_flood(rng, LL1, 70000)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Objective("", 4, 1),
        lambda: Objective("X", 256, 1),
        lambda: Objective("X", 4, True),
        lambda: IPv6Locator("fe80::1", 6, 1),  # type: ignore[arg-type]
        lambda: IPv6Locator(LL1, 300, 1),
        lambda: IPv6Locator(LL1, 6, -1),
        lambda: Flood(-1, LL1, 1, (FloodEntry(Objective("X", 4, 1)),)),
        lambda: Flood(1, "fe80::1", 1, (FloodEntry(Objective("X", 4, 1)),)),  # type: ignore
        lambda: Flood(1, LL1, 1 << 32, (FloodEntry(Objective("X", 4, 1)),)),
        lambda: Flood(1, LL1, 1, ()),
        lambda: Flood(1, LL1, 1, [FloodEntry(Objective("X", 4, 1))]),  # type: ignore
        lambda: Flood(1, LL1, 1, (Objective("X", 4, 1),)),  # type: ignore
    ],
)
def test_constructors_refuse_bad_fields(build):
    with pytest.raises(UsageError):
        build()


def test_encoding_refuses_what_grasp_cannot_carry():
    big = Flood(1, LL1, 1, (FloodEntry(Objective("X", 4, 1, "x" * GRASP_MAX_SIZE)),))
    with pytest.raises(UsageError, match="exceeds"):
        big.encode()
    odd = Flood(1, LL1, 1, (FloodEntry(Objective("X", 4, 1, object())),))
    with pytest.raises(UsageError, match="cannot be encoded"):
        odd.encode()


def test_proxy_flood_can_announce_several_addresses():
    ll, ula = IPv6Address("fe80::1"), IPv6Address("fd00::1")
    flood = proxy_flood(lambda n: b"\x00" * n, ll, 8443, locators=[ll, ula])
    decoded = Flood.decode(flood.encode())
    assert decoded.initiator == ll
    assert [loc.address for loc in decoded.locators_for("AN_Proxy")] == [ll, ula]
    with pytest.raises(UsageError, match="at least one locator"):
        proxy_flood(lambda n: b"\x00" * n, ll, 8443, locators=[])
