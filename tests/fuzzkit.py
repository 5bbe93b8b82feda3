"""Shared pieces of the fuzz harnesses (tests/test_fuzz_*.py, test_wire_fuzz.py,
test_voucher_fuzz.py): how many examples, the mutation strategy, the contract checks.

``make test`` runs a short, derandomized pass (the same examples every time). ``make fuzz`` sets
BRSKI_FUZZ_EXAMPLES (and BRSKI_FUZZ_RANDOM=1 for fresh random inputs each run) for a long one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from brski.errors import ProtocolError


def examples(default: int) -> int:
    """``default`` examples per test in ``make test``; BRSKI_FUZZ_EXAMPLES overrides."""
    return int(os.environ.get("BRSKI_FUZZ_EXAMPLES", default))


def fuzz_settings(default: int) -> settings:
    randomized = os.environ.get("BRSKI_FUZZ_RANDOM") == "1"
    return settings(
        max_examples=examples(default),
        deadline=None,
        database=None,
        derandomize=not randomized,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """1 to 4 edits of one of ``seeds``: bit flips, CBOR/DER-significant bytes, inserts,
    deletes, cuts and repeats (what coverage-guided fuzzers do first)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x1F, 0x30, 0x3F, 0x5F, 0x61, 0x7F,
                                             0x80, 0x81, 0x9F, 0xA1, 0xBF, 0xC2, 0xFF, 0xF4,
                                             0xF9, 0x18, 0x1B, 0x0C, 0x13]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        elif op == "repeat" and data:
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


def decoded_or_none(decode: Callable[..., Any], *args: Any) -> Any:
    """The library's contract (brski/errors.py): a decoder raises only ProtocolError
    subclasses, whatever the input. Anything else fails the test."""
    try:
        return decode(*args)
    except ProtocolError:
        return None
