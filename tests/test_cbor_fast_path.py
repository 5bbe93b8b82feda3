"""brski.cbor_strict's fast path (issue 18) decodes exactly what the full reader decodes and
refuses nothing differently: compared on valid messages of every shape the library reads, on
every truncation and on random byte flips of them."""

import random

import cbor2
import pytest

from brski import cbor_strict
from brski.errors import DecodeError

SAMPLES = [
    {1: -7},
    cbor2.CBORTag(18, [b"\xa1\x01\x26", {32: [b"c" * 300, b"d" * 70000]}, b"p" * 30, b"s" * 64]),
    {2501: {1: 2, 2: "2026-06-01T00:00:00Z", 7: b"n" * 16, 8: "SN-1", -1: [-24, -25]}},
    {2501: {1: 2, 3: True, 4: None}},
    [0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -(2**64), "é", b"", []],
    {b"k": [1, {"a": None}], "t": 1.5, cbor2.CBORTag(47, 2451): 0},
    cbor2.CBORTag(2, b"\x01" * 40),
    [[[[[[1]]]]]],
]


def full_reader(data: bytes):
    reader = cbor_strict._Reader(data, "x")
    value = reader.item(0)
    if value is cbor_strict._BREAK or reader.pos != len(data):
        raise DecodeError("not one item")
    return value


def outcome(decode, data: bytes):
    try:
        return "ok", repr(decode(data))  # repr: NaN == NaN
    except DecodeError:
        return "refused", None


def variants():
    rng = random.Random(18)
    for sample in SAMPLES:
        data = cbor2.dumps(sample)
        yield data
        for cut in range(len(data)):
            yield data[:cut] if cut < 200 or cut % 97 == 0 else data[:0]
        for _ in range(200):
            flipped = bytearray(data)
            at = rng.randrange(min(len(data), 400))
            flipped[at] = rng.randrange(256)
            yield bytes(flipped)
    yield b"\x81" * 70 + b"\x01"  # deeper than MAX_DEPTH
    yield b"\xa2\x01\x01\x01\x02"  # a key twice
    yield b"\xa1\xf5\x01"  # true as a key
    yield b"\x62\xc3\x28"  # not UTF-8
    yield b"\x9f\x01\xff"  # indefinite length


def test_fast_path_and_full_reader_agree():
    for data in variants():
        if not data:
            continue
        assert outcome(lambda d: cbor_strict.loads_exact(d, "x"), data) == \
            outcome(full_reader, data), data.hex()


def test_the_fast_path_is_taken_for_the_usual_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(cbor_strict._Reader, "item",
                        lambda self, depth: calls.append(1) or 0)
    for sample in SAMPLES[:3]:
        cbor_strict.loads_exact(cbor2.dumps(sample), "x")
    assert calls == []


@pytest.mark.parametrize("data", [b"\xa2\x01\x01\x01\x02", b"\x81" * 70 + b"\x01"])
def test_the_refusal_text_comes_from_the_full_reader(data):
    with pytest.raises(DecodeError, match=r"appears twice|nested deeper"):
        cbor_strict.loads_exact(data, "x")
