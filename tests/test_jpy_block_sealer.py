"""brski.jpy.BlockHeaderSealer: the kernel relay's two-block AES header, sans-IO (the BPF
programs are held to the same bytes in test_jpy_kernel_programs.py)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from brski.errors import DecodeError, SignatureError, UsageError, ValidationError
from brski.jpy import BlockHeaderSealer, PledgeEndpoint

KEY = bytes(range(32))
PLEDGE = PledgeEndpoint(IPv6Address("fe80::1:2:3:4"), 50123, 7)


def test_round_trip_and_one_header_per_flow() -> None:
    s = BlockHeaderSealer(KEY, 9)
    header = s.seal(PLEDGE)
    assert len(header) == 32 and header[0] == 9
    assert s.seal(PLEDGE) == header  # deterministic: the registrar keys its connection on it
    assert s.open(header) == PLEDGE
    other = PledgeEndpoint(IPv6Address("fe80::1:2:3:5"), 50123, 7)
    assert s.seal(other) != header


def test_layout_is_the_documented_one() -> None:
    """C = AES(k, P), T = AES(k, P')[:15], P = family | ifindex | port | IID | key id."""
    header = BlockHeaderSealer(KEY, 9).seal(PLEDGE)
    plain = bytes([0]) + (7).to_bytes(4, "big") + (50123).to_bytes(2, "big") \
        + bytes.fromhex("0001000200030004") + bytes([9])
    enc = Cipher(algorithms.AES(KEY), modes.ECB()).encryptor()
    out = enc.update(plain + bytes([0x80]) + plain[1:]) + enc.finalize()
    assert header == bytes([9]) + out[:16] + out[16:31]


def test_every_single_bit_flip_is_refused() -> None:
    s = BlockHeaderSealer(KEY, 9)
    header = s.seal(PLEDGE)
    for bit in range(8, 8 * 32):  # the key id byte aside: that names another key
        flipped = bytearray(header)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SignatureError):
            s.open(bytes(flipped))


def test_a_c_block_with_another_pledges_tag_is_refused() -> None:
    s = BlockHeaderSealer(KEY, 9)
    a = s.seal(PLEDGE)
    b = s.seal(PledgeEndpoint(IPv6Address("fe80::9"), 1, 7))
    with pytest.raises(SignatureError):
        s.open(a[:17] + b[17:])
    # nor is a tag block ever a valid C block (domain separation)
    with pytest.raises(SignatureError):
        s.open(a[:1] + a[17:] + b"\0" + a[1:16])


def test_previous_key_opens_the_one_before_is_stale() -> None:
    s = BlockHeaderSealer(KEY, 9)
    old = s.seal(PLEDGE)
    s.rotate(bytes(32))
    assert s.key_id == 10 and s.previous_key_id == 9
    assert s.open(old) == PLEDGE
    s.rotate(bytes([1]) * 32)
    with pytest.raises(ValidationError):
        s.open(old)


def test_a_header_under_another_key_with_a_live_id_is_forged() -> None:
    header = BlockHeaderSealer(bytes(32), 9).seal(PLEDGE)
    with pytest.raises(SignatureError):
        BlockHeaderSealer(KEY, 9).open(header)


@pytest.mark.parametrize("size", [0, 1, 31, 33])
def test_wrong_size_is_a_decode_error(size: int) -> None:
    with pytest.raises(DecodeError):
        BlockHeaderSealer(KEY, 9).open(bytes([9]) + bytes(max(size - 1, 0)))


def test_only_link_local_ipv6_pledges_and_good_keys() -> None:
    s = BlockHeaderSealer(KEY, 9)
    for address in (IPv6Address("fd00::1"), IPv4Address("192.0.2.1")):
        with pytest.raises(ValidationError):
            s.seal(PledgeEndpoint(address, 1, 1))
    for key in (bytes(16), bytes(64), "x" * 32):
        with pytest.raises(UsageError):
            BlockHeaderSealer(key, 0)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        s.open("x" * 32)  # type: ignore[arg-type]
