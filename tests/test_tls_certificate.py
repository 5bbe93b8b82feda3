"""brski.tls_certificate: the leaf certificate of a TLS Certificate handshake message, for
TLS 1.2 and 1.3 framing, and nothing but DecodeError for anything else."""

import contextlib
import datetime

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from brski.errors import DecodeError
from brski.pki import create_test_pki
from brski.tls_certificate import leaf_certificate


def u(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def message(certs: list[bytes], *, tls13: bool, context: bytes = b"") -> bytes:
    entries = b"".join(u(len(c), 3) + c + (u(0, 2) if tls13 else b"") for c in certs)
    body = (u(len(context), 1) + context if tls13 else b"") + u(len(entries), 3) + entries
    return b"\x0b" + u(len(body), 3) + body


@pytest.fixture(scope="module")
def ders() -> list[bytes]:
    pki = create_test_pki(datetime.datetime.now(datetime.UTC), serials=["SN-1"])
    return [pki.idevids["SN-1"].cert.public_bytes(Encoding.DER),
            pki.manufacturer_ca.cert.public_bytes(Encoding.DER)]


@pytest.mark.parametrize("tls13", [False, True])
def test_the_first_certificate_is_the_leaf(ders, tls13):
    assert leaf_certificate(message(ders, tls13=tls13, context=b"ab"), tls13=tls13) == ders[0]
    assert leaf_certificate(message([], tls13=tls13), tls13=tls13) is None


@pytest.mark.parametrize("tls13", [False, True])
def test_truncated_or_inconsistent_messages_are_refused(ders, tls13):
    good = message(ders, tls13=tls13)
    for cut in (0, 1, 4, 6, 9, len(good) - 1):
        with pytest.raises(DecodeError):
            leaf_certificate(good[:cut], tls13=tls13)
    with pytest.raises(DecodeError):
        leaf_certificate(b"\x01" + good[1:], tls13=tls13)  # a ClientHello
    with pytest.raises(DecodeError):
        leaf_certificate(good + b"\x00", tls13=tls13)


@given(st.binary(max_size=64), st.booleans())
def test_any_input_gives_bytes_none_or_decode_error(data, tls13):
    for candidate in (data, b"\x0b" + u(len(data), 3) + data):
        with contextlib.suppress(DecodeError):
            result = leaf_certificate(candidate, tls13=tls13)
            assert result is None or (isinstance(result, bytes) and result)
