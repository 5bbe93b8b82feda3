"""JPY messages (join-proxy draft Appendix A vectors) and the two header sealers."""

import re
from ipaddress import IPv4Address, IPv6Address

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.jpy import (
    MAX_HEADER_SIZE,
    MAX_OVERHEAD,
    FlowHeaderSealer,
    JpyMessage,
    PledgeEndpoint,
    ReplayWindow,
    SequencedHeaderSealer,
)

HEADER = bytes.fromhex("d01914bcc376a88ffecc50ca6017b0c1")
CLIENT_HELLO = "jpy-example-1-clienthello.cbor"
HELLO_VERIFY = "jpy-example-2-helloverifyrequest.cbor"

KEY16 = bytes(range(16))
KEY32 = bytes(range(32))
PLEDGE = PledgeEndpoint(IPv6Address("fe80::1234:5678"), 45965, 3)


def vector(vectors, name):
    return (vectors / "constrained-join-proxy" / name).read_bytes()


def draft_comment_payloads(vectors) -> list[bytes]:
    """The full DTLS bytes the draft keeps in HTML comments next to Appendix A."""
    text = (vectors / "constrained-join-proxy" / "draft-ietf-anima-constrained-join-proxy.md")
    found = re.findall(r"\[ h'([0-9a-f]+)' , h'([0-9a-f]+)' \]", text.read_text())
    return [bytes.fromhex(content) for _, content in found]


# --- Appendix A vectors -----------------------------------------------------------------------


def test_client_hello_vector_decodes_to_the_published_header_and_payload(vectors):
    data = vector(vectors, CLIENT_HELLO)
    msg = JpyMessage.decode(data)
    assert msg.header == HEADER
    assert len(msg.content) == 427
    assert msg.content.startswith(bytes.fromhex("16fefd0000000000000000019e"))
    assert msg.content.endswith(bytes.fromhex("3d45"))
    assert data[:18] == bytes.fromhex("8250") + HEADER
    assert data[18:21] == bytes.fromhex("5901ab")
    assert msg.encode() == data


def test_hello_verify_vector_decodes_to_the_same_header_and_60_bytes(vectors):
    data = vector(vectors, HELLO_VERIFY)
    msg = JpyMessage.decode(data)
    assert msg.header == HEADER
    assert len(msg.content) == 60
    assert msg.content.startswith(bytes.fromhex("16fefd0000000000000000002f"))
    assert msg.content.endswith(bytes.fromhex("66c1"))
    assert data[18:20] == bytes.fromhex("583c")
    assert msg.encode() == data


def test_vectors_match_the_full_payloads_in_the_draft_source(vectors):
    payloads = draft_comment_payloads(vectors)
    assert len(payloads) == 2
    assert JpyMessage.decode(vector(vectors, CLIENT_HELLO)).content == payloads[0]
    assert JpyMessage.decode(vector(vectors, HELLO_VERIFY)).content == payloads[1]


def test_building_the_message_from_its_parts_gives_the_vector(vectors):
    payload = draft_comment_payloads(vectors)[0]
    assert JpyMessage(HEADER, payload).encode() == vector(vectors, CLIENT_HELLO)


@pytest.mark.parametrize("name", [CLIENT_HELLO, HELLO_VERIFY])
def test_every_truncation_of_a_vector_is_a_decode_error(vectors, name):
    data = vector(vectors, name)
    for cut in range(len(data)):
        with pytest.raises(DecodeError):
            JpyMessage.decode(data[:cut])


@pytest.mark.parametrize("name", [CLIENT_HELLO, HELLO_VERIFY])
def test_trailing_bytes_after_a_vector_are_a_decode_error(vectors, name):
    with pytest.raises(DecodeError, match="after the JPY message"):
        JpyMessage.decode(vector(vectors, name) + b"\x00")


# --- message rules ----------------------------------------------------------------------------


def test_extra_elements_are_accepted_and_ignored():
    # 83 41 aa 42 bbcc 01: [h'aa', h'bbcc', 1]
    msg = JpyMessage.decode(bytes.fromhex("8341aa42bbcc01"))
    assert msg == JpyMessage(b"\xaa", b"\xbb\xcc")
    assert msg.encode() == bytes.fromhex("8241aa42bbcc")


def test_indefinite_length_array_is_still_cbor():
    assert JpyMessage.decode(bytes.fromhex("9f41aa42bbccff")) == JpyMessage(b"\xaa", b"\xbb\xcc")


def test_empty_header_and_content_are_allowed_by_the_format():
    assert JpyMessage.decode(bytes.fromhex("824040")) == JpyMessage(b"", b"")


@pytest.mark.parametrize(
    ("hex_data", "why"),
    [
        ("", "empty"),
        ("a0", "not an array"),
        ("41aa", "not an array"),
        ("01", "not an array"),
        ("80", "at least 2"),
        ("8141aa", "at least 2"),
        ("82616142bbcc", "header is not a byte string"),
        ("820142bbcc", "header is not a byte string"),
        ("82f642bbcc", "header is not a byte string"),
        ("82c24101" "42bbcc", "header is not a byte string"),  # tag 2 bignum → int
        ("8241aa62bbcc", "not valid CBOR"),  # content text, but not UTF-8
        ("8241aa6162", "content is not a byte string"),
        ("8241aa80", "content is not a byte string"),
        ("ff", "stray break"),
        ("8341aa42bbccff", "stray break"),  # cbor2 alone would hand back a marker object
        ("d81c8341aa42bbccd81d00", "not an array"),  # shared-value tags stay unresolved tags
        ("8241", "not valid CBOR"),
        ("1c", "not valid CBOR"),
    ],
)
def test_malformed_messages_are_decode_errors(hex_data, why):
    with pytest.raises(DecodeError, match=why):
        JpyMessage.decode(bytes.fromhex(hex_data))


def test_oversized_input_is_refused_before_parsing():
    with pytest.raises(DecodeError, match="exceeds"):
        JpyMessage.decode(b"\x82" + bytes(65535))


def test_message_fields_must_be_bytes():
    with pytest.raises(UsageError):
        JpyMessage("aa", b"")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        JpyMessage.decode("8241aa41bb")  # type: ignore[arg-type]


def test_encoding_a_message_too_big_for_udp_is_a_usage_error():
    with pytest.raises(UsageError, match="does not fit"):
        JpyMessage(b"h" * 32, bytes(65535 - MAX_OVERHEAD + 1)).encode()
    assert len(JpyMessage(b"h" * 32, bytes(65535 - MAX_OVERHEAD)).encode()) == 65535


# --- the pledge endpoint ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},
        {"port": 65536},
        {"port": True},
        {"ifindex": -1},
        {"ifindex": 1 << 32},
        {"ifindex": 1.0},
        {"address": "fe80::1"},
    ],
)
def test_pledge_endpoint_rejects_bad_fields(kwargs):
    fields = {"address": IPv6Address("fe80::1"), "port": 5684, "ifindex": 1, **kwargs}
    with pytest.raises(UsageError):
        PledgeEndpoint(**fields)


# --- flow sealer: the one a JPY relay uses ----------------------------------------------------

PLEDGES = [
    PLEDGE,
    PledgeEndpoint(IPv6Address("fe80::ffff:ffff:ffff:ffff"), 65535, 0xFFFFFFFF),
    PledgeEndpoint(IPv6Address("fe80::"), 1, 0),
    PledgeEndpoint(IPv4Address("169.254.7.9"), 5684, 2),
]


@pytest.mark.parametrize("pledge", PLEDGES)
def test_flow_sealer_round_trips(pledge):
    sealer = FlowHeaderSealer(KEY32)
    header = sealer.seal(pledge)
    assert len(header) == FlowHeaderSealer.HEADER_SIZE == MAX_HEADER_SIZE
    assert sealer.open(header) == pledge


def test_flow_header_is_stable_for_a_flow_and_differs_between_flows():
    sealer = FlowHeaderSealer(KEY32)
    assert sealer.seal(PLEDGE) == sealer.seal(PLEDGE)
    other_port = PledgeEndpoint(PLEDGE.address, PLEDGE.port + 1, PLEDGE.ifindex)
    other_if = PledgeEndpoint(PLEDGE.address, PLEDGE.port, PLEDGE.ifindex + 1)
    assert len({sealer.seal(p) for p in (PLEDGE, other_port, other_if)}) == 3


def test_registrar_flight_with_one_header_opens_every_datagram():
    """The registrar echoes one header on every datagram of a flight (draft §4.4)."""
    sealer = FlowHeaderSealer(KEY32)
    header = sealer.seal(PLEDGE)
    flight = [JpyMessage(header, bytes([n]) * 100).encode() for n in range(5)]
    assert [sealer.open(JpyMessage.decode(d).header) for d in flight] == [PLEDGE] * 5


def test_sealed_message_stays_within_the_drafts_overhead():
    header = FlowHeaderSealer(KEY32).seal(PLEDGE)
    for size in (0, 23, 24, 255, 256, 1200):
        assert len(JpyMessage(header, bytes(size)).encode()) - size <= MAX_OVERHEAD


@pytest.mark.parametrize("address", ["2001:db8::1", "fe80:1::1", "fd00::1", "ff02::1", "::1"])
def test_only_fe80_64_pledges_can_be_sealed(address):
    pledge = PledgeEndpoint(IPv6Address(address), 5684, 1)
    for sealer in (FlowHeaderSealer(KEY32), SequencedHeaderSealer(KEY16)):
        with pytest.raises(ValidationError, match="not in fe80::/64"):
            sealer.seal(pledge)


def test_flow_sealer_detects_every_single_bit_flip():
    sealer = FlowHeaderSealer(KEY32, key_id=7)
    header = sealer.seal(PLEDGE)
    for bit in range(len(header) * 8):
        forged = bytearray(header)
        forged[bit // 8] ^= 1 << (bit % 8)
        # a flipped key-id bit names a key that is not live; any other flip fails the SIV
        with pytest.raises((SignatureError, ValidationError)):
            sealer.open(bytes(forged))


def test_flow_header_from_another_key_with_the_same_id_is_a_signature_error():
    header = FlowHeaderSealer(bytes(32)).seal(PLEDGE)
    with pytest.raises(SignatureError):
        FlowHeaderSealer(KEY32).open(header)


@pytest.mark.parametrize("size", [0, 1, 16, 31, 33, 64])
def test_flow_header_of_the_wrong_size_is_a_decode_error(size):
    with pytest.raises(DecodeError):
        FlowHeaderSealer(KEY32).open(bytes(size))


def test_flow_sealer_opens_the_previous_key_but_not_the_one_before():
    sealer = FlowHeaderSealer(KEY32, key_id=1)
    old = sealer.seal(PLEDGE)
    sealer.rotate(bytes(32))
    assert sealer.key_id == 2
    middle = sealer.seal(PLEDGE)
    assert middle != old
    assert sealer.open(old) == PLEDGE
    sealer.rotate(bytes([9]) * 32)
    assert sealer.open(middle) == PLEDGE
    with pytest.raises(ValidationError, match="not live"):
        sealer.open(old)


def test_key_ids_wrap_and_live_ids_cannot_be_reused():
    sealer = FlowHeaderSealer(KEY32, key_id=255)
    sealer.rotate(bytes(32))
    assert sealer.key_id == 0
    with pytest.raises(UsageError, match="still in use"):
        sealer.rotate(bytes(32), key_id=255)
    with pytest.raises(UsageError, match="still in use"):
        sealer.rotate(bytes(32), key_id=0)
    sealer.rotate(bytes(32), key_id=42)
    sealer.rotate(bytes(32), key_id=255)  # 255 retired two rotations ago: free again


@pytest.mark.parametrize(
    ("key", "key_id"), [(bytes(16), 0), (bytes(33), 0), ("k" * 32, 0), (KEY32, 256), (KEY32, -1)]
)
def test_flow_sealer_rejects_bad_keys_and_ids(key, key_id):
    with pytest.raises(UsageError):
        FlowHeaderSealer(key, key_id)


def test_authentic_header_with_an_impossible_plaintext_is_a_decode_error():
    # Only someone holding the key can do this; it must still be an error, not a crash.
    siv = AESSIV(KEY32)
    kid = b"\x00"
    bad_plaintexts = [
        bytes.fromhex("00" "00000001" "0000" "0000000000000001"),  # port 0
        bytes.fromhex("02" "00000001" "1634" "0000000000000001"),  # family 2
        bytes.fromhex("01" "00000001" "1634" "a9fe0709" "00000001"),  # IPv4 padding not zero
    ]
    for plain in bad_plaintexts:
        with pytest.raises(DecodeError):
            FlowHeaderSealer(KEY32).open(kid + siv.encrypt(plain, [kid]))


def test_seal_and_open_reject_wrong_argument_types():
    sealer = FlowHeaderSealer(KEY32)
    with pytest.raises(UsageError):
        sealer.seal(("fe80::1", 5684, 1))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        sealer.open(bytearray(32))  # type: ignore[arg-type]


# --- sequenced sealer: once-only state --------------------------------------------------------


def test_sequenced_sealer_round_trips_and_counts():
    sealer = SequencedHeaderSealer(KEY16)
    headers = [sealer.seal(p) for p in PLEDGES]
    assert sealer.next_sequence == len(PLEDGES)
    assert all(len(h) == SequencedHeaderSealer.HEADER_SIZE == 30 for h in headers)
    assert [h[1:7] for h in headers] == [n.to_bytes(6, "big") for n in range(len(PLEDGES))]
    assert [sealer.open(h) for h in headers] == PLEDGES


def test_sequenced_header_opens_once():
    sealer = SequencedHeaderSealer(KEY16)
    header = sealer.seal(PLEDGE)
    assert sealer.open(header) == PLEDGE
    with pytest.raises(ValidationError, match="replay"):
        sealer.open(header)


def test_sequenced_headers_may_arrive_out_of_order_within_the_window():
    sealer = SequencedHeaderSealer(KEY16, window=64)
    headers = [sealer.seal(PLEDGE) for _ in range(70)]
    assert sealer.open(headers[69]) == PLEDGE
    assert sealer.open(headers[6]) == PLEDGE  # 63 behind: still inside
    with pytest.raises(ValidationError, match="older than the replay window"):
        sealer.open(headers[5])  # 64 behind: stale


def test_a_forged_header_does_not_move_the_window():
    sealer = SequencedHeaderSealer(KEY16, window=64)
    first = sealer.seal(PLEDGE)
    forged = bytearray(sealer.seal(PLEDGE))
    forged[1:7] = (10**6).to_bytes(6, "big")  # claims a far-ahead sequence number
    with pytest.raises(SignatureError):
        sealer.open(bytes(forged))
    assert sealer.open(first) == PLEDGE  # would be stale had the forgery slid the window


def test_sequenced_sealer_is_wrong_for_a_registrar_flight():
    """Why the relay uses FlowHeaderSealer: the registrar repeats the header on every datagram
    of a flight, and a replay window drops all but the first."""
    sealer = SequencedHeaderSealer(KEY16)
    header = sealer.seal(PLEDGE)
    assert sealer.open(header) == PLEDGE
    with pytest.raises(ValidationError):
        sealer.open(header)


def test_sequenced_sealer_rotation_keeps_the_previous_key_only():
    sealer = SequencedHeaderSealer(KEY16, key_id=3)
    old = sealer.seal(PLEDGE)
    sealer.rotate(bytes(16))
    assert (sealer.key_id, sealer.next_sequence) == (4, 0)
    middle = sealer.seal(PLEDGE)
    assert sealer.open(old) == PLEDGE
    sealer.rotate(bytes([1]) * 16)
    assert sealer.open(middle) == PLEDGE
    with pytest.raises(ValidationError, match="not live"):
        sealer.open(old)


def test_sequenced_sealer_detects_every_single_bit_flip():
    sealer = SequencedHeaderSealer(KEY16)
    header = sealer.seal(PLEDGE)
    for bit in range(len(header) * 8):
        forged = bytearray(header)
        forged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises((SignatureError, ValidationError)):
            sealer.open(bytes(forged))
    assert sealer.open(header) == PLEDGE  # none of the forgeries consumed its number


@pytest.mark.parametrize("size", [0, 7, 29, 31])
def test_sequenced_header_of_the_wrong_size_is_a_decode_error(size):
    with pytest.raises(DecodeError):
        SequencedHeaderSealer(KEY16).open(bytes(size))


def test_sequence_exhaustion_demands_a_rotation():
    sealer = SequencedHeaderSealer(KEY16)
    sealer._keys.current.next_seq = SequencedHeaderSealer.MAX_SEQUENCE  # 2**48 seals, skipped
    last = sealer.seal(PLEDGE)
    assert last[1:7] == b"\xff" * 6
    assert sealer.open(last) == PLEDGE
    with pytest.raises(UsageError, match="rotate"):
        sealer.seal(PLEDGE)
    sealer.rotate(bytes(16))
    assert sealer.open(sealer.seal(PLEDGE)) == PLEDGE


def test_sealed_headers_are_pinned_byte_for_byte():
    """Known answers, taken from the sealers before their hot paths were written in line (issue
    18 item 3): the fast fe80::/64 packing and the one-int nonce give the same bytes, and the
    IPv4 and scoped-address cases, which take the general path, too."""
    sealer = SequencedHeaderSealer(KEY16, key_id=5)
    sealer._keys.current.next_seq = 0x0102030405
    pledges = [PLEDGE, PledgeEndpoint(IPv4Address("192.0.2.7"), 5684, 0xFFFFFFFF),
               PledgeEndpoint(IPv6Address("fe80::ffff:ffff:ffff:ffff%7"), 1, 0)]
    assert [sealer.seal(p).hex() for p in pledges] == [
        "0500010203040537d93ce8bc1ae5b69c8bbc875a9915884f2103238d253d",
        "05000102030406bc37ca4cd4461ccf27d09534ffaa08bda2f7d4a6457b46",
        "0500010203040795fc41b2caa713036ccee8320a1da860037100d0c4df45",
    ]
    flow = FlowHeaderSealer(KEY32, key_id=9).seal(PLEDGE)
    assert flow.hex() == "09045ec4651a40c1696f03d068695cec4d29c9f98a32d08f0f83ca7b151b29c3"


def test_sequenced_open_takes_bytes_subclasses_and_refuses_other_buffers():
    sealer = SequencedHeaderSealer(KEY16)

    class Header(bytes):
        pass

    assert sealer.open(Header(sealer.seal(PLEDGE))) == PLEDGE
    for other in (bytearray(sealer.seal(PLEDGE)), memoryview(sealer.seal(PLEDGE))):
        with pytest.raises(UsageError):
            sealer.open(other)  # type: ignore[arg-type]


def test_sequenced_seal_refuses_what_is_not_a_pledge_endpoint():
    with pytest.raises(UsageError):
        SequencedHeaderSealer(KEY16).seal(("fe80::1", 5684, 3))  # type: ignore[arg-type]


def test_sequenced_window_counts_per_key():
    """Each live key has its own window: the previous key's headers open after a rotation even
    though the new key's numbers start again at 0, and each still opens only once."""
    sealer = SequencedHeaderSealer(KEY16, window=4)
    old = [sealer.seal(PLEDGE) for _ in range(3)]
    sealer.rotate(bytes(16))
    new = [sealer.seal(PLEDGE) for _ in range(3)]
    assert [h[1:7] for h in new] == [h[1:7] for h in old]
    for header in new + old:
        assert sealer.open(header) == PLEDGE
    for header in new + old:
        with pytest.raises(ValidationError, match="replay"):
            sealer.open(header)


@pytest.mark.parametrize(("key", "kwargs"), [(bytes(15), {}), (KEY32[:20], {}),
                                             (KEY16, {"window": 0}), (KEY16, {"key_id": 300})])
def test_sequenced_sealer_rejects_bad_configuration(key, kwargs):
    with pytest.raises(UsageError):
        SequencedHeaderSealer(key, **kwargs)


# --- the replay window on its own -------------------------------------------------------------


def test_replay_window_edges():
    window = ReplayWindow(4)
    for seq in (0, 2, 1, 3):
        window.check_and_update(seq)
    window.check_and_update(10)  # a jump clears everything behind
    window.check_and_update(7)
    with pytest.raises(ValidationError, match="older"):
        window.check_and_update(6)
    for seen in (7, 10):
        with pytest.raises(ValidationError, match="replay"):
            window.check_and_update(seen)
    window.check_and_update(8)
    window.check_and_update(9)


@pytest.mark.parametrize("size", [1, 4, 5, 128])
def test_replay_window_boundary_and_ring_slots(size):
    """Size - 1 behind is still inside, size behind is not; numbers that share a ring slot
    (n and n + size) neither shadow nor replay each other."""
    window = ReplayWindow(size)
    window.check_and_update(1000)
    if size > 1:
        window.check_and_update(1000 - (size - 1))
    with pytest.raises(ValidationError, match="older"):
        window.check_and_update(1000 - size)
    window.check_and_update(1000 + size)  # 1000's slot: 1000 leaves the window
    with pytest.raises(ValidationError, match="older"):
        window.check_and_update(1000)
    with pytest.raises(ValidationError, match="replay"):
        window.check_and_update(1000 + size)
    if size > 1:
        window.check_and_update(1000 + size - 1)  # never seen, its slot holding an older one
        with pytest.raises(ValidationError, match="replay"):
            window.check_and_update(1000 + size - 1)


def test_replay_window_after_a_jump_accepts_everything_still_inside():
    window = ReplayWindow(8)
    for seq in range(8):
        window.check_and_update(seq)
    window.check_and_update(12)  # slots of 5..7 still hold them, those of 0..4 are now stale
    for seq in range(5, 8):
        with pytest.raises(ValidationError, match="replay"):
            window.check_and_update(seq)
    for seq in (8, 9, 10, 11):  # never seen; their slots still hold 0..3
        window.check_and_update(seq)
    with pytest.raises(ValidationError, match="older"):
        window.check_and_update(4)


def test_replay_window_matches_a_plain_model_on_random_orders():
    """Differential: the ring agrees with the definition (a set of everything accepted and the
    highest number) on reordered, duplicated and stale streams, for several sizes."""
    import random

    rng = random.Random(18)
    for size in (1, 2, 3, 8, 64, 100):
        window, seen, top = ReplayWindow(size), set(), -1
        for _ in range(3000):
            seq = max(0, top + rng.randint(-2 * size, 3))
            expected = seq not in seen and top - seq < size
            try:
                window.check_and_update(seq)
                accepted = True
            except ValidationError:
                accepted = False
            assert accepted == expected, (size, seq, top)
            if accepted:
                seen.add(seq)
                top = max(top, seq)
