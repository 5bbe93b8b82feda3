"""pledge-sim reads numbers from HTTP as ASCII digits (issue 11): ``str.isdigit()`` passed
"²" (and other Unicode digits) which ``int()`` then refused with a ValueError that escaped the
client; ``int(x, 16)`` took "0x1f" as a chunk size."""

import asyncio
from datetime import UTC, datetime

import pytest
from test_pledge_parts import Server, client_context, pki_dir  # noqa: F401 - pki_dir: fixture

from pledge_sim.http import HttpError, connect
from pledge_sim.retry import DEFAULT_RETRY_AFTER, RETRY_AFTER_CAP, retry_after_seconds

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "seconds"), [
    ("²", DEFAULT_RETRY_AFTER), ("1²", DEFAULT_RETRY_AFTER), ("٣", DEFAULT_RETRY_AFTER),
    ("9" * 5000, RETRY_AFTER_CAP), ("00007", 7),
])
def test_retry_after_takes_ascii_digits_only(value, seconds):
    assert retry_after_seconds(value, NOW) == seconds


@pytest.mark.parametrize("reply", [
    # headers are read as latin-1, where byte 0xb2 is "²" and 0xb9 "¹"
    b"HTTP/1.1 2\xb20 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xb9\r\n\r\na",
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
])
def test_unicode_digits_and_odd_numbers_are_http_errors(pki_dir, reply):  # noqa: F811
    async def go() -> None:
        async with Server(pki_dir, [reply]) as port:
            conn = await connect("::1", port, client_context(pki_dir))
            with pytest.raises(HttpError):
                await conn.request("GET", "/", timeout=3)
            await conn.close()

    asyncio.run(go())


@pytest.mark.parametrize("text", ["[fe80::1%eth0]:8²", "registrar.example:²", "h:" + "9" * 5000])
def test_static_registrar_port_takes_ascii_digits_only(text):
    from pledge_sim.discovery import DiscoveryError, parse_address

    with pytest.raises(DiscoveryError, match="port must be"):
        parse_address(text)
