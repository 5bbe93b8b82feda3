"""The decoders' fast paths (issue 18) give exactly what the full paths give and refuse
nothing differently. brski.cbor_strict: compared on valid messages of every shape the library
reads, on every truncation and on random byte flips of them. b64decode_lenient: compared on
random short texts over both alphabets, padding, whitespace and non-ASCII."""

import base64
import binascii
import os
import random

import cbor2
import pytest

from brski import cbor_strict
from brski.errors import DecodeError
from brski.voucher_model import b64decode_lenient

SAMPLES = [
    {1: -7},
    cbor2.CBORTag(18, [b"\xa1\x01\x26", {32: [b"c" * 300, b"d" * 70000]}, b"p" * 30, b"s" * 64]),
    {2501: {1: 2, 2: "2026-06-01T00:00:00Z", 7: b"n" * 16, 8: "SN-1", -1: [-24, -25]}},
    {2501: {1: 2, 3: True, 4: None}},
    [0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -(2**64), "é", b"", []],
    {b"k": [1, {"a": None}], "t": 1.5, cbor2.CBORTag(47, 2451): 0},
    cbor2.CBORTag(2, b"\x01" * 40),
    [[[[[[1]]]]]],
    # every head width inline, as array elements, map keys and map values (issue 18: the
    # fast path decodes integer and string elements without a call)
    [23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -24, -25, -257, -(2**64),
     "t" * 23, "t" * 24, "é" * 200, b"b" * 23, b"b" * 24, b"b" * 300, b"b" * 70000],
    {24: 256, -25: -257, 65536: 2**32, "k" * 30: b"v" * 30, b"k" * 30: "v" * 30, 2**40: -(2**40)},
    {1: False, 2: True, 3: None, 4: cbor2.undefined, 5: [True, None], 6: {}, 7: []},
    [cbor2.CBORTag(1, 0), {1: cbor2.CBORTag(24, b"\x01")}, [[], {}], -1],
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
    depth = cbor_strict.MAX_DEPTH
    for inner in (b"\x00", b"\x80", b"\xa0", b"\x81\x00", b"\xa1\x01\x02", b"\xa1\x81\x00\x01",
                  b"\xc1\x00", b"\x81\x80", b"\x58\x01\x00", b"\xf5"):
        for outer in (b"\x81", b"\xa1\x00", b"\xc1"):  # array, map value, tag
            for levels in (depth - 2, depth - 1, depth, depth + 1):
                yield outer * levels + inner  # at, just below and past the depth limit
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
    for sample in [*SAMPLES[:3], *SAMPLES[-4:]]:
        cbor_strict.loads_exact(cbor2.dumps(sample), "x")
    assert calls == []


def test_the_inline_elements_decode_as_the_reader_does():
    for sample in SAMPLES[-4:]:
        data = cbor2.dumps(sample)
        assert repr(cbor_strict.loads_exact(data, "x")) == repr(full_reader(data))


@pytest.mark.parametrize("data", [b"\xa2\x01\x01\x01\x02", b"\x81" * 70 + b"\x01"])
def test_the_refusal_text_comes_from_the_full_reader(data):
    with pytest.raises(DecodeError, match=r"appears twice|nested deeper"):
        cbor_strict.loads_exact(data, "x")


def checked_base64(text: str):
    """b64decode_lenient without its fast path: the checks, then binascii (as before)."""
    if not b64decode_lenient.__globals__["_B64_CHARS"].fullmatch(text):
        raise DecodeError("not base64 text")
    body = text.rstrip("=")
    url = "-" in body or "_" in body
    if url and ("+" in body or "/" in body):
        raise DecodeError("mixed")
    if len(body) % 4 == 1 or (body != text and len(text) % 4):
        raise DecodeError("length")
    if url:
        body = body.translate(str.maketrans("-_", "+/"))
    try:
        return binascii.a2b_base64(body + "=" * (-len(body) % 4), strict_mode=True)
    except binascii.Error as exc:
        raise DecodeError("padding") from exc


def test_base64_fast_path_and_the_checks_agree():
    rng = random.Random(18)
    alphabet = "AB+/=-_9z \né"
    for _ in range(50000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(13)))
        assert outcome(b64decode_lenient, text) == outcome(checked_base64, text), repr(text)
    for _ in range(500):
        data = os.urandom(rng.randrange(40))
        for text in (base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode(),
                     base64.urlsafe_b64encode(data).decode().rstrip("=")):
            assert b64decode_lenient(text) == data
